"""The benchmark tool (benchmarks/moba_bench): FLOP conventions against hand counts, the run
folder's layout and rows.json schema from a --quick CPU run, assembling a run from several
jobs, and the minimal MoBA decode step against dense attention."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks.moba_bench import FWD_BWD_FACTOR, dense_flops, moba_flops
from benchmarks.moba_bench.cases import CASES, packed_lengths
from benchmarks.moba_bench.cli import main
from benchmarks.moba_bench.decode import moba_decode_step
from benchmarks.moba_bench.local import finish_rows
from benchmarks.moba_bench.report import SCHEMA, write_run


def test_flop_conventions_match_hand_counts():
    # T=10, B=4, K=2: blocks of 4, 4, 2 tokens. Own-block causal pairs 10 + 10 + 3 = 23; past
    # pairs: block 1 takes 1 past block (4 keys x 4 queries), block 2 takes 1 (4 x 2): 16 + 8.
    flops, density = moba_flops([10], hq=3, d=8, block=4, topk=2)
    assert flops == 4 * 8 * 3 * (23 + 24)
    assert density == pytest.approx(47 / 55)  # dense causal: 10 * 11 / 2 = 55 pairs
    assert dense_flops([10, 6], hq=3, d=8) == 4 * 8 * 3 * (55 + 21)
    # K >= blocks: MoBA is exact causal attention, density 1.
    assert moba_flops([4096], 2, 16, 512, 8) == (dense_flops([4096], 2, 16), 1.0)
    assert FWD_BWD_FACTOR == 3.5


def test_issue_13_densities():
    # Issue 13's table: H32 32K b512 k3 -> 0.077, 128K b512 k3 -> 0.019, 128K b4096 k12 -> 0.59.
    for name, want in (("h32-32k", 0.077), ("h16-128k", 0.019), ("h32-128k-b4096", 0.59)):
        c = CASES[name]
        assert moba_flops(c.lens, c.hq, c.d, c.block, c.topk)[1] == pytest.approx(want, abs=6e-3)


def test_useful_tflops_and_dense_pick():
    case = CASES["h32-32k"]
    flops = moba_flops(case.lens, case.hq, case.d, case.block, case.topk)[0]
    dflops = dense_flops(case.lens, case.hq, case.d)
    base = dict(moba_flops_fwd=flops, dense_flops_fwd=dflops)
    rows = finish_rows(
        [
            dict(base, backend="triton", fwd_ms=2.0, fwdbwd_ms=8.0),
            dict(base, backend="dense-cudnn", fwd_ms=10.0, fwdbwd_ms=40.0),
            dict(base, backend="dense-fa2", fwd_ms=12.0, fwdbwd_ms=30.0),
        ],
        case,
    )
    moba = rows[0]
    assert moba["dense_fwd_ms"] == 10.0 and moba["dense_fwd_backend"] == "dense-cudnn"
    assert moba["dense_fwdbwd_ms"] == 30.0 and moba["dense_fwdbwd_backend"] == "dense-fa2"
    assert moba["speedup_fwd"] == 5.0 and moba["speedup_fwdbwd"] == 30.0 / 8.0
    assert moba["tflops_fwd"] == pytest.approx(flops / 2e-3 / 1e12)
    assert moba["tflops_fwdbwd"] == pytest.approx(3.5 * flops / 8e-3 / 1e12)
    assert rows[1]["tflops_fwd"] == pytest.approx(dflops / 10e-3 / 1e12)


def test_packed_lengths():
    lens = packed_lengths(128 * 1024, 64)
    assert len(lens) == 64 and sum(lens) == 128 * 1024 and min(lens) >= 1
    assert len(set(lens)) > 32 and lens == packed_lengths(128 * 1024, 64)
    with pytest.raises(ValueError, match="docs must be"):
        packed_lengths(10, 11)


def test_decode_step_matches_dense_when_every_block_is_selected():
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, s, block = 4, 2, 16, 70, 16
    kc, vc = (torch.randn(hkv, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    q = torch.randn(hq, d, generator=g, dtype=torch.float64)
    n = s // block
    cent = kc[:, : n * block].view(hkv, n, block, d).mean(2)
    got = moba_decode_step(q, kc, vc, cent, block, topk=n + 1)
    rep = (x.repeat_interleave(hq // hkv, 0) for x in (kc, vc))
    want = F.scaled_dot_product_attention(q[:, None], *rep)[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # K = 1: the own block only (tokens 64..69).
    own = F.scaled_dot_product_attention(
        q[:, None], *(x[:, 64:].repeat_interleave(2, 0) for x in (kc, vc))
    )[:, 0]
    torch.testing.assert_close(moba_decode_step(q, kc, vc, cent, block, 1), own)


def _check_folder(folder, jobs):
    assert {p.name for p in folder.iterdir()} >= {"rows.json", "table.md", "command.txt"}
    run = json.loads((folder / "rows.json").read_text())
    assert run["schema"] == SCHEMA and run["commit"] == "abc123"
    assert [j["job"] for j in run["jobs"]] == jobs
    assert all({"job", "case", "backend"} <= r.keys() for r in run["rows"])
    assert all("error" not in r for r in run["rows"]), [r for r in run["rows"] if "error" in r]
    cmd = (folder / "command.txt").read_text()
    assert all(f"moba_bench {j}" in cmd for j in jobs)
    return run


@pytest.mark.timeout(600)
def test_quick_runs_assemble_one_folder(tmp_path):
    common = ["--quick", "--out-root", str(tmp_path), "--tag", "t", "--date", "2026-01-02"]
    common += ["--commit", "abc123"]
    assert main(["local", "--cases", "q-single,q-packed,q-layer", *common]) == 0
    assert main(["decode", *common]) == 0
    assert main(["accuracy", "--cases", "q-single", *common]) == 0
    folder = tmp_path / "cpu" / "2026-01-02-t"
    run = _check_folder(folder, ["local", "decode", "accuracy"])
    rows = {(r["job"], r["case"], r["backend"]): r for r in run["rows"]}
    single = rows[("local", "q-single", "reference")]
    assert single["moba_flops_fwd"] == 4 * 32 * 4 * sum(
        m * (m + 1) // 2 + min(2, i) * 32 * m for i, m in enumerate([32] * 8)
    )
    assert single["speedup_fwdbwd"] == pytest.approx(
        single["dense_fwdbwd_ms"] / single["fwdbwd_ms"]
    )
    assert rows[("local", "q-packed", "dense-math")]["nseq"] == 8
    assert rows[("local", "q-layer", "reference")]["tokens_per_s"] > 0
    assert rows[("decode", "q-decode", "moba-decode")]["step_ms"] > 0
    assert rows[("decode", "q-decode", "moba-decode-minimal")]["step_ms"] > 0
    acc = rows[("accuracy", "q-single", "reference-bf16")]
    assert 0 < acc["out_err"] < 2e-2 and 0 < acc["dq_err"] < 5e-2  # bf16: ~3e-3 per value
    table = (folder / "table.md").read_text()
    assert "## Op (single device)" in table and "## Decode step" in table
    assert "abc123" in table
    # Re-running a job replaces its rows; another commit is refused.
    assert main(["decode", *common]) == 0
    run = _check_folder(folder, ["local", "decode", "accuracy", "decode"])
    assert sum(r["job"] == "decode" for r in run["rows"]) == 3  # library, minimal, dense
    with pytest.raises(ValueError, match="holds commit abc123"):
        write_run(folder, dict(job="x", commit="other", gpu="cpu"), [])
    pytest.importorskip("matplotlib")
    assert all((folder / p).stat().st_size > 10_000 for p in ("op.png", "layer.png", "decode.png"))


@pytest.mark.timeout(300)
def test_baselines_pick_the_dense_rows(tmp_path):
    # On CPU the only baseline is dense-math: naming another times MoBA alone (no dense
    # columns); naming dense-math keeps it as the run's dense.
    common = ["local", "--quick", "--cases", "q-single", "--out-root", str(tmp_path)]
    for tag, base, want in (("a", "triton-dense", None), ("b", "dense-math", "dense-math")):
        assert main([*common, "--tag", tag, "--commit", "c", "--baselines", base]) == 0
        folder = next((tmp_path / "cpu").glob(f"*-{tag}"))
        rows = json.loads((folder / "rows.json").read_text())["rows"]
        assert [r["backend"] for r in rows] == ["reference", *([want] if want else [])]
        assert rows[0]["dense_fwdbwd_backend"] == want


def test_bad_arguments_are_refused(capsys):
    for argv, msg in (
        (["local", "--quick", "--cases", "nope"], "unknown case 'nope'"),
        (["decode", "--quick", "--cases", "q-single"], "is a op case"),
        (["cp", "--quick"], "--quick has no cp job"),
        (["local", "--quick", "--reps", "0"], "must be > 0"),
        (["local", "--quick", "--baselines", "dense-fa3"], "--baselines takes names from"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv
