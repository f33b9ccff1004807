"""Head-parallel CP MoBA (``moba_dist.parallel.heads``) on gloo against the single-device op.

Each spawned world runs every case (a spawn costs seconds on 2 cores); every rank compares its
own shard of out, lse, dq, dk, dv and asserts. The traffic each rank reports is checked against
the bytes the comm layer actually moved and against the cost model.
"""

from __future__ import annotations

import pytest
import torch
from cp_cases import ByteCounter, make_inputs, reference, seq_lens
from dist_utils import run_world

from moba_dist.parallel import comm, cost_model, shard
from moba_dist.parallel.heads import Heads, moba_heads_attn_varlen, moba_hybrid_attn_varlen

pytestmark = pytest.mark.dist

# Float64 end to end. Each rank runs the single-device op itself on whole sequences for its
# heads, so only the replicated-KV gradient sum (partials added in another order) differs from
# the single-device op: 1e-9 is far above that rounding and far below any misplaced row.
TOL = dict(atol=1e-9, rtol=1e-9)
HQ, D = 12, 8  # 12 heads split over 1, 2, 3 and 4 ranks


def make_global(lens, hkv, seed=0):
    return make_inputs(lens, HQ, hkv, D, seed)


STATS = ("bytes_sent", "bytes_received", "bwd_bytes_sent", "bwd_bytes_received")


def check_case(rank, world, layout, hkv, block, topk, counter, seed=0):
    q, k, v, dout, cu = make_global(seq_lens(world, layout), hkv, seed)
    want = reference(q, k, v, dout, cu, block, topk)
    sh = dict(rank=rank, world_size=world, layout=layout)
    lq, lk, lv = (shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v))
    stats: dict = {}
    counter.sent = counter.received = 0
    out, lse = moba_heads_attn_varlen(
        lq, lk, lv, cu, moba_chunk_size=block, moba_topk=topk, layout=layout,
        backend="reference", return_lse=True, stats=stats,
    )  # fmt: skip
    fwd = (counter.sent, counter.received)
    counter.sent = counter.received = 0
    out.backward(shard(dout, cu, **sh))
    ctx = f"rank {rank}/{world} {layout} Hkv={hkv} B={block} K={topk}"
    got = [out, lse, lq.grad, lk.grad, lv.grad]
    for i, (name, a, b) in enumerate(zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True)):
        b = shard(b, cu, **sh, dim=1 if i == 1 else 0)
        tol = dict(atol=1e-6, rtol=1e-6) if name == "lse" else TOL  # lse is float32
        torch.testing.assert_close(a, b.to(a.dtype), **tol, msg=lambda m, n=name: f"{n} {ctx}: {m}")
    # The lse exchange of return_lse (one value per query head and token) is not in the stats.
    lse_bytes = (world - 1) * lq.shape[0] * (HQ // world) * lse.element_size()
    measured = dict(bytes_sent=fwd[0] - lse_bytes, bytes_received=fwd[1] - lse_bytes,
                    bwd_bytes_sent=counter.sent, bwd_bytes_received=counter.received)  # fmt: skip
    predicted = cost_model.heads_traffic(
        cost_model.Shape(tokens=int(cu[-1]), world=world, hq=HQ, hkv=hkv, head_dim=D, elem=8)
    )
    for key, value in measured.items():
        assert stats[key] == value, (ctx, key, stats[key], value)
        assert predicted.per_rank(key)[rank] == value, (ctx, key, predicted.per_rank(key), value)
    assert stats["kv_replicated"] == (world > 1 and hkv % world != 0), ctx


def _grid_worker(rank, world):
    counter = ByteCounter(rank, comm.all_to_all_variable)
    comm.all_to_all_variable = counter  # this spawned process only
    for layout in ("contiguous", "zigzag"):
        for hkv in (1, 3, 4, 12):  # MQA, GQA 4:1 and 3:1 (replicated or straddling), MHA
            for block, topk in ((5, 2), (3, 1), (4, 100)):
                check_case(rank, world, layout, hkv, block, topk, counter)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"world{w}")
