"""The scale model (benchmarks/cp_model.py, benchmarks/project_cp.py) against gloo runs.

CI: one world of 2 checks that the accounting, fed the real routing, reproduces
``last_stats`` to the byte, and that the routing model, fed only per-block selection counts,
predicts bytes per rank within ``BLOCK_TOL``; plus exact cases and CLI smoke runs. The full
validation (worlds 2-4, both layouts, random and concentrated gates) is the slow test
``test_validation_grid``; it writes ``benchmarks/results/projection_validation.{json,md}``:

    python -m pytest -m slow tests/test_project_cp.py
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_utils import run_world

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import cp_model as cm  # noqa: E402
import project_cp  # noqa: E402

from moba_dist.parallel import cost_model as cost  # noqa: E402

# Bytes per rank of the block-frequency model vs gloo, relative (ranks that received bytes):
# the full grid measured at most 0.27 (benchmarks/results/projection_validation.md).
BLOCK_TOL = 0.35
SHAPE = dict(hq=4, hkv=2, d=16, block=32)  # the CI world; float64 payload (8 bytes)
GRID = dict(hq=8, hkv=2, d=32, block=64)  # the full validation grid


def make_inputs(lens, kind: str, hq: int, hkv: int, d: int, block: int, seed: int = 0):
    """float64 ``q [T, hq, d]``, ``k, v [T, hkv, d]``, int32 ``cu_seqlens``. ``random``: i.i.d.
    Gaussian (the worst case); ``sinks:S``: benchmarks/cp_bytes.py's concentrated gate, one
    direction added to every query and S times to the keys of the blocks at the stream's
    quarters; ``block0``: every query's one past choice (K=2) is its sequence's first block."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    if kind.startswith("sinks:"):
        direction = torch.randn(d, generator=g, dtype=torch.float64)
        q += direction
        for s in range(0, t - t % 4, t // 4):
            k[s : s + block] += float(kind[6:]) * direction
    elif kind == "block0":
        q = q.abs()
        for s in np.cumsum([0, *lens[:-1]]).tolist():  # the first block of every sequence
            k[s : s + block] = 5.0
    return q, k, v, torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)


def routing_of(q, k, cu, block: int, topk: int) -> np.ndarray:
    """The single-device gate on the unsharded input: ``sel [T, Hq, K]`` global block ids."""
    from moba_dist.kernels.blocks import BlockLayout
    from moba_dist.ops import moba_route

    return moba_route(q, k, BlockLayout.build(cu, block), topk).numpy().astype(np.int64)


STATS = ("bytes_sent", "bytes_received", "bwd_bytes_sent", "bwd_bytes_received")


def predict(sel, lens, world, layout, topk, level, hq, hkv, d, block, strategy="selective"):
    """Per-rank bytes ``{stat: [P]}`` from the cost model (float64 payload) and union fractions
    ``[P]``, from the routing model at ``level``."""
    geom = cm.build_geometry(lens, block, world, layout)
    rows = cm.rows_matrix(geom, cm.predict_union(sel, geom, hkv, topk, level))
    shape = cost.Shape(sum(lens), world, hq, hkv, d, elem=8, block=block)
    traffic = (cost.allgather_traffic(shape) if strategy == "allgather"
               else cost.selective_traffic(shape, torch.from_numpy(rows)))  # fmt: skip
    union = rows.sum(1) / ((geom.tokens - geom.local_tokens) * hkv)
    return {k: traffic.per_rank(k) for k in STATS}, union


def _measure_worker(rank: int, world: int, cases: list, shape: dict, out: str) -> None:
    """Each case through MoBAContextParallel (selective); rank 0 writes every rank's stats."""
    import torch.distributed as dist

    from moba_dist import MoBAContextParallel
    from moba_dist.parallel import shard

    got = []
    for lens, kind, topk, layout in cases:
        q, k, v, cu = make_inputs(lens, kind, **shape)
        sh = dict(rank=rank, world_size=world, layout=layout)
        row = {}
        for strategy in ("selective", "allgather"):
            mod = MoBAContextParallel(shape["block"], topk, layout=layout, strategy=strategy,
                                      backend="reference")  # fmt: skip
            with torch.no_grad():
                mod(*(shard(x, cu, **sh) for x in (q, k, v)), cu)
            row[strategy] = {key: mod.last_stats[key] for key in STATS}
        got.append((row, mod.last_stats["union_fraction"]))
    table = [None] * world
    dist.all_gather_object(table, got)
    if rank == 0:
        Path(out).write_text(json.dumps(table))


