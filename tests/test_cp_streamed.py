"""Streamed CP MoBA (``strategy="streamed"``, ``parallel/streamed.py``) on gloo against the
single-device op.

Each spawned world runs many cases (a spawn costs seconds on 2 cores); every rank compares its
own shard of out, lse, dq, dk, dv and asserts, and checks the bytes its exchanges moved against
``last_stats`` and against ``strategy="selective"`` (the same rows, cut into pieces).
"""

from __future__ import annotations

import cp_cases
import pytest
import torch
import torch.distributed as dist
from cp_cases import grads_plain_twice_then_checkpointed, make_inputs, reference, seq_lens
from dist_utils import run_world

from moba_dist import MoBAContextParallel
from moba_dist.parallel import CPConfig, comm, moba_cp_attn_varlen, shard, streamed

pytestmark = pytest.mark.dist

# Float64 end to end; streamed differs from the single-device op only in summation order (partial
# centroids, one LSE merge per piece, dK/dV partials added per piece), so 1e-9 is far above
# rounding and far below any misplaced or missing row.
TOL = dict(atol=1e-9, rtol=1e-9)
HQ, D = 4, 8
ROW = 2 * D * 8  # bytes of one float64 (token, KV head) K/V row
BYTES = ("bytes_sent", "bytes_received", "bwd_bytes_sent", "bwd_bytes_received")


def make_global(lens, hkv, seed=0):
    return make_inputs(lens, HQ, hkv, D, seed)


def ByteCounter(rank, fn):
    return cp_cases.ByteCounter(rank, fn, empty_row=ROW)


def run_cp(rank, world, layout, hkv, block, topk, strategy, seed=0, **kw):
    q, k, v, dout, cu = make_global(seq_lens(world, layout), hkv, seed)
    sh = dict(rank=rank, world_size=world, layout=layout)
    lq, lk, lv = (shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v))
    stats: dict = {}
    out, lse = moba_cp_attn_varlen(
        lq, lk, lv, cu, moba_chunk_size=block, moba_topk=topk, layout=layout, strategy=strategy,
        return_lse=True, backend="reference", stats=stats, **kw,
    )  # fmt: skip
    return (q, k, v, dout, cu, sh), (out, lse, lq, lk, lv), stats


