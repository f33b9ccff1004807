"""examples/train_cp.py end to end: resume loses no step, CP and DP x CP match their unsplit
runs, the hybrid schedule switches, text runs report held-out bits per byte."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--seq-len", "256", "--block", "32", "--dim", "32", "--batch-size", "2",
         "--eval-batches", "1", "--warmup", "2"]  # fmt: skip
KV = ["--data", "kv", "--pairs", "4", "--queries", "4"]
# The subprocess runs in this interpreter's environment: the plot exists iff matplotlib does.
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def train(out_dir, *extra, nproc=None, timeout=240):
    script = os.path.join(ROOT, "examples", "train_cp.py")
    if nproc is None:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", script]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [*cmd, *SMALL, "--out-dir", str(out_dir), *extra],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    with open(os.path.join(out_dir, "metrics.json")) as f:
        blob = json.load(f)
    blob["stdout"] = res.stdout
    return blob


def losses(results, name="moba"):
    return [h["loss"] for h in results[name]["history"]]


def test_resume_loses_no_completed_step(tmp_path):
    straight = train(tmp_path / "a", *KV, "--steps", "5")["results"]
    train(tmp_path / "b", *KV, "--steps", "3", "--save-every", "1")
    resumed = train(tmp_path / "b", *KV, "--steps", "5", "--resume")["results"]
    # Same seeds, same batches (seeded by step), optimizer state restored: the interrupted run
    # continues exactly where it stopped. Float32 on one CPU process is bitwise repeatable.
    assert [h["step"] for h in resumed["moba"]["history"]] == list(range(5))
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-6, abs=1e-6)
    assert os.path.exists(tmp_path / "a" / "loss.png") == HAS_MPL


def test_text_run_reports_heldout_bits_per_byte(tmp_path):
    blob = train(tmp_path, "--steps", "30", "--eval-every", "15", "--lr", "1e-2")
    final = blob["results"]["moba"]["final"]["bpb"]
    corpus = blob["corpus"]
    assert corpus["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert len(corpus["sha256_train"]) == 64 and corpus["heldout_files"] >= 1
    # Bits per byte of a byte model: uniform guessing is 8; the training split's byte
    # frequencies give the unigram baseline, which 30 steps of a context model beat clearly.
    assert 0 < blob["unigram_bpb"] < 8
    assert final["all"] < 0.9 * blob["unigram_bpb"]
    assert [e["tokens"] for e in blob["results"]["moba"]["evals"]] == [15 * 512, 30 * 512]
    assert "unigram baseline" in blob["stdout"] and "retrieval" not in blob["stdout"]


@pytest.mark.dist
def test_cp_run_matches_one_process(tmp_path):
    # CP is exact attention split over ranks: 2 CP ranks compute the same losses as one process
    # up to float32 reduction order (gloo sums the two halves' gradients); measured equal to
    # the last bit, 1e-5 leaves room for another summation order.
    one = train(tmp_path / "one", *KV, "--steps", "3")["results"]
    two = train(tmp_path / "two", *KV, "--steps", "3", nproc=2)
    assert "CP K/V received per step (mean over ranks)" in two["stdout"]
    assert losses(two["results"]) == pytest.approx(losses(one), rel=1e-5)


@pytest.mark.dist
def test_dp_by_cp_mesh_and_hybrid_schedule(tmp_path):
    hybrid = ["--dp", "2", "--layers", "2", "--full-layers", "1", "--compare-full"]
    mesh = train(tmp_path / "m", *KV, "--steps", "3", *hybrid, "--full-attn-final-frac", "1",
                 nproc=4)["results"]  # fmt: skip
    dp_only = train(tmp_path / "d", *KV, "--steps", "3", *hybrid, "--full-attn-final-frac", "1",
                    nproc=2)["results"]  # fmt: skip
    # dp 2 x cp 2 sees the same batches as dp 2 x cp 1 (seeded by dp rank): same losses up to
    # reduction order (measured 1e-7 relative).
    assert losses(mesh) == pytest.approx(losses(dp_only), rel=1e-5)
    # final-frac 1: every step at full attention, so the MoBA model is the full one exactly.
    assert losses(mesh) == pytest.approx(losses(mesh, "full"), rel=1e-6)
    assert os.path.exists(tmp_path / "m" / "loss.png") == HAS_MPL
    assert os.path.exists(tmp_path / "m" / "routing.pt")
    moba = train(tmp_path / "x", *KV, "--steps", "3", *hybrid, nproc=4)["results"]
    # Without the switch the first layer routes (8 blocks, topk 3), so after two updates its
    # loss has left the full model's by far more than the 1e-5 agreement above (8e-4 measured).
    assert not math.isclose(losses(moba)[2], losses(moba, "full")[2], rel_tol=1e-4)


def test_dense_full_equals_moba_full_attention(tmp_path):
    # --dense-full swaps MoBA-with-every-block for SDPA in full layers: the same function, so the
    # outputs and gradients agree to float32 rounding (different summation orders: ~1e-7).
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        _dense_full_check()
    finally:
        dist.destroy_process_group()


def _dense_full_check():
    import torch

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from tiny_llama import ModelConfig, TinyLlama, dense_causal

    cfg = dict(vocab=50, dim=32, layers=2, heads=4, kv_heads=2, block=16, topk=2, full_layers=2,
               max_seq_len=64, backend="reference")  # fmt: skip
    tokens = torch.randint(0, 50, (128,), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(64).repeat(2)
    cu = torch.tensor([0, 64, 128], dtype=torch.int32)
    results = []
    for dense in (False, True):
        torch.manual_seed(0)
        model = TinyLlama(ModelConfig(**cfg, dense_full=dense))
        logits = model(tokens, pos, cu)
        logits.square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((logits.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # --local-warmup: every layer own block only, and the next step's schedule restores it.
    model.set_local_attention()
    assert {a.attn.config.moba_topk for a in model.attention_layers()} == {1}
    model.set_full_attention(False)
    assert {a.attn.config.moba_topk for a in model.attention_layers()} == {
        a.full_topk for a in model.attention_layers()
    }
    with pytest.raises(ValueError, match="equal-length"):
        dense_causal(torch.zeros(5, 4, 8), torch.zeros(5, 2, 8), torch.zeros(5, 2, 8), cu)