def compare(world: int, cases: list, shape: dict, tmp: Path) -> list[dict]:
    """gloo-measured vs predicted (every level) bytes and union fractions, one row per case."""
    out = tmp / f"stats{world}.json"
    run_world(world, _measure_worker, cases, shape, str(out))
    per_rank = json.loads(out.read_text())  # [rank][case] = ({strategy: {stat: bytes}}, union)
    rows = []
    for i, (lens, kind, topk, layout) in enumerate(cases):
        q, k, _, cu = make_inputs(lens, kind, **shape)
        sel = routing_of(q, k, cu, shape["block"], topk)
        row = dict(
            world=world,
            lens=list(lens),
            kind=kind,
            topk=topk,
            layout=layout,
            measured=[r[i][0]["selective"]["bytes_received"] for r in per_rank],
            measured_stats={
                s: {k: [r[i][0][s][k] for r in per_rank] for k in STATS}
                for s in ("selective", "allgather")
            },
            union=[r[i][1] for r in per_rank],
        )
        args = (sel, lens, world, layout, topk)
        dims = (shape["hq"], shape["hkv"], shape["d"], shape["block"])
        for level in ("exact", "block", "zipf"):
            b, u = predict(*args, level, *dims)
            row[level], row[f"{level}_union"] = b["bytes_received"], u.tolist()
        row["exact_stats"] = {
            "selective": predict(*args, "exact", *dims)[0],
            "allgather": predict(*args, "exact", *dims, "allgather")[0],
        }
        rows.append(row)
    return rows


def errors(rows: list[dict], level: str) -> dict:
    """Relative bytes error over ranks that received bytes; absolute union-fraction error."""
    meas = np.concatenate([r["measured"] for r in rows])
    pred = np.concatenate([r[level] for r in rows])
    rel = np.abs(pred[meas > 0] / meas[meas > 0] - 1.0)
    union = np.concatenate([np.subtract(r[f"{level}_union"], r["union"]) for r in rows])
    wrong = int((pred[meas == 0] != 0).sum())  # ranks that moved nothing must be predicted so
    return dict(max_rel=float(rel.max()), p90_rel=float(np.quantile(rel, 0.9)),
                mean_rel=float(rel.mean()), max_abs_union=float(np.abs(union).max()),
                zero_ranks_wrong=wrong, ranks=int(meas.size))  # fmt: skip


@pytest.mark.dist
def test_model_reproduces_gloo_bytes(tmp_path):
    cases = [(lens, kind, topk, layout) for lens in ((768,), (256, 512)) for layout in cm.LAYOUTS
             for kind, topk in (("random", 3), ("sinks:0.1", 3), ("block0", 2))]  # fmt: skip
    rows = compare(2, cases, SHAPE, tmp_path)
    for r in rows:  # the cost model fed the real routing gives the library's bytes, to the byte
        assert r["exact"] == r["measured"], r
        assert r["exact_stats"] == r["measured_stats"], r
        np.testing.assert_allclose(r["exact_union"], r["union"], atol=1e-12)
        if r["kind"] == "block0":  # deterministic routing: the model is exact too
            np.testing.assert_allclose(r["block"], r["measured"], rtol=1e-12, atol=1e-6)
    summary = errors(rows, "block")
    assert summary["max_rel"] <= BLOCK_TOL and summary["zero_ranks_wrong"] == 0, summary


@pytest.mark.slow
@pytest.mark.dist
def test_validation_grid(tmp_path):
    cases = [(lens, kind, topk, layout) for lens in ((4608,), (1536, 3072))
             for kind in ("random", "sinks:0.02", "sinks:0.05", "sinks:0.1", "sinks:3")
             for topk in (3, 6) for layout in cm.LAYOUTS]  # fmt: skip
    rows = [r for world in (2, 3, 4) for r in compare(world, cases, GRID, tmp_path)]
    summary = {lv: errors(rows, lv) for lv in ("exact", "block", "zipf")}
    out = BENCH / "results" / "projection_validation"
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(validation_markdown(rows, summary))
    assert summary["exact"]["max_rel"] == 0.0, summary
    assert summary["block"]["max_rel"] <= BLOCK_TOL, summary