def check_case(rank, world, layout, hkv, block, topk, budget, counter, agreed=None):
    """One streamed call checked against the reference and its own byte counts; ``agreed``:
    the budget the ranks settle on (default: this rank's ``budget``)."""
    counter.reset()
    (q, k, v, dout, cu, sh), (out, lse, lq, lk, lv), stats = run_cp(
        rank, world, layout, hkv, block, topk, "streamed", max_fetch_bytes=budget
    )
    fwd = (counter.sent, counter.received, counter.calls)
    counter.reset()
    out.backward(shard(dout, cu, **sh))
    bwd = (counter.sent, counter.received, counter.calls)
    ctx = f"rank {rank}/{world} {layout} Hkv={hkv} B={block} K={topk} budget={budget}"
    want = reference(q, k, v, dout, cu, block, topk)
    got = [out, lse, lq.grad, lk.grad, lv.grad]
    for i, (name, a, b) in enumerate(zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True)):
        b = shard(b, cu, **sh, dim=1 if i == 1 else 0)
        tol = dict(atol=1e-6, rtol=1e-6) if name == "lse" else TOL  # lse is float32
        torch.testing.assert_close(a, b.to(a.dtype), **tol, msg=lambda m, n=name: f"{n} {ctx}: {m}")
    # Every rank takes the same steps; forward and backward each take them all (the backward
    # fetches again and returns gradients: two exchanges per step).
    t_local = lq.shape[0]
    agreed = agreed or budget or streamed.CPU_MAX_FETCH_BYTES
    per_owner = -(-t_local // max(1, agreed // 2 // (hkv * ROW)))
    assert stats["strategy"] == "streamed" and stats["max_fetch_bytes"] == agreed, (ctx, stats)
    assert stats["pieces"] == (world - 1) * per_owner, (ctx, stats["pieces"], per_owner)
    assert fwd[2] == stats["pieces"] and bwd[2] == 2 * stats["pieces"], (ctx, fwd, bwd)
    assert stats["max_piece_bytes"] <= max(agreed // 2, hkv * ROW), (ctx, stats)
    measured = dict(bytes_sent=fwd[0], bytes_received=fwd[1], bwd_bytes_sent=bwd[0],
                    bwd_bytes_received=bwd[1])  # fmt: skip
    for key, value in measured.items():
        assert stats[key] == value, (ctx, key, stats[key], value)
    return stats


def _grid_worker(rank, world):
    counter = ByteCounter(rank, comm.exchange_rows_async)
    comm.exchange_rows_async = counter  # this spawned process only
    tiny = 2 * 2 * ROW  # two tokens of 2 KV heads: the piece budget is one token (Hkv=2)
    cases = [  # (Hkv, block, topk, max_fetch_bytes)
        (2, 5, 2, None), (1, 5, 1, tiny), (4, 4, 100, tiny), (2, 3, 3, tiny),
        (2, 64, 2, 6 * 2 * ROW), (2, 4, 2, [tiny * (1 + r) for r in range(world)]),
    ]  # fmt: skip
    for layout in ("contiguous", "zigzag"):
        for hkv, block, topk, budget in cases:
            # A list: one budget per rank; every rank must take the smallest.
            mine, agreed = (
                (budget[rank], min(budget)) if isinstance(budget, list) else (budget, None)
            )
            stats = check_case(rank, world, layout, hkv, block, topk, mine, counter, agreed)
            if budget == tiny and world > 1:
                assert stats["pieces"] > world, stats["pieces"]
        # The same rows as selective, however they are cut.
        _, _, sel = run_cp(rank, world, layout, 2, 3, 3, "selective")
        _, _, st = run_cp(rank, world, layout, 2, 3, 3, "streamed", max_fetch_bytes=tiny)
        assert {key: st[key] for key in BYTES} == {key: sel[key] for key in BYTES}, (sel, st)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"world{w}")
def test_streamed_matches_single_device(world):
    run_world(world, _grid_worker, timeout=380)


def _checkpoint_and_determinism_worker(rank, world):
    torch.use_deterministic_algorithms(True)  # no op of the streamed path may refuse it
    q, k, v, dout, cu = make_global(seq_lens(world, "zigzag"), 2, seed=5)
    sh = dict(rank=rank, world_size=world, layout="zigzag")
    mod = MoBAContextParallel(
        5, 3, layout="zigzag", strategy="streamed", backend="reference", max_fetch_bytes=4 * ROW
    )
    grads = grads_plain_twice_then_checkpointed(mod, q, k, v, dout, cu, sh)
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.equal(a, b), "gradients are not bitwise repeatable"
    for a, b in zip(grads[0], grads[2], strict=True):
        assert torch.equal(a, b), "the checkpoint recomputation changed the gradients"
    want = reference(q, k, v, dout, cu, 5, 3)
    for a, b in zip(grads[0], want[2:], strict=True):
        torch.testing.assert_close(a, shard(b, cu, **sh), **TOL)
    assert mod.last_stats["pieces"] > world, mod.last_stats
    for key in ("strategy", "pieces", "max_piece_bytes", "bytes_received"):
        assert mod.last_recompute_stats[key] == mod.last_stats[key], key


@pytest.mark.timeout(200)
def test_checkpointing_and_bitwise_determinism():
    run_world(2, _checkpoint_and_determinism_worker, timeout=180)


def _subgroup_worker(rank, world):
    # World 4 as 2 data-parallel x 2 context-parallel: CP groups {0,1} and {2,3}. Every rank
    # creates every group (new_group is collective); each DP replica gets its own data.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group, me = groups[rank // 2], rank % 2
    for layout, seed in (("zigzag", rank // 2), ("contiguous", 10 + rank // 2)):
        q, k, v, dout, cu = make_global(seq_lens(2, layout), 2, seed)
        sh = dict(rank=me, world_size=2, layout=layout)
        leaves = [shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v)]
        out = moba_cp_attn_varlen(
            *leaves, cu, moba_chunk_size=4, moba_topk=2, layout=layout, strategy="streamed",
            process_group=group, backend="reference", max_fetch_bytes=2 * 2 * ROW,
        )  # fmt: skip
        out.backward(shard(dout, cu, **sh))
        want = reference(q, k, v, dout, cu, 4, 2)
        for a, b in zip([out, *(x.grad for x in leaves)], [want[0], *want[2:]], strict=True):
            torch.testing.assert_close(a, shard(b, cu, **sh), **TOL)


@pytest.mark.timeout(200)
def test_streamed_on_subgroup_of_larger_world():
    run_world(4, _subgroup_worker, timeout=180)


class FailOnCall:
    """Raises on the ``n``-th call (1-based) of the wrapped kernel entry, passes others."""

    def __init__(self, fn, n: int) -> None:
        self.fn, self.n, self.calls = fn, n, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("injected failure")
        return self.fn(*args, **kwargs)


def _failure_worker(rank, world):
    args = (rank, world, "contiguous", 2, 4, 2, "streamed")
    kw = dict(max_fetch_bytes=2 * 2 * ROW)
    others = r"rank\(s\) \[1\] of the process group failed during the streamed exchange"
    # Rank 1 fails on its second forward kernel call (the first piece, after the local keys).
    fwd, bwd = streamed.routed_forward, streamed.routed_backward
    if rank == 1:
        streamed.routed_forward = FailOnCall(fwd, 2)
    with pytest.raises(RuntimeError, match="injected failure" if rank == 1 else others):
        run_cp(*args, **kw)
    streamed.routed_forward = fwd
    # Rank 1 fails in the backward, in the middle of the pieces.
    (_, _, _, dout, cu, sh), (out, *_), _ = run_cp(*args, **kw)
    if rank == 1:
        streamed.routed_backward = FailOnCall(bwd, 3)
    with pytest.raises(RuntimeError, match="injected failure" if rank == 1 else others):
        out.backward(shard(dout, cu, **sh))
    streamed.routed_backward = bwd
    # Nobody was left behind in an exchange: the group still works, results still exact.
    counter = ByteCounter(rank, comm.exchange_rows_async)
    comm.exchange_rows_async = counter  # this spawned process only
    check_case(rank, world, "contiguous", 2, 4, 2, 2 * 2 * ROW, counter)


@pytest.mark.timeout(200)
def test_failing_rank_raises_on_every_rank():
    run_world(3, _failure_worker, timeout=180)


def test_max_fetch_bytes_is_validated():
    with pytest.raises(ValueError, match="max_fetch_bytes must be >= 1, got 0"):
        CPConfig(4, 2, strategy="streamed", max_fetch_bytes=0)
    with pytest.raises(TypeError, match="max_fetch_bytes must be an int >= 1, got float"):
        MoBAContextParallel(4, 2, strategy="streamed", max_fetch_bytes=1.5)
    with pytest.raises(ValueError, match="keep_fetched=True"):
        CPConfig(4, 2, strategy="streamed", keep_fetched=True)
    assert streamed.default_max_fetch_bytes(torch.device("cpu")) == 1 << 30
