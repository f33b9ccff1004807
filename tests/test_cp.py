"""Context-parallel MoBA on gloo against the single-process op on the unsharded input.

Each spawned world runs many cases (a spawn costs seconds on 2 cores); every rank compares its
own shard of out, lse, dq, dk, dv and asserts.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from cp_cases import grads_plain_twice_then_checkpointed, make_inputs, reference, seq_lens
from dist_utils import run_world
from torch.utils._python_dispatch import TorchDispatchMode

from moba_dist import MoBAContextParallel
from moba_dist.parallel import CPContext, moba_cp_attn_varlen, pad_for_cp, shard

pytestmark = pytest.mark.dist

# Float64 end to end; CP differs from the single-process op only in summation order (partial
# centroids, LSE merge of two key sets), so 1e-9 is far above rounding and far below any real bug.
TOL = dict(atol=1e-9, rtol=1e-9)
HQ, HKV, D = 4, 2, 8


def make_global(lens, seed=0, hq=HQ, hkv=HKV):
    return make_inputs(lens, hq, hkv, D, seed)


def check_case(rank, world, layout, block, topk, strategy, group=None, seed=0, **kw):
    q, k, v, dout, cu = make_global(seq_lens(world, layout), seed)
    want = reference(q, k, v, dout, cu, block, topk)
    sh = dict(rank=rank, world_size=world, layout=layout)
    lq, lk, lv = (shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v))
    out, lse = moba_cp_attn_varlen(
        lq, lk, lv, cu, moba_chunk_size=block, moba_topk=topk, layout=layout, strategy=strategy,
        process_group=group, return_lse=True, backend="reference", **kw,
    )  # fmt: skip
    out.backward(shard(dout, cu, **sh))
    got = [out, lse, lq.grad, lk.grad, lv.grad]
    want_local = [shard(w, cu, **sh, dim=1 if i == 1 else 0) for i, w in enumerate(want)]
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, want_local, strict=True):
        tol = dict(atol=1e-6, rtol=1e-6) if name == "lse" else TOL  # lse is float32 by contract
        ctx = f"{name} rank {rank}/{world} {layout} B={block} K={topk} {strategy}"
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, c=ctx: f"{c}: {m}")


def _grid_worker(rank, world):
    for layout in ("contiguous", "zigzag"):
        for block, topk in ((5, 1), (5, 2), (3, 3), (4, 100), (64, 2)):
            for strategy in ("selective", "allgather", "auto"):
                check_case(rank, world, layout, block, topk, strategy)
    check_case(rank, world, "zigzag", 5, 3, "selective", keep_fetched=True)


@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"world{w}")
def test_cp_matches_single_process(world):
    run_world(world, _grid_worker)


def _subgroup_worker(rank, world):
    # World 4 as 2 data-parallel x 2 context-parallel: CP groups {0,1} and {2,3}. Every rank
    # creates every group (new_group is collective); each DP replica gets its own data.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    check_case(rank % 2, 2, "zigzag", 5, 2, "selective", group=group, seed=rank // 2)
    check_case(rank % 2, 2, "contiguous", 4, 3, "auto", group=group, seed=10 + rank // 2)


def test_cp_on_subgroup_of_larger_world():
    run_world(4, _subgroup_worker)


def _mismatch_worker(rank, world):
    q, k, v, _, cu = make_global(seq_lens(world, "contiguous"))
    lq, lk, lv = (shard(x, cu, rank=rank, world_size=world) for x in (q, k, v))
    topk = 2 if rank == 0 else 3  # rank 1 disagrees
    with pytest.raises(ValueError, match=r"moba_topk: rank 0=2, rank 1=3"):
        moba_cp_attn_varlen(lq, lk, lv, cu, moba_chunk_size=4, moba_topk=topk)
    # The gate's precision is part of the fingerprint: ranks must route alike.
    prec = "float32" if rank == 0 else "bf16x2"
    with pytest.raises(ValueError, match=r"gate_precision: rank 0=0, rank 1=1"):
        moba_cp_attn_varlen(lq, lk, lv, cu, moba_chunk_size=4, moba_topk=2, gate_precision=prec)
    # A wrong shard size on one rank raises there and makes the others raise instead of hang.
    bad = [x[:-1] for x in (lq, lk, lv)] if rank == 1 else [lq, lk, lv]
    expected = f"got {lq.shape[0] - 1}" if rank == 1 else r"rank\(s\) \[1\]"
    with pytest.raises(ValueError, match=expected):
        moba_cp_attn_varlen(*bad, cu, moba_chunk_size=4, moba_topk=2)


def test_config_mismatch_raises_on_every_rank():
    run_world(2, _mismatch_worker)


def _concentrated_worker(rank, world):
    # Keys of block 0 of the long sequence are large and aligned with every query, so every
    # query's only past choice (K=2) is block 0: rank r must fetch exactly block 0's rows of
    # both KV heads plus its own blocks' causal prefixes on other ranks, nothing more.
    block, lens = 8, [64 * world]
    q, k, v, _, cu = make_global(lens, seed=3)
    q = q.abs()
    k[:block] = 5.0
    lq, lk, lv = (shard(x, cu, rank=rank, world_size=world).requires_grad_() for x in (q, k, v))
    mod = MoBAContextParallel(block, 2, strategy="selective", backend="reference")
    mod(lq, lk, lv, cu).sum().backward()
    t_local = 64
    start = rank * t_local
    rows = 0 if rank == 0 else block  # block 0 lives on rank 0
    if start % block:  # own block starts on the previous rank: its prefix is fetched too
        rows += start % block
    row_bytes = 2 * D * 8  # K and V, float64
    assert mod.last_stats["bytes_received"] == rows * HKV * row_bytes, mod.last_stats
    assert mod.last_stats["strategy"] == "selective"
    # Backward: the same rows are fetched again, and dK/dV rows go back to their owners. Rank 0
    # serves block 0 to each of the world - 1 others; own blocks start on the rank (64 % 8 == 0),
    # so nothing else is served. Gradients are float64 here, rows as wide as K/V rows.
    served = (world - 1) * block if rank == 0 else 0
    assert mod.last_stats["bwd_bytes_received"] == (rows + served) * HKV * row_bytes
    assert mod.last_stats["bwd_bytes_sent"] == (served + rows) * HKV * row_bytes
    ag = MoBAContextParallel(block, 2, strategy="allgather", backend="reference")
    ag(lq, lk, lv, cu)
    assert ag.last_stats["bytes_received"] == (world - 1) * t_local * HKV * row_bytes


def test_selective_moves_only_selected_rows():
    run_world(3, _concentrated_worker)


def _checkpoint_and_determinism_worker(rank, world):
    torch.use_deterministic_algorithms(True)  # no op of the CP path may refuse it
    q, k, v, dout, cu = make_global(seq_lens(world, "zigzag"), seed=5)
    sh = dict(rank=rank, world_size=world, layout="zigzag")
    mod = MoBAContextParallel(5, 3, layout="zigzag", backend="reference")
    grads = grads_plain_twice_then_checkpointed(mod, q, k, v, dout, cu, sh)
    for a, b in zip(grads[0], grads[1], strict=True):
        assert torch.equal(a, b), "gradients are not bitwise repeatable"
    for a, b in zip(grads[0], grads[2], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert mod.last_recompute_stats, "recompute must report its own stats"
    # The recomputed forward routes exactly as the first one, so it moves the same bytes.
    for key in ("strategy", "bytes_sent", "bytes_received"):
        assert mod.last_recompute_stats[key] == mod.last_stats[key], key
    # Inside torch.compile the op is a graph break, never an error, and the result is unchanged.
    leaves = [shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v)]
    out = torch.compile(lambda a, b, c: mod(a * 1.0, b, c, cu) * 2.0, backend="aot_eager")(*leaves)
    out.backward(shard(dout, cu, **sh) * 0.5)
    for a, b in zip([x.grad for x in leaves], grads[0], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_checkpointing_and_bitwise_determinism():
    run_world(2, _checkpoint_and_determinism_worker)


def _padding_worker(rank, world):
    lens = [9, 14]  # neither layout holds without padding for world 2
    for layout in ("contiguous", "zigzag"):
        q, k, v, dout, cu = make_global(lens, seed=7)
        want = reference(q, k, v, dout, cu, 4, 2)
        plan = pad_for_cp(cu, world_size=world, layout=layout)
        sh = dict(rank=rank, world_size=world, layout=layout)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        local = [shard(plan.pad(x), plan.cu_seqlens, **sh) for x in leaves]
        out = moba_cp_attn_varlen(
            *local, plan.cu_seqlens, moba_chunk_size=4, moba_topk=2, layout=layout,
            backend="reference",
        )  # fmt: skip
        keep = plan.local_real_index(rank)
        real_pos = plan.real_index.new_tensor(
            [i for i, p in enumerate(plan.real_index.tolist()) if p in set(
                shard(torch.arange(plan.cu_seqlens[-1].item()), plan.cu_seqlens, **sh).tolist())]
        )  # fmt: skip
        torch.testing.assert_close(out.index_select(0, keep), want[0][real_pos], **TOL)
        # Gradients reach the real tokens only; summed over ranks they equal the reference.
        out.index_select(0, keep).backward(dout[real_pos])
        for leaf, ref_grad in zip(leaves, want[2:], strict=True):
            total = leaf.grad.clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, ref_grad, **TOL)


def test_padding_for_cp():
    run_world(2, _padding_worker)


def _context_worker(rank, world):
    # One CPContext per batch, shared by two layers, gives bitwise the result of cu_seqlens.
    q, k, v, _, cu = make_global(seq_lens(world, "zigzag"), seed=11)
    sh = dict(rank=rank, world_size=world, layout="zigzag")
    ctx = CPContext.build(cu, moba_chunk_size=5, layout="zigzag")
    assert (ctx.rank, ctx.world, ctx.num_tokens) == (rank, world, int(cu[-1]))
    layers = [MoBAContextParallel(5, k_, layout="zigzag", backend="reference") for k_ in (2, 3)]
    lq, lk, lv = (shard(x, cu, **sh) for x in (q, k, v))
    for layer in layers:
        assert torch.equal(layer(lq, lk, lv, ctx), layer(lq, lk, lv, cu))
    # A context built for another chunk size or layout is refused on every rank.
    with pytest.raises(ValueError, match=r"moba_chunk_size=5, the layer uses moba_chunk_size=4"):
        MoBAContextParallel(4, 2, layout="zigzag", backend="reference")(lq, lk, lv, ctx)
    with pytest.raises(ValueError, match=r"layout='zigzag', the layer uses layout='contiguous'"):
        MoBAContextParallel(5, 2, backend="reference")(lq, lk, lv, ctx)
    # With a context the layer's fingerprint rides on the need exchange (no handshake of its
    # own); a disagreement or a bad shard on one rank still raises on every rank, and the
    # group stays usable afterwards (every rank left the same collectives behind).
    want = layers[0](lq, lk, lv, ctx)
    bad_topk = MoBAContextParallel(5, 2 if rank == 0 else 3, layout="zigzag", backend="reference")
    with pytest.raises(ValueError, match=r"moba_topk: rank 0=2, rank 1=3"):
        bad_topk(lq, lk, lv, ctx)
    short = [x[:-1] for x in (lq, lk, lv)] if rank == 1 else [lq, lk, lv]
    expected = f"got {lq.shape[0] - 1}" if rank == 1 else r"rank\(s\) \[1\]"
    with pytest.raises(ValueError, match=expected):
        layers[0](*short, ctx)
    assert torch.equal(layers[0](lq, lk, lv, ctx), want)
    # A whole-call strategy (heads) runs through the same module and context.
    heads = MoBAContextParallel(5, 2, layout="zigzag", strategy="heads", backend="reference")
    torch.testing.assert_close(heads(lq, lk, lv, ctx), want, **TOL)
    assert heads.last_stats["strategy"] == "heads" and heads.last_stats["bytes_sent"] > 0
    # Ranks disagreeing on the batch raise at build time, all of them.
    bad = cu.clone()
    if rank == 1:
        bad[1] += 2 * world
        bad[2] += 2 * world
    with pytest.raises(ValueError, match="cu_seqlens_hash"):
        CPContext.build(bad, moba_chunk_size=5, layout="zigzag")


def test_context_built_once_per_batch():
    run_world(2, _context_worker)


def _sync_sites_worker(rank, world):
    # The CP runtime itself (moba_dist/parallel) makes no data-dependent op per layer call with
    # a context: its one host read (the plan's counts, a .tolist() that no dispatch mode sees
    # on the CPU) is the only device-to-host read it adds on CUDA. Every op whose output size
    # or value needs the host is recorded with the innermost moba_dist frame that called it;
    # the kernels' own sites (CPU reference paths, shared with the local op) are not counted.
    q, k, v, dout, cu = make_global([64 * world], seed=17)
    ctx = CPContext.build(cu, moba_chunk_size=8)
    leaves = [shard(x, cu, rank=rank, world_size=world).requires_grad_() for x in (q, k, v)]
    grad = shard(dout, cu, rank=rank, world_size=world)
    for strategy in ("selective", "allgather"):
        mod = MoBAContextParallel(8, 3, strategy=strategy, backend="reference")
        with HostReads() as reads:
            mod(*leaves, ctx).backward(grad)
        mine = [site for site in reads.sites if "/parallel/" in site]
        assert not mine, f"{strategy}: host reads in the CP runtime: {mine}"
        assert reads.sites, "the recorder must see the kernels' own sites (else it is blind)"


class HostReads(TorchDispatchMode):
    """Records ops that read device values on the host (or size outputs by them)."""

    OPS = frozenset({
        torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
        torch.ops.aten._unique2.default, torch.ops.aten.unique_consecutive.default,
        torch.ops.aten.unique_dim.default, torch.ops.aten.masked_select.default,
        torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default,
    })  # fmt: skip

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reads = func in self.OPS or (
            func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        )
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default):
            reads = any(getattr(i, "dtype", None) == torch.bool for i in args[1] if i is not None)
        if reads:
            frames = [f for f in traceback.extract_stack() if "/moba_dist/" in f.filename]
            self.sites.append(f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?")
        return func(*args, **kwargs)


def test_cp_runtime_adds_no_host_reads():
    run_world(2, _sync_sites_worker)


def _empty_sequence_worker(rank, world):
    # Repeated offsets (empty sequences) anywhere, including first and last, contribute
    # nothing: CP on the batch with them equals the reference on the batch without them.
    for layout in ("contiguous", "zigzag"):
        q, k, v, dout, cu = make_global(seq_lens(world, layout), seed=13)
        want = reference(q, k, v, dout, cu, 4, 2)
        c = cu.tolist()
        cu_empty = torch.tensor([0, 0, c[1], c[1], *c[2:], c[-1]], dtype=torch.int32)
        sh = dict(rank=rank, world_size=world, layout=layout)
        lq, lk, lv = (shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v))
        out = moba_cp_attn_varlen(
            lq, lk, lv, cu_empty, moba_chunk_size=4, moba_topk=2, layout=layout,
            backend="reference",
        )  # fmt: skip
        out.backward(shard(dout, cu, **sh))
        for a, b in zip([out, lq.grad, lk.grad, lv.grad], [want[0], *want[2:]], strict=True):
            torch.testing.assert_close(a, shard(b, cu, **sh), **TOL)


def test_empty_sequences_contribute_nothing():
    run_world(2, _empty_sequence_worker)