def validation_markdown(rows: list[dict], summary: dict) -> str:
    lines = ["# Traffic model vs gloo runs: forward bytes received per rank", "",
             f"Shape {GRID}, float64 payload, strategy=selective, reference backend; "
             "`python -m pytest -m slow tests/test_project_cp.py`.", "",
             "| summary | max rel err | p90 | mean | max abs union err | ranks |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for lv, s in summary.items():
        lines.append(f"| {lv} | {s['max_rel']:.3f} | {s['p90_rel']:.3f} | {s['mean_rel']:.3f}"
                     f" | {s['max_abs_union']:.3f} | {s['ranks']} |")  # fmt: skip
    lines += ["", "| P | seqs | input | K | layout | union measured | block model | zipf |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        u = [" ".join(f"{x:.3f}" for x in r[k]) for k in ("union", "block_union", "zipf_union")]
        lines.append(f"| {r['world']} | {r['lens']} | {r['kind']} | {r['topk']} | {r['layout']}"
                     f" | {u[0]} | {u[1]} | {u[2]} |")  # fmt: skip
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("layout", cm.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_geometry_matches_library_layouts(world, layout):
    from moba_dist.parallel import local_positions

    for lens in ([24 * world], [8 * world, 16 * world, 24 * world]):
        geom = cm.build_geometry(lens, 5, world, layout)
        cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
        owner = geom.token_owner()
        for r in range(world):
            pos = local_positions(cu, rank=r, world_size=world, layout=layout).numpy()
            assert (owner[pos] == r).all() and (owner == r).sum() == pos.size
        assert geom.held.sum() == sum(lens)


def test_routing_model_limits_are_exact():
    geom = cm.build_geometry([64 * 12], 64, 4, "zigzag")
    rank = cm.index_rank(geom)
    p0 = cm.route_probs(rank, geom.seq_first, 4, 0.0)  # uniform: k_c / candidates
    cand = np.arange(12)[None, :] < np.arange(12)[:, None]
    want = np.where(cand, np.minimum(3, np.arange(12))[:, None] / np.maximum(np.arange(12), 1)[
        :, None], 0.0)  # fmt: skip
    np.testing.assert_allclose(p0, want, rtol=1e-12)
    # alpha = inf: every query takes the first 3 blocks; a routing that does so, counted
    # exactly, gives the same rows as the model.
    c = np.arange(768) // 64
    sel = np.stack([c, *(np.where(c > j, j, -1) for j in range(3))], 1)[:, None].repeat(4, 1)
    u_model = cm.model_union(cm.route_probs(rank, geom.seq_first, 4, math.inf), geom, 2)
    exact = cm.rows_matrix(geom, cm.exact_union(sel, geom, 2))
    np.testing.assert_array_equal(cm.rows_matrix(geom, np.stack([u_model] * 2)), exact)
    block = cm.rows_matrix(geom, cm.predict_union(sel, geom, 2, 4, "block"))
    np.testing.assert_allclose(block, exact, rtol=1e-12, atol=1e-9)


def test_cost_model_bytes_follow_library_accounting():
    rows = torch.tensor([[0.0, 3.0], [5.0, 0.0]])  # rank 0 receives 3 rows from rank 1, ...
    shape = cost.Shape(tokens=64, world=2, hq=4, hkv=2, head_dim=16, elem=2, block=8)
    row, grad = 2 * 16 * 2, 2 * 16 * 4
    sel = cost.selective_traffic(shape, rows)
    assert sel.per_rank("bytes_received") == [3 * row, 5 * row]
    assert sel.per_rank("bwd_bytes_received") == [3 * row + 5 * grad, 5 * row + 3 * grad]
    kept = cost.selective_traffic(shape, rows, keep_fetched=True)  # no re-fetch
    assert kept.per_rank("bwd_bytes_sent") == [3 * grad, 5 * grad]  # the received rows
    gather = cost.allgather_traffic(shape)
    assert gather.per_rank("bytes_received") == [32 * 2 * row] * 2
    assert gather.per_rank("bwd_bytes_sent") == [32 * 2 * (row + grad)] * 2


def test_rows_from_union_keeps_each_receivers_rows():
    shape = cost.Shape(tokens=96, world=3, hq=4, hkv=2, head_dim=8)
    full = cost.rows_from_union(shape, [1.0, 1.0, 1.0])
    assert torch.equal(full, cost.allgather_traffic(shape).phases["fwd_fetch"] / (2 * 8 * 2))
    half = cost.rows_from_union(shape, [0.5, 0.25, 0.0])
    assert half.sum(1).tolist() == [64.0, 32.0, 0.0]  # f_r * (T - T_local) * Hkv
    with pytest.raises(ValueError, match="one value per rank"):
        cost.rows_from_union(shape, [1.0])


def test_hybrid_cuts_inter_node_bytes_by_the_sub_group():
    """Allgather over 64 ranks vs heads inside nodes of 8 and allgather across the 8 nodes:
    bytes crossing nodes per GPU fall by about 8 ((P - 1) T_local Hkv vs (G - 1) 8 T_local
    Hkv / 8 rows), and the head exchange never leaves a node."""
    links = cost.Links(gpus_per_node=8)
    full = cost.Shape(tokens=64 * 1024, world=64, hq=32, hkv=8, head_dim=128)
    outer = cost.Shape(tokens=64 * 1024, world=8, hq=4, hkv=1, head_dim=128)
    inner = cost.heads_traffic(cost.Shape(8 * 1024, 8, 32, 8, 128))
    heads_p, outer_p = cost.hybrid_traffic(inner, cost.allgather_traffic(outer), 8)
    flat = cost.allgather_traffic(full).by_class(links)
    hybrid = outer_p.by_class(links)
    assert max(heads_p.by_class(links)["inter_recv"]) == 0.0
    ratio = max(flat["inter_recv"]) / max(hybrid["inter_recv"])
    want = (64 - 8) * 1024 * 8 / ((8 - 1) * 8 * 1024 * 1)  # remote rows off the node
    assert ratio == pytest.approx(want), ratio


def test_choose_takes_the_cheapest_that_fits():
    def c(name, ms, mem):
        return cost.Cost(name, ms, 0.0, 0.0, mem, mem, {})

    costs = {"a": c("a", 5.0, 10.0), "b": c("b", 3.0, 30.0), "d": c("d", 3.0, 20.0)}
    assert cost.choose(costs) == "b"  # a tie goes to the earlier name
    assert cost.choose(costs, memory_limit=25.0) == "d"
    assert cost.choose(costs, memory_limit=1.0) == "a"  # nothing fits: the least memory
    with pytest.raises(ValueError, match="at least one candidate"):
        cost.choose({})


def test_auto_choice_follows_the_bytes():
    """The runtime rule: full unions on one node favour heads (q, k, v, out of Hq / P heads move
    fewer bytes than all remote K/V), small unions favour selective; heads needs Hq % P == 0."""
    one_node = cost.Shape(tokens=1 << 20, world=8, hq=32, hkv=8, head_dim=128, block=4096)
    taken, table = cost.auto_choice(one_node, [1.0] * 8)
    assert taken == "heads" and set(table) == {"selective", "allgather", "heads"}
    assert table["selective"]["inter_recv_max"] == 0.0  # one node: NVLink only
    assert cost.auto_choice(one_node, [0.02] * 8)[0] == "selective"
    odd = cost.Shape(tokens=3 << 12, world=3, hq=8, hkv=2, head_dim=64, block=512)
    assert "heads" not in cost.auto_choice(odd, [1.0] * 3)[1]
    with pytest.raises(ValueError, match="candidates must be"):
        cost.auto_choice(one_node, [1.0] * 8, candidates=("ring",))


def test_streamed_holds_at_most_its_budget():
    shape = cost.Shape(tokens=8192, world=4, hq=8, hkv=2, head_dim=64)
    traffic = cost.allgather_traffic(shape)
    fetched = max(traffic.per_rank("bytes_received"))
    kern = cost.Kernels(*(torch.full((4,), v, dtype=torch.float64) for v in (2.0, 4.0, 0.1, 0.5)))
    links = cost.Links()
    whole = cost.sequence_cost("allgather", shape, traffic, kern, links)
    streamed = cost.sequence_cost("streamed", shape, traffic, kern, links, fetched / 4)
    assert whole.remote_bytes == fetched and streamed.remote_bytes == fetched / 4
    assert streamed.fwd_ms >= float((kern.gate + kern.fwd).max())  # never below the kernels


def _sampled_routing(t, hq, block, topk, alpha, seed=0):
    """Routing drawn from the Zipf model itself (Gumbel top-k without replacement)."""
    rng = np.random.default_rng(seed)
    n, c = -(-t // block), np.arange(t) // block
    keys = -np.log(np.arange(1.0, n + 1)) * alpha + rng.gumbel(size=(t, hq, n))
    keys = np.where(np.arange(n) < c[:, None, None], keys, -np.inf)
    top = np.argsort(-keys, -1)[..., : topk - 1]
    top = np.where(np.take_along_axis(keys, top, -1) > -np.inf, top, -1)
    return np.concatenate([np.broadcast_to(c[:, None, None], (t, hq, 1)), top], -1)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5])
def test_fit_alpha_recovers_a_sampled_concentration(alpha):
    # Sampling without replacement is not exactly the water-filled inclusion model: the fit
    # reads a sampled alpha of 2.5 as ~2.2; within 0.1 + 15% is what the fit promises.
    geom = cm.build_geometry([4096], 64, 1, "contiguous")
    sel = _sampled_routing(4096, 4, 64, 4, alpha)
    fitted = cm.fit_alpha(cm.pair_counts(sel, geom, 4)[0], geom, 4)
    assert abs(fitted - alpha) < 0.1 + 0.15 * alpha, fitted


def _save_routing(path, kind, layers=2):
    q, k, _, cu = make_inputs([2048], kind, hq=4, hkv=2, d=16, block=64, seed=1)
    sel = [torch.from_numpy(routing_of(q, k, cu, 64, 3)).to(torch.int32)] * layers
    torch.save({"cu_seqlens": cu, "block": 64, "topk": 3, "sel": sel}, path)


def test_concentration_from_routing(tmp_path):
    for kind in ("random", "sinks:3"):
        _save_routing(tmp_path / f"{kind}.pt", kind)
    flat = cm.concentration_from_routing(str(tmp_path / "random.pt"))
    peaked = cm.concentration_from_routing(str(tmp_path / "sinks:3.pt"))
    assert flat < 0.6 < 2.0 < peaked, (flat, peaked)
    torch.save({"block": 64}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="lacks 'cu_seqlens'"):
        cm.concentration_from_routing(str(tmp_path / "bad.pt"))


def test_cli_help_and_small_runs(tmp_path, capsys):
    script = str(BENCH / "project_cp.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "sweep" in done.stdout
    bad = subprocess.run([sys.executable, script, "project", "--alpha", "-1"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "--alpha" in bad.stderr
    args = ["--tokens", "262144", "--world", "16", "--hq", "8", "--hkv", "2", "--layers", "2"]
    assert project_cp.main(["project", *args, "--json", str(tmp_path / "p.json")]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["winner"] in project_cp.STRATEGIES and "auto (" in capsys.readouterr().out
    assert res["auto"] in cost.STRATEGIES
    _save_routing(tmp_path / "routing.pt", "sinks:3")
    out = tmp_path / "sweep"
    sweep = [
        "sweep",
        "--tokens-grid",
        "131072,1048576",
        "--worlds",
        "8,16",
        "--alphas",
        "0,inf",
        "--focus-world",
        "16",
        "--routing",
        str(tmp_path / "routing.pt"),
    ]
    assert project_cp.main([*sweep, "--out-prefix", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["routing_alphas"]
    assert "| 1,048,576 | 16 |" in out.with_suffix(".md").read_text()
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_kernel_tables_come_from_a_bench_tool_run(tmp_path):
    from benchmarks.moba_bench.report import write_run

    t, hq, d, block, topk = 65536, 8, 128, 4096, 4
    base = dict(job="local", kind="op", T=t, nseq=1, Hq=hq, Hkv=hq, D=d, block=block, topk=topk)
    rows = [
        dict(base, case="c", backend="triton", fwd_ms=4.0, fwdbwd_ms=10.0, gate_ms=1.0,
             dense_fwd_ms=8.0, dense_fwdbwd_ms=20.0),
        dict(base, case="c", backend="dense-fa2", fwd_ms=8.0, fwdbwd_ms=20.0, dense_fwd_ms=8.0,
             dense_fwdbwd_ms=20.0),
        dict(base, case="packed", backend="triton", nseq=2, fwd_ms=1.0),  # not one sequence
        dict(job="decode", case="d", backend="triton", step_ms=1.0),  # not a kernel table row
    ]  # fmt: skip
    write_run(tmp_path / "run", dict(job="local", command="x", commit="c0", gpu="g",
                                     started="now"), rows)  # fmt: skip
    comp = project_cp.load_compute(project_cp.PRESETS["h200"], str(tmp_path / "run/rows.json"),
                                   d, block, project_cp.MOBA_BACKENDS, {})  # fmt: skip
    keys = cm.rank_keys(cm.build_geometry([t], block, 1, "contiguous"), topk)
    flops = 4.0 * d * hq * keys["moba"][0]
    assert all(v.startswith("measured, 1 points") for v in comp.labels.values()), comp.labels
    # MoBA forward without its gate: 4 - 1 ms; fwd+bwd: 3.5x the FLOPs over 10 - 1 ms.
    np.testing.assert_allclose(comp.ms("moba_fwd", np.array([flops])), [3.0], rtol=1e-9)
    np.testing.assert_allclose(comp.ms("moba_fwdbwd", np.array([3.5 * flops])), [9.0], rtol=1e-9)
    dense = 4.0 * d * hq * t * (t + 1) / 2
    np.testing.assert_allclose(comp.ms("dense_fwdbwd", np.array([3.5 * dense])), [20.0])


def test_hot_block_send_bytes_hand_worked():
    """3 ranks, one sequence of 3 blocks of 8 (contiguous: rank r holds block r), K = 2 at
    alpha = inf: every query past block 0 picks block 0. Ranks 1 and 2 each fetch block 0's 8
    rows per KV head from rank 0 and nothing else (each own block is wholly local), so rank 0
    sends 2 x 8 x Hkv rows and the others none: max / mean = 3."""
    geom = cm.build_geometry([24], 8, 3, "contiguous")
    p = cm.route_probs(cm.index_rank(geom), geom.seq_first, 2, math.inf)
    hkv, d, elem = 2, 4, 2
    u = cm.model_union(p, geom, 2)  # Hq / Hkv = 2
    rows = cm.rows_matrix(geom, np.stack([u] * hkv))
    np.testing.assert_array_equal(rows, [[0, 0, 0], [16, 0, 0], [16, 0, 0]])
    shape = cost.Shape(tokens=24, world=3, hq=4, hkv=hkv, head_dim=d, elem=elem, block=8)
    sel = cost.selective_traffic(shape, torch.from_numpy(rows))
    row = 2 * d * elem  # K and V of one (token, KV head)
    assert sel.per_rank("bytes_sent") == [32 * row, 0, 0]
    assert sel.per_rank("bytes_received") == [0, 16 * row, 16 * row]
    assert cost.send_ratio(sel) == (32 * row, 32 * row / 3, 3.0)
    # The backward returns float32 dK/dV of those rows to the hot owner: it receives them all.
    assert sel.per_rank("bwd_bytes_received")[0] == 32 * 2 * d * 4


@pytest.mark.dist
def test_hot_block_traffic_matches_gloo_on_three_ranks(tmp_path):
    """Every query's one past choice is its sequence's first block (``block0``): the owners of
    those blocks send to every other rank. The cost model fed the real routing gives every
    rank's four byte counts, sends included, to the byte."""
    cases = [(lens, "block0", 2, layout) for lens in ((768,), (384, 384))
             for layout in cm.LAYOUTS]  # fmt: skip
    for r in compare(3, cases, SHAPE, tmp_path):
        assert r["exact_stats"] == r["measured_stats"], r
        got = r["measured_stats"]["selective"]
        sent = got["bytes_sent"]
        # Hot: the owners of first blocks send all there is, some rank sends nothing.
        assert max(sent) >= 1.5 * sum(sent) / len(sent) and min(sent) == 0, got


def test_hot_cli_reports_send_bound_owners(capsys):
    args = ["hot", "--tokens", "131072", "--worlds", "16", "--alphas", "0,inf", "--hq", "8",
            "--hkv", "2", "--block", "512"]  # fmt: skip
    assert project_cp.main(args) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| 131,072 |")]
    assert len(lines) == 4, lines  # flat and hybrid-outer, two alphas
    assert all("receive" in x for x in lines[:2]) and "send (hot owners)" in lines[2], lines
