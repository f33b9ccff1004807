"""Triton backend against the pure-torch reference (CPU: Triton interpreter, float32 only).

tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported on machines without a GPU.
bf16 ``tl.dot`` is wrong in the interpreter, so everything here is float32.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from moba_dist import moba_attn_varlen  # noqa: E402
from moba_dist.kernels import triton_moba  # noqa: E402
from moba_dist.kernels.blocks import BlockLayout  # noqa: E402
from moba_dist.kernels.plan_types import BwdConfig, RoutedKeys, RoutedProblem  # noqa: E402
from moba_dist.kernels.reference import reference_routed_bwd, reference_routed_fwd  # noqa: E402
from moba_dist.ops import moba_route  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Both sides accumulate in float32 over at most a few hundred keys, in different orders
# (tiles vs whole-group products, partial merges): observed errors ~1e-6; 2e-5 is 10-20x margin
# and still far below any wrong-mask error (O(0.1)). On a GPU, float32 dots run as IEEE too.
TOL = dict(atol=2e-5, rtol=2e-5)

CASES = {
    # name: (sequence lengths, block size, Hq, Hkv, D, topk)
    "ragged-packed-B16-top3": ([37, 70, 5], 16, 4, 2, 64, 3),
    "gqa4to1-top2": ([64, 29], 16, 8, 2, 64, 2),
    "mha-top1": ([50], 16, 2, 2, 64, 1),
    "top-ge-blocks": ([45, 20], 16, 2, 1, 64, 100),
    "d128-top3": ([48], 16, 2, 2, 128, 3),
    # Blocks of 40 rows over 16-row key tiles: unmasked full tiles, a ragged masked tail, and
    # groups of many entries (full and ragged query tiles in dK/dV); D = 96 runs padded to 128.
    "B40-d96-top3": ([90, 33], 40, 4, 2, 96, 3),
    "B40-d64-gqa4-top2": ([100], 40, 8, 2, 64, 2),
    "B24-d256-top2": ([60], 24, 2, 1, 256, 2),
}


def make(lens, block, hq, hkv, d, topk, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v, do = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv, hq))
    q, k, v, do = (x.to(DEV) for x in (q, k, v, do))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    layout = BlockLayout.build(cu, block)
    return q, k, v, do, cu, layout, moba_route(q, k, layout, topk)


def tfwd(q, k, v, pos, keys, sel, scale):
    return triton_moba.routed_forward(q, k, v, RoutedProblem(pos, keys, sel, scale))


def tbwd(do, q, k, v, out, lse, pos, keys, sel, scale, grad_dtype=torch.float32, **kw):
    prob = RoutedProblem(pos, keys, sel, scale, kw.pop("max_block_rows", None))
    return triton_moba.routed_backward(do, q, k, v, out, lse, prob, grad_dtype, **kw)


def rfwd(q, k, v, pos, keys, sel, scale):
    return reference_routed_fwd(q, k, v, RoutedProblem(pos, keys, sel, scale))


def rbwd(do, q, k, v, out, lse, pos, keys, sel, scale, dlse=None):
    return reference_routed_bwd(do, q, k, v, out, lse, RoutedProblem(pos, keys, sel, scale), dlse)


def close(name, got, want):
    torch.testing.assert_close(got.float(), want.float(), **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_routed_matches_reference(case):
    q, k, v, do, _, layout, sel = make(*case)
    pos = torch.arange(q.shape[0], device=DEV)
    keys = RoutedKeys(block_rows=layout.block_starts, k_pos=pos)
    scale = q.shape[-1] ** -0.5
    out, lse = tfwd(q, k, v, pos, keys, sel, scale)
    ref_out, ref_lse = rfwd(q, k, v, pos, keys, sel, scale)
    close("out", out, ref_out)
    close("lse", lse, ref_lse)
    got = tbwd(do, q, k, v, ref_out, ref_lse, pos, keys, sel, scale)
    want = rbwd(do, q, k, v, ref_out, ref_lse, pos, keys, sel, scale)
    for name, a, b in zip(["dq", "dk", "dv"], got, want, strict=True):
        close(name, a, b)


def _subset_keys(layout: BlockLayout, blocks: list[int]) -> tuple[torch.Tensor, RoutedKeys]:
    """Key rows of the given blocks only (as a CP rank holding part of the stream sees them)."""
    starts = layout.block_starts.tolist()
    rows = [r for j in blocks for r in range(starts[j], starts[j + 1])]
    lengths = [starts[j + 1] - starts[j] if j in blocks else 0 for j in range(len(starts) - 1)]
    block_rows = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEV)
    idx = torch.tensor(rows, dtype=torch.int64, device=DEV)
    return idx, RoutedKeys(block_rows=block_rows, k_pos=idx)


def test_generic_key_subsets_merge_to_full():
    # Two disjoint key sets (odd / even blocks) and every other query: each part matches the
    # reference (queries without keys: out 0, lse -inf), the LSE merge of the parts equals the
    # full attention, and backwards given the merged out/lse sum to the full gradients.
    q, k, v, do, _, layout, sel = make([50, 27], 8, 4, 2, 64, 3, seed=4)
    qi = torch.arange(0, q.shape[0], 2, device=DEV)
    q, do, sel, scale = q[qi], do[qi], sel[qi], 64**-0.5
    parts = []
    for blocks in ([j for j in range(layout.num_blocks) if j % 2], range(0, layout.num_blocks, 2)):
        idx, keys = _subset_keys(layout, list(blocks))
        out, lse = tfwd(q, k[idx], v[idx], qi, keys, sel, scale)
        ref_out, ref_lse = rfwd(q, k[idx], v[idx], qi, keys, sel, scale)
        close("part out", out, ref_out)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and torch.isinf(lse).any()
        close("part lse", lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0))
        parts.append((idx, keys, out, lse))
    lse = torch.logaddexp(parts[0][3], parts[1][3])
    out = sum(p[2] * torch.exp(p[3] - lse).t()[..., None] for p in parts)
    full_keys = RoutedKeys(layout.block_starts, torch.arange(k.shape[0], device=DEV))
    ref_out, ref_lse = rfwd(q, k, v, qi, full_keys, sel, scale)
    close("merged out", out, ref_out)
    close("merged lse", lse, ref_lse)
    want = rbwd(do, q, k, v, ref_out, ref_lse, qi, full_keys, sel, scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for idx, keys, _, _ in parts:
        pdq, pdk, pdv = tbwd(do, q, k[idx], v[idx], ref_out, ref_lse, qi, keys, sel, scale)
        dq += pdq
        dk[idx] += pdk
        dv[idx] += pdv
    for name, a, b in zip(["dq", "dk", "dv"], [dq, dk, dv], want, strict=True):
        close(name, a, b)


def test_query_without_keys_gets_zero_and_neg_inf():
    q, k, v, do, _, layout, sel = make([40], 8, 2, 2, 64, 2)
    idx, keys = _subset_keys(layout, [])  # empty key set
    pos = torch.arange(40, device=DEV)
    out, lse = tfwd(q, k[idx], v[idx], pos, keys, sel, 0.125)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    dq, dk, dv = tbwd(do, q, k[idx], v[idx], out, lse, pos, keys, sel, 0.125)
    assert not dq.any() and dk.numel() == 0 and dv.numel() == 0


@pytest.mark.parametrize("case", ["ragged-packed-B16-top3", "gqa4to1-top2"])
def test_public_op_triton_equals_reference(case):
    lens, block, hq, hkv, d, topk = CASES[case]
    q, k, v, do, cu, _, _ = make(lens, block, hq, hkv, d, topk, seed=2)
    results = []
    for backend in ("triton", "reference"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = moba_attn_varlen(
            *leaves, cu, max(lens), moba_chunk_size=block, moba_topk=topk, return_lse=True,
            backend=backend,
        )  # fmt: skip
        out.backward(do)
        results.append([out, lse, *(x.grad for x in leaves)])
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], *results, strict=True):
        close(name, a, b)


def test_bitwise_repeatable():
    q, k, v, do, _, layout, sel = make([60], 8, 4, 2, 64, 3, seed=6)
    pos = torch.arange(60, device=DEV)
    keys = RoutedKeys(layout.block_starts, pos)
    runs = []
    for _ in range(2):
        out, lse = tfwd(q, k, v, pos, keys, sel, 0.125)
        runs.append([out, lse, *tbwd(do, q, k, v, out, lse, pos, keys, sel, 0.125)])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_dkdv_skip_is_bitwise_and_order_free():
    # dK/dV programs start at the first query tile that can see their keys. Blocks of 40 rows
    # over 16-row key tiles give programs whose first rows are all in the past; query rows in
    # a shuffled order (positions not ascending inside a group) must not be skipped wrongly.
    q, k, v, do, _, layout, sel = make([100, 37], 40, 8, 2, 64, 2, seed=11)
    pos = torch.arange(q.shape[0], device=DEV)
    keys = RoutedKeys(layout.block_starts, pos)
    perm = torch.randperm(q.shape[0], generator=torch.Generator().manual_seed(0)).to(DEV)
    for name, rows in (("ascending", pos), ("shuffled", perm)):
        args = (q[rows], k, v, pos[rows], keys, sel[rows], 0.125)
        out, lse = rfwd(*args)
        want = rbwd(do[rows], args[0], k, v, out, lse, *args[3:])
        runs = [
            tbwd(do[rows], args[0], k, v, out, lse, *args[3:], config=BwdConfig(dkdv_skip=s))
            for s in (True, False)
        ]
        for g, a, b, w in zip(["dq", "dk", "dv"], *runs, want, strict=True):
            assert torch.equal(a, b), f"{name} {g}: skip changed the bits"
            close(f"{name} {g}", a, w)


@pytest.mark.parametrize("max_block_rows", [None, 8])
def test_dkdv_slabs_accumulate(max_block_rows):
    # Tiny dK/dV slabs: groups span several slabs, whose partial dK/dV must add up exactly
    # through the two-half carry scratch (bound given, or found with a host sync).
    cfg = BwdConfig(slab_elems=2 * 64 * 24)
    q, k, v, do, _, layout, sel = make([40, 21], 8, 4, 2, 64, 3, seed=9)
    pos = torch.arange(q.shape[0], device=DEV)
    keys = RoutedKeys(layout.block_starts, pos)
    out, lse = rfwd(q, k, v, pos, keys, sel, 0.125)
    want = rbwd(do, q, k, v, out, lse, pos, keys, sel, 0.125)
    for dtype in (torch.float32, torch.bfloat16):
        got = tbwd(
            do, q, k, v, out, lse, pos, keys, sel, 0.125, dtype, config=cfg,
            max_block_rows=max_block_rows,
        )  # fmt: skip
        for name, a, b in zip(["dq", "dk", "dv"], got, want, strict=True):
            # bf16 output: one rounding of the float32 result (relative 2^-9).
            tol = TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
            torch.testing.assert_close(a.float(), b, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(DEV != "cpu", reason="checks the interpreter's CPU rules")
def test_unavailable_reason():
    assert triton_moba.unavailable_reason(torch.zeros(2, 1, 64, dtype=torch.float32)) is None
    assert "float32" in triton_moba.unavailable_reason(torch.zeros(2, 1, 64, dtype=torch.bfloat16))
    assert "head_dim" in triton_moba.unavailable_reason(torch.zeros(2, 1, 48))


def test_block_sums_kernel_matches_segment_sums():
    # The CUDA fast path of the centroids (gate.py uses it on CUDA only), run here under the
    # interpreter: ragged packed blocks, D not a power of two.
    from moba_dist.kernels.blocks import segment_sums
    from moba_dist.kernels.triton_gate import block_sums_triton

    g = torch.Generator().manual_seed(13)
    k = torch.randn(150, 3, 24, generator=g).to(DEV)
    layout = BlockLayout.build(torch.tensor([0, 70, 75, 150], dtype=torch.int32, device=DEV), 16)
    want = segment_sums(k, layout.token_block, layout.num_blocks, 16, torch.float32)
    close("block sums", block_sums_triton(k, layout.block_starts), want)


def test_empty_sequences_and_zero_tokens():
    # Repeated offsets are empty sequences: same result as without them (the routing and every
    # kernel see the same blocks); T = 0 gives empty outputs and gradients.
    q, k, v, do, cu, _, _ = make([21, 9], 8, 4, 2, 64, 2, seed=11)
    cu_empty = torch.tensor([0, 0, 21, 21, 30, 30], dtype=torch.int32, device=DEV)
    results = []
    for offsets in (cu, cu_empty):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = moba_attn_varlen(
            *leaves, offsets, 21, moba_chunk_size=8, moba_topk=2, backend="triton"
        )
        out.backward(do)
        results.append([out, *(x.grad for x in leaves)])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    empty = [torch.zeros(0, h, 64, device=DEV, requires_grad=True) for h in (4, 2, 2)]
    cu0 = torch.zeros(2, dtype=torch.int32, device=DEV)
    out = moba_attn_varlen(*empty, cu0, 0, moba_chunk_size=8, moba_topk=2, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 4, 64) and empty[0].grad.shape == (0, 4, 64)


def test_lse_gradient_triton_equals_reference():
    # A loss on lse: the triton prep kernel's delta - dlse against the reference's.
    q, k, v, do, cu, _, _ = make([37, 20], 8, 4, 2, 64, 3, seed=12)
    w = torch.randn(4, q.shape[0], generator=torch.Generator().manual_seed(5)).to(DEV)
    grads = []
    for backend in ("triton", "reference"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = moba_attn_varlen(
            *leaves, cu, 37, moba_chunk_size=8, moba_topk=3, return_lse=True, backend=backend
        )
        ((out * do).sum() + (lse * w).sum()).backward()
        grads.append([x.grad for x in leaves])
    for name, a, b in zip(["dq", "dk", "dv"], *grads, strict=True):
        close(name, a, b)


def test_configs_are_passed_not_patched():
    # Small chunks passed as arguments force several token chunks in the forward and the dQ
    # pass; results must still equal the reference (the defaults run one chunk here).
    from moba_dist.kernels.plan_types import FwdConfig

    q, k, v, do, _, layout, sel = make([37, 70, 5], 16, 4, 2, 64, 3, seed=15)
    pos = torch.arange(q.shape[0], device=DEV)
    prob = RoutedProblem(pos, RoutedKeys(layout.block_starts, pos), sel, 0.125, 16)
    fcfg = FwdConfig(partial_dtype=torch.float32, chunk_elems=4 * 3 * 64 * 10)
    out, lse = triton_moba.routed_forward(q, k, v, prob, fcfg)
    ref_out, ref_lse = reference_routed_fwd(q, k, v, prob)
    close("out", out, ref_out)
    close("lse", lse, ref_lse)
    bcfg = BwdConfig(chunk_elems=4 * 3 * 64 * 10, slab_elems=2 * 64 * 40)
    got = triton_moba.routed_backward(do, q, k, v, ref_out, ref_lse, prob, config=bcfg)
    want = reference_routed_bwd(do, q, k, v, ref_out, ref_lse, prob)
    for name, a, b in zip(["dq", "dk", "dv"], got, want, strict=True):
        close(name, a, b)


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)], ids=["mha", "gqa2"])
def test_dense_triton_yardstick_matches_sdpa(hq, hkv):
    # The benchmark's dense causal flash is built from the routed kernels' tile steps; against
    # the math SDPA in float32 (same tolerance reasoning as TOL: a few dozen keys per row).
    from benchmarks.moba_bench.triton_dense import dense_triton_fwd, dense_triton_fwd_bwd

    g = torch.Generator().manual_seed(7)
    q, do = (torch.randn(1, hq, 64, 16, generator=g).to(DEV) for _ in range(2))
    k, v = (torch.randn(1, hkv, 64, 16, generator=g).to(DEV) for _ in range(2))
    tiles = (16, 16, 1, 1)
    lq, lk, lv = (x.clone().requires_grad_() for x in (q, k, v))
    rep = hq // hkv
    ref = torch.nn.functional.scaled_dot_product_attention(
        lq, lk.repeat_interleave(rep, 1), lv.repeat_interleave(rep, 1), is_causal=True
    )
    ref.backward(do)
    close("out", dense_triton_fwd(q, k, v, tiles)[0], ref)
    got = dense_triton_fwd_bwd(q, k, v, do, tiles, tiles, tiles)
    for name, a, b in zip(["dq", "dk", "dv"], got, (lq, lk, lv), strict=True):
        close(name, a, b.grad)


@pytest.mark.parametrize(
    "tq,hq,hkv,topk,blocks,dtype",
    [(37, 4, 2, 3, 5, torch.int16), (50, 8, 1, 2, 300, torch.int32), (0, 2, 2, 1, 3, torch.int16)],
    ids=["gqa2-int16", "mqa-int32", "no-tokens"],
)
def test_plan_passes_equal_their_twins(tq, hq, hkv, topk, blocks, dtype):
    from moba_dist.kernels.triton_plan import (
        compose,
        compose_reference,
        entry_keys,
        entry_keys_reference,
    )

    g = torch.Generator().manual_seed(3)
    sel = torch.randint(-1, blocks, (tq, hq, topk), generator=g, dtype=torch.int32).to(DEV)
    groups = blocks * hkv
    key = entry_keys(sel, hkv, groups, dtype)
    want = entry_keys_reference(sel, hkv, groups, dtype)
    assert key.dtype == dtype and torch.equal(key, want)
    skey, order = torch.sort(want, stable=True)
    assert torch.equal(compose(skey, order.clone()), compose_reference(skey, order))
