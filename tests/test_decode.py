"""The MoBA decode step: Triton kernel (interpreter, float32) and PyTorch twin against a naive
dense-masked softmax, the gate against the single-device op, and the preallocated cache layer.

Tolerances: float32 throughout; the kernel and the naive reference differ only in summation
order over at most a few hundred keys (~1e-6), so 1e-5 fails on any wrong key, head or block.
The Triton gate must equal the PyTorch gate exactly: on small-integer data every score is exact
in float32 whatever the summation order, so the many exact ties test the lower-block rule.
"""

from __future__ import annotations

import os

import pytest
import torch

from moba_dist import moba_attn_func
from moba_dist.integrations.hf_decode import (
    decode_attend,
    decode_backend,
    decode_select,
    moba_decode_step,
)

ATOL = 1e-5
needs_interp = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1"
)


def naive_selected_attention(q, k, v, sel, starts, t, block, scale):
    """``q [Bt, Hq, D]`` attends to keys at positions ``0..t[b]`` whose block is in ``sel``."""
    bt, hq, _ = q.shape
    g = hq // k.shape[1]
    out = torch.empty_like(q)
    for b in range(bt):
        pos = torch.arange(int(t[b]) + 1)
        for h in range(hq):
            keep = torch.isin(pos // block, sel[b, h][sel[b, h] >= 0])
            p = pos[keep] + int(starts[b])
            s = (k[b, h // g, p] @ q[b, h]) * scale
            out[b, h] = torch.softmax(s, 0) @ v[b, h // g, p]
    return out


def exact_sums(k, starts, block, n_blocks, garbage: bool):
    """Block sums of complete blocks; incomplete ones hold garbage when asked (must be ignored)."""
    bt, hkv, cap, d = k.shape
    sums = torch.randn(bt, hkv, n_blocks, d) * 100 if garbage else torch.zeros(bt, hkv, n_blocks, d)
    for b in range(bt):
        for j in range(n_blocks):
            s0 = int(starts[b]) + j * block
            if s0 + block <= cap:
                sums[b, :, j] = k[b, :, s0 : s0 + block].sum(1)
    return sums


def problem(block=8, cap=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    bt, hq, hkv, d = 3, 4, 2, 16
    k, v = (torch.randn(bt, hkv, cap, d, generator=g) for _ in range(2))
    q = torch.randn(bt, hq, d, generator=g)
    starts = torch.tensor([0, 5, 2])
    t = torch.tensor([cap - 1, 20, 47])  # per-row lengths; row 1 mid-block, row 0 at the end
    return q, k, v, starts, t


BACKENDS = ["torch", pytest.param("triton", marks=needs_interp)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("block", "cap"), [(8, 72), (512, 2048)], ids=["b8", "b512-split"])
def test_step_attention_matches_naive(backend, block, cap):
    q, k, v, starts, t = problem(block, cap)
    if block == 512:
        t = torch.tensor([cap - 1, 700, 1500])
    sums = exact_sums(k, starts, block, cap // block + 1, garbage=True)
    scale = 16**-0.5
    got = moba_decode_step(q, k, v, sums, starts, t, block, 3, scale, backend=backend)
    sel = decode_select(q[:, :, None], sums, t[:, None], block, 3, sums.shape[2])[:, 0]
    want = naive_selected_attention(q, k, v, sel, starts, t, block, scale)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_matches_single_device_op_per_row(backend):
    # Each row's new query must get exactly what the cache-less op gives its last token.
    q, k, v, starts, t = problem()
    sums = exact_sums(k, starts, 8, 10, garbage=True)
    got = moba_decode_step(q, k, v, sums, starts, t, 8, 3, 0.25, backend=backend)
    for b in range(3):
        sl = slice(int(starts[b]), int(starts[b] + t[b]) + 1)
        kb, vb = (x[b, :, sl].transpose(0, 1)[None] for x in (k, v))
        qb = torch.randn(1, kb.shape[1], 4, 16)
        qb[0, -1] = q[b]
        want = moba_attn_func(qb, kb, vb, moba_chunk_size=8, moba_topk=3, softmax_scale=0.25)
        torch.testing.assert_close(got[b], want[0, -1], atol=ATOL, rtol=0)


def integer_problem(bt=3, hq=8, hkv=2, d=16, block=8, cap=96, seed=1):
    """Small-integer keys and queries: block sums, centroids (/ 8) and scores are exact."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-2, 3, (bt, hkv, cap, d), generator=g).float()
    v = torch.randn(bt, hkv, cap, d, generator=g)
    q = torch.randint(-2, 3, (bt, hq, d), generator=g).float()
    starts = torch.tensor([0, 3, 6][:bt])
    t = torch.tensor([cap - 1, 50, 77][:bt])
    return q, k, v, starts, t


@needs_interp
@pytest.mark.parametrize("topk", [1, 2, 4, 13])
def test_triton_gate_equals_twin_with_exact_ties(topk):
    from moba_dist.kernels.triton_decode import decode_gate_triton

    q, k, _, starts, t = integer_problem()
    sums = exact_sums(k, starts, 8, 13, garbage=True)  # garbage past each row's complete blocks
    got = decode_gate_triton(q, sums, t, 8, topk)
    want = decode_select(q[:, :, None], sums, t[:, None], 8, topk, sums.shape[2])[:, 0]
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    if topk == 4:  # the data really has exact ties among candidate scores
        cent = sums[:, :, :9] / 8
        scores = torch.einsum("bhgd,bhjd->bhgj", q.view(3, 2, 4, 16), cent)[0].flatten(0, 1)
        assert any(len(set(row.tolist())) < len(row) for row in scores)


def _shared_heads(q, hkv):
    """The query heads of every KV group made equal: they choose the same blocks."""
    bt, hq, d = q.shape
    return q.view(bt, hkv, hq // hkv, d)[:, :, :1].expand(-1, -1, hq // hkv, -1).reshape(q.shape)


@needs_interp
@pytest.mark.parametrize(
    ("hq", "topk", "block", "min_chunk", "shared"),
    [(4, 3, 8, 512, False), (8, 2, 8, 512, True), (8, 4, 8, 512, False), (8, 3, 8, 2, False),
     (8, 13, 16, 1, False)],
    ids=["by-rank", "by-rank-shared-heads", "by-block", "by-rank-split-chunks",
         "by-block-16-splits-two-merge-steps"],
)  # fmt: skip
def test_triton_step_matches_twin_and_naive(hq, topk, block, min_chunk, shared):
    # by-rank: 1 + G (K - 1) slots < 12 blocks; by-block: 1 + 4 * 3 = 13 slots >= 12 blocks.
    # The merge takes 128 // 16 = 8 splits of the 16 per step: two steps.
    from moba_dist.kernels.triton_decode import DecodeConfig

    q, k, v, starts, t = integer_problem(hq=hq)
    q = _shared_heads(q, 2) if shared else q
    config = DecodeConfig(min_chunk=min_chunk, block_n=16)
    sums = exact_sums(k, starts, block, 96 // block + 1, garbage=True)
    got = moba_decode_step(q, k, v, sums, starts, t, block, topk, 0.3, "triton", config)
    sel = decode_select(q[:, :, None], sums, t[:, None], block, topk, sums.shape[2])
    twin = decode_attend(q[:, :, None], k, v, sel, t[:, None], starts, block, 0.3)[:, 0]
    torch.testing.assert_close(got, twin, atol=ATOL, rtol=0)
    want = naive_selected_attention(q, k, v, sel[:, 0], starts, t, block, 0.3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_decode_config_and_chunks():
    from moba_dist.kernels.triton_decode import DecodeConfig, decode_chunk

    for bad in ({"block_n": 48}, {"block_n": 512}, {"num_warps": 0}, {"min_chunk": 0}):
        with pytest.raises(ValueError, match="DecodeConfig"):
            DecodeConfig(**bad)
    cfg = DecodeConfig(target_programs=1024, min_chunk=256)  # not the default min_chunk
    assert decode_chunk(4096, 8 * 12, cfg) == 256  # 96 blocks read: split 16 ways
    assert decode_chunk(4096, 256, cfg) == 1024
    assert decode_chunk(4096, 2048, cfg) == 4096  # already wide: whole blocks
    assert decode_chunk(4000, 1, cfg) == 250  # halves while even and above the minimum


def test_step_topk1_is_own_block_only():
    q, k, v, starts, t = problem()
    sums = exact_sums(k, starts, 8, 10, garbage=True)
    got = moba_decode_step(q, k, v, sums, starts, t, 8, 1, 0.25, backend="torch")
    sel = (t // 8)[:, None, None].expand(3, 4, 1)
    want = naive_selected_attention(q, k, v, sel, starts, t, 8, 0.25)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_decode_backend_choice_and_errors():
    q = torch.randn(1, 4, 16)
    assert decode_backend("auto", q) == "torch"  # CPU: the twin
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_backend("cuda", q)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="CUDA tensor"):
            decode_backend("triton", q)
    with pytest.raises(ValueError, match="head_dim"):
        decode_backend("triton", torch.randn(1, 4, 24))


def test_step_bad_shapes_raise():
    q, k, v, starts, t = problem()
    with pytest.raises(ValueError, match=r"q must be \[Bt, Hq, D\]"):
        moba_decode_step(q[:, :, None], k, v, k[:, :, :9], starts, t, 8, 3, 0.25)


transformers = pytest.importorskip("transformers", minversion="4.56")

from moba_dist.integrations.hf_cache import MoBALayer  # noqa: E402


def test_layer_appends_in_place_and_grows_by_doubling():
    layer = MoBALayer()
    k0 = torch.randn(2, 2, 5, 8)
    layer.update(k0, k0 + 1)
    steps = [torch.randn(2, 2, 1, 8) for _ in range(6)]
    layer.update(steps[0], steps[0] + 1)  # 6 > 5 slots: doubles to 10
    ptr, cap = layer._kbuf.data_ptr(), layer._kbuf.shape[2]
    assert cap == 10
    for s in steps[1:5]:
        layer.update(s, s + 1)
    assert layer._kbuf.data_ptr() == ptr  # no reallocation while it fits: no copy per token
    layer.update(steps[5], steps[5] + 1)
    assert layer._kbuf.shape[2] == 20
    want = torch.cat([k0, *steps], 2)
    assert torch.equal(layer.keys, want) and torch.equal(layer.values, want + 1)


def test_layer_reseats_after_reorder_and_crop():
    layer = MoBALayer(max_cache_len=16)
    k0 = torch.randn(3, 2, 6, 8)
    layer.update(k0, k0)
    layer.crop(-2)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    s = torch.randn(3, 2, 1, 8)
    layer.update(s, s)
    want = torch.cat([k0[[2, 0, 1], :, :4], s], 2)
    assert torch.equal(layer.keys, want) and layer._kbuf.shape[2] == 16


def test_static_layer_full_raises():
    layer = MoBALayer(max_cache_len=6, grow=False)
    layer.update(torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8))
    with pytest.raises(ValueError, match="max_cache_len=6"):
        layer.update(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
