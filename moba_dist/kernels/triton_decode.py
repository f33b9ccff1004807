"""Triton MoBA decode attention: one new query per row, selected blocks read in place.

A decode step of MoBA reads the keys and values of K blocks per query head, out of a cache that
may hold hundreds of blocks. This kernel reads them where they lie in the (preallocated, strided)
cache ``[Bt, Hkv, capacity, D]``: no gather, no concatenation, no float32 copy. It is GQA native:
one program serves all G query heads of a KV head for one chunk of one block, so a block chosen
by several heads of a group is read once. The grid covers every block the cache can hold
(``n_blocks`` is static: a CUDA-graph capturable launch); programs whose block no head of their
group selected, or whose chunk lies past the query, do no loads and write an empty partial.

Two kernels: ``_decode_partial_kernel`` writes flash-decoding partials (row max, row sum, output)
per (row, KV head, block chunk); ``_decode_combine_kernel`` merges them. The pure-PyTorch twin
(oracle and CPU path) is :func:`moba_dist.integrations.hf_decode.decode_attend`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["decode_attend_triton", "decode_chunk"]


@triton.jit
def _decode_partial_kernel(
    Q, K, V, SEL, STARTS, T, M, L, ACC,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_selb, stride_selh,
    scale,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, TOPK: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)  # chunk over (block, split)
    b = pid_bh // HKV
    h = pid_bh % HKV
    blk = pid_c // SPLITS
    split = pid_c % SPLITS
    g = tl.arange(0, G_PAD)
    gmask = g < G
    dd = tl.arange(0, D)
    kk = tl.arange(0, K_PAD)
    # Which query heads of this group chose this block.
    sel = tl.load(
        SEL + b * stride_selb + (h * G + g)[:, None] * stride_selh + kk[None, :],
        mask=gmask[:, None] & (kk[None, :] < TOPK), other=-1,
    )  # fmt: skip
    chosen = tl.sum((sel == blk).to(tl.int32), axis=1) > 0  # [G_PAD]
    t = tl.load(T + b)
    start = tl.load(STARTS + b)
    lo = blk * BLOCK + split * CHUNK  # in-sequence position of the chunk's first key
    hi = tl.minimum(lo + CHUNK, t + 1)
    any_chosen = tl.max(chosen.to(tl.int32), axis=0) > 0
    hi = tl.where(any_chosen, hi, lo)
    q = tl.load(
        Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + dd[None, :],
        mask=gmask[:, None], other=0.0,
    )  # fmt: skip
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for p0 in range(lo, hi, BLOCK_N):
        pos = p0 + tl.arange(0, BLOCK_N)
        inside = pos < hi
        slot = (start + pos).to(tl.int64)
        k = tl.load(
            k_base + slot[:, None] * stride_ks + dd[None, :], mask=inside[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        s = tl.where(chosen[:, None] & inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing allowed yet keep m = -inf; shift by 0 there so no NaN appears.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + slot[:, None] * stride_vs + dd[None, :], mask=inside[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    n_chunks = tl.num_programs(1)
    row = (pid_bh * n_chunks + pid_c) * G + g
    tl.store(M + row, m_i, mask=gmask)
    # An empty partial is marked by m = -inf alone: its sum and output are never read.
    busy = (g * 0 + hi) > lo  # as a [G_PAD] vector: masks must be tensors
    tl.store(L + row, l_i, mask=gmask & busy)
    tl.store(ACC + row[:, None] * D + dd[None, :], acc, mask=(gmask & busy)[:, None])


@triton.jit
def _decode_combine_kernel(
    M, L, ACC, OUT, stride_ob, stride_oh, N, HKV: tl.constexpr, G: tl.constexpr,
    TILE: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # (row, KV head, head in group)
    bh = pid // G
    g = pid % G
    b = bh // HKV
    h = bh % HKV
    dd = tl.arange(0, D)
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for c0 in range(0, N, TILE):
        c = c0 + tl.arange(0, TILE)
        ok = c < N
        idx = (bh * N + c) * G + g
        m = tl.load(M + idx, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(m - m_use)  # empty partials (m = -inf) weigh 0 and are not loaded
        alpha = tl.exp(m_run - m_use)
        full = ok & (m > float("-inf"))
        l_run = l_run * alpha + tl.sum(w * tl.load(L + idx, mask=full, other=0.0), axis=0)
        part = tl.load(ACC + idx[:, None] * D + dd[None, :], mask=full[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
        m_run = m_new
    # The own block always holds the query's own key, so l_run > 0.
    out = acc / l_run
    tl.store(OUT + b * stride_ob + (h * G + g) * stride_oh + dd, out.to(OUT.dtype.element_ty))


def decode_chunk(block: int, n_blocks: int, rows_heads: int) -> int:
    """Keys per program: whole blocks when the grid is already wide, else split a block so that
    about four programs per multiprocessor can be in flight (a decode step is bandwidth bound)."""
    chunk = block
    while chunk > 256 and chunk % 2 == 0 and rows_heads * n_blocks * (block // chunk) < 2048:
        chunk //= 2
    return chunk


def decode_attend_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    starts: torch.Tensor,
    t: torch.Tensor,
    block: int,
    scale: float,
    n_blocks: int | None = None,
) -> torch.Tensor:
    """MoBA attention of one new query per row over its selected blocks, read in place.

    Args:
        q: ``[Bt, Hq, D]`` queries (D in 16, 32, 64, 128; Hq a multiple of Hkv).
        k, v: ``[Bt, Hkv, capacity, D]`` caches, any strides with unit stride over D.
        sel: ``[Bt, Hq, K]`` int in-sequence block ids (slot 0 the own block, ``-1`` none).
        starts: ``[Bt]`` int first real cache slot of every row (left padding before it).
        t: ``[Bt]`` int in-sequence position of every query (keys ``0..t`` are real).
        block: MoBA block size B. scale: softmax scale.
        n_blocks: blocks the grid covers (default ``ceil(capacity / B)``): a fixed value keeps
            the launch CUDA-graph capturable as the cache fills.

    Returns:
        ``[Bt, Hq, D]`` in q's dtype.
    """
    bt, hq, d = q.shape
    hkv, cap = k.shape[1], k.shape[2]
    if d not in (16, 32, 64, 128) or hq % hkv or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(
            f"decode_attend_triton needs D in (16, 32, 64, 128), Hq % Hkv == 0 and unit stride "
            f"over D, got q {tuple(q.shape)}, k {tuple(k.shape)} strides {k.stride()}"
        )
    g, topk = hq // hkv, sel.shape[-1]
    n_blocks = -(-cap // block) if n_blocks is None else n_blocks
    chunk = decode_chunk(block, n_blocks, bt * hkv)
    splits = -(-block // chunk)
    n = n_blocks * splits
    q = q.contiguous()
    sel = sel.to(torch.int32).contiguous()
    part = torch.empty(bt * hkv * n * g, dtype=torch.float32, device=q.device)
    m, l_sum = part, torch.empty_like(part)
    acc = torch.empty(bt * hkv * n * g, d, dtype=torch.float32, device=q.device)
    _decode_partial_kernel[(bt * hkv, n)](
        q, k, v, sel, starts.to(torch.int32), t.to(torch.int32), m, l_sum, acc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sel.stride(0), sel.stride(1), float(scale),
        HKV=hkv, G=g, G_PAD=max(16, triton.next_power_of_2(g)), TOPK=topk,
        K_PAD=triton.next_power_of_2(topk), BLOCK=block, CHUNK=chunk, SPLITS=splits,
        BLOCK_N=max(16, min(64, triton.next_power_of_2(chunk))), D=d, num_warps=4, num_stages=3,
    )  # fmt: skip
    out = torch.empty(bt, hq, d, dtype=q.dtype, device=q.device)
    _decode_combine_kernel[(bt * hkv * g,)](
        m, l_sum, acc, out, out.stride(0), out.stride(1), n, HKV=hkv, G=g, TILE=32, D=d
    )
    return out