def test_heads_matches_single_device(world):
    run_world(world, _grid_worker, timeout=280)


def _errors_worker(rank, world):
    q, k, v, _, cu = make_global(seq_lens(world, "contiguous"), 2)
    lq, lk, lv = (shard(x, cu, rank=rank, world_size=world) for x in (q, k, v))
    hq8 = lq[:, :8]  # 8 query heads over 3 ranks
    with pytest.raises(ValueError, match=r"Hq=8 over 3 ranks"):
        moba_heads_attn_varlen(hq8, lk, lv, cu, moba_chunk_size=4, moba_topk=2)
    # One rank's bad shard raises there and makes the others raise instead of hang.
    bad = [x[:-1] for x in (lq, lk, lv)] if rank == 1 else [lq, lk, lv]
    expected = f"got {lq.shape[0] - 1}" if rank == 1 else r"rank\(s\) \[1\]"
    with pytest.raises(ValueError, match=expected):
        moba_heads_attn_varlen(*bad, cu, moba_chunk_size=4, moba_topk=2)
    topk = 2 if rank == 0 else 3
    with pytest.raises(ValueError, match=r"moba_topk: rank 0=2, rank 1=3"):
        moba_heads_attn_varlen(lq, lk, lv, cu, moba_chunk_size=4, moba_topk=topk)


@pytest.mark.timeout(200)
def test_bad_inputs_raise_on_every_rank():
    run_world(3, _errors_worker, timeout=180)


def _staged_worker(rank, world):
    # Force the host staging path of comm (taken for CUDA tensors on gloo) on CPU tensors: the
    # async handle must copy the gathered rows into the output only at wait().
    comm.needs_staging = lambda x, group: True
    group = comm.resolve_group(None)
    x = torch.full((3, 2), float(rank), dtype=torch.bfloat16)
    out = torch.empty(world, 3, 2, dtype=torch.bfloat16)
    work = comm.all_gather_into(out, x, group, async_op=True)
    work.wait()
    assert [int(out[r, 0, 0]) for r in range(world)] == list(range(world))
    counts = [r + 1 for r in range(world)]  # rank r sends r + 1 rows to everyone
    got = comm.all_to_all_variable(
        torch.full((world * (rank + 1), 2), float(rank)), [rank + 1] * world, counts, group
    )
    assert got[:, 0].tolist() == [float(r) for r in range(world) for _ in range(r + 1)]
    counter = ByteCounter(rank, comm.all_to_all_variable)
    comm.all_to_all_variable = counter
    check_case(rank, world, "zigzag", 3, 5, 2, counter)
    check_adapter(rank, world)


def check_adapter(rank, world):
    """The runtime adapter on a CPContext and CPConfig gives the function's out, lse and bytes."""
    from moba_dist.parallel import CPContext
    from moba_dist.parallel.config import CPConfig

    q, k, v, _, cu = make_global(seq_lens(world, "zigzag"), 4, seed=5)
    sh = dict(rank=rank, world_size=world, layout="zigzag")
    lq, lk, lv = (shard(x, cu, **sh) for x in (q, k, v))
    ctx = CPContext.build(cu, moba_chunk_size=4, layout="zigzag")
    cfg = CPConfig(moba_chunk_size=4, moba_topk=3, backend="reference", layout="zigzag")
    out, lse, traffic = Heads.run(lq, lk, lv, ctx, cfg)
    stats: dict = {}
    want = moba_heads_attn_varlen(lq, lk, lv, cu, moba_chunk_size=4, moba_topk=3,
                                  layout="zigzag", backend="reference", return_lse=True,
                                  stats=stats)  # fmt: skip
    torch.testing.assert_close(out, want[0], rtol=0, atol=0)
    torch.testing.assert_close(lse, want[1], rtol=0, atol=0)
    assert traffic == {key: stats[key] for key in traffic} and len(traffic) == 4


@pytest.mark.timeout(200)
def test_host_staging_path():
    run_world(2, _staged_worker, timeout=180)


def _subgroup_worker(rank, world):
    # World 4 as 2 data-parallel x 2 context-parallel groups {0,1} and {2,3}; each replica has
    # its own data. Then, on the CP group: activation checkpointing (the exchanges run again
    # in the backward, in the same order on every rank) and bitwise repeatability.
    import torch.distributed as dist
    from torch.utils.checkpoint import checkpoint

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group, cp_rank, seed = groups[rank // 2], rank % 2, rank // 2
    q, k, v, dout, cu = make_global(seq_lens(2, "zigzag"), 3, seed)
    want = reference(q, k, v, dout, cu, 4, 2)
    sh = dict(rank=cp_rank, world_size=2, layout="zigzag")
    kw = dict(moba_chunk_size=4, moba_topk=2, layout="zigzag", backend="reference",
              process_group=group)  # fmt: skip

    def grads(use_checkpoint: bool):
        leaves = [shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v)]
        if use_checkpoint:
            out = checkpoint(moba_heads_attn_varlen, *leaves, cu, use_reentrant=False, **kw)
        else:
            out = moba_heads_attn_varlen(*leaves, cu, **kw)
        out.backward(shard(dout, cu, **sh))
        return [out.detach(), *(x.grad for x in leaves)]

    plain, again, ckpt = grads(False), grads(False), grads(True)
    for name, a, b, c, w in zip(("out", "dq", "dk", "dv"), plain, again, ckpt,
                                (want[0], *want[2:]), strict=True):  # fmt: skip
        torch.testing.assert_close(a, shard(w, cu, **sh), **TOL, msg=f"{name} rank {rank}")
        assert torch.equal(a, b) and torch.equal(a, c), f"{name} not repeatable on rank {rank}"


@pytest.mark.timeout(200)
def test_dp_subgroups_checkpointing_and_repeatability():
    run_world(4, _subgroup_worker, timeout=180)


def _hybrid_worker(rank, world):
    # World 4 = 2 sub-groups of 2 (heads inside {0,1}, {2,3}) x sequence CP across ({0,2},
    # {1,3}); global shard rank = outer rank * 2 + inner rank = rank.
    import torch.distributed as dist

    inner = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    outer = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    counter = ByteCounter(rank % 2, comm.all_to_all_variable)  # inner rank: self-copies free
    comm.all_to_all_variable = counter
    for layout in ("contiguous", "zigzag"):
        for hkv, strategy in ((2, "selective"), (1, "allgather"), (4, "auto")):
            q, k, v, dout, cu = make_global(seq_lens(world, layout), hkv, seed=hkv)
            want = reference(q, k, v, dout, cu, 4, 2)
            sh = dict(rank=rank, world_size=world, layout=layout)
            lq, lk, lv = (shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v))
            stats: dict = {}
            counter.sent = counter.received = 0
            out, lse = moba_hybrid_attn_varlen(
                lq, lk, lv, cu, moba_chunk_size=4, moba_topk=2, inner_group=inner,
                outer_group=outer, layout=layout, backend="reference", outer_strategy=strategy,
                return_lse=True, stats=stats,
            )  # fmt: skip
            # The inner lse exchange (the outer call's lse dtype) is not in the stats.
            lse_bytes = (2 - 1) * lq.shape[0] * (HQ // 2) * lse.element_size()
            fwd = (counter.sent - lse_bytes, counter.received - lse_bytes)
            counter.sent = counter.received = 0
            out.backward(shard(dout, cu, **sh))
            ctx = f"hybrid rank {rank} {layout} Hkv={hkv} {strategy}"
            counted = dict(zip(STATS, (*fwd, counter.sent, counter.received), strict=True))
            model = cost_model.heads_traffic(  # the cost model's inner level of hybrid
                cost_model.Shape(
                    tokens=int(cu[-1]) // 2, world=2, hq=HQ, hkv=hkv, head_dim=D, elem=8
                )
            )
            for key, n in counted.items():  # stats = inner exchanges (counted) + the outer call's
                assert stats[key] == n + stats["outer"][key], (ctx, key, stats[key], n)
                assert model.per_rank(key)[rank % 2] == n, (ctx, key, model.per_rank(key), n)
            got = [out, lse, lq.grad, lk.grad, lv.grad]
            for j, (a, b) in enumerate(zip(got, want, strict=True)):
                b = shard(b, cu, **sh, dim=1 if j == 1 else 0)
                tol = dict(atol=1e-6, rtol=1e-6) if j == 1 else TOL
                torch.testing.assert_close(
                    a, b.to(a.dtype), **tol, msg=lambda m, c=ctx: f"{c}: {m}"
                )
            assert stats["strategy"] == "hybrid" and stats["sub_group_size"] == 2, ctx
            assert stats["outer_strategy"] in ("selective", "allgather"), ctx


@pytest.mark.timeout(300)
def test_hybrid_matches_single_device():
    run_world(4, _hybrid_worker, timeout=280)


def _hybrid_groups_worker(rank, world):
    import torch.distributed as dist

    # Outer groups of consecutive ranks: the shard layout rank = outer * 2 + inner breaks.
    inner = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    outer = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    q, k, v, _, cu = make_global(seq_lens(world, "contiguous"), 2)
    local = [shard(x, cu, rank=rank, world_size=world) for x in (q, k, v)]
    with pytest.raises(ValueError, match=r"split process_group|rank\(s\) \[1, 2\]"):
        moba_hybrid_attn_varlen(*local, cu, moba_chunk_size=4, moba_topk=2, inner_group=inner,
                                outer_group=outer)  # fmt: skip


@pytest.mark.timeout(200)
def test_hybrid_rejects_mismatched_groups_on_every_rank():
    run_world(4, _hybrid_groups_worker, timeout=180)


def _bf16_worker(rank, world):
    # Replicated KV heads (Hkv = 4 over 3 ranks): dK/dV of a replicated head is the sum of
    # partial gradients the local op already rounded to bf16, one rounding more than the
    # single-device op. The bound: within 2x of that op's own bf16 error (vs float32).
    q, k, v, dout, cu = make_global(seq_lens(world, "zigzag"), 4, seed=7)
    sh = dict(rank=rank, world_size=world, layout="zigzag")
    want32 = reference(*(x.float() for x in (q, k, v, dout)), cu, 4, 3)
    base = reference(*(x.bfloat16() for x in (q, k, v, dout)), cu, 4, 3)
    lq, lk, lv = (shard(x, cu, **sh).bfloat16().requires_grad_() for x in (q, k, v))
    out = moba_heads_attn_varlen(lq, lk, lv, cu, moba_chunk_size=4, moba_topk=3,
                                 layout="zigzag", backend="reference")  # fmt: skip
    out.backward(shard(dout, cu, **sh).bfloat16())
    for name, got, i in (("out", out, 0), ("dq", lq.grad, 2), ("dk", lk.grad, 3),
                         ("dv", lv.grad, 4)):  # fmt: skip
        ref, own = (shard(x[i], cu, **sh).double() for x in (want32, base))
        err = ((got.double() - ref).norm() / ref.norm()).item()
        own_err = ((own - ref).norm() / ref.norm()).item()
        assert got.dtype == torch.bfloat16 and err <= 2 * own_err, (name, rank, err, own_err)


@pytest.mark.timeout(200)
def test_bf16_replicated_kv_within_twice_the_ops_error():
    run_world(3, _bf16_worker, timeout=180)
