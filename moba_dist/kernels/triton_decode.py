"""Triton MoBA decode step: gate, attention over the selected blocks read in place, merge.

One decode step of one layer is three launches with no host synchronisation, shaped by the cache
capacity only (CUDA-graph capturable while the cache fills):

1. ``_gate_kernel`` (one program per row and query head): ``q . sum_j / B`` in IEEE float32 for
   every complete block before the query's own block, then the top-(K-1) by descending score with
   exact ties to the lower block (the rule of :mod:`moba_dist.kernels.gate`), written as
   ``sel [Bt, Hq, K]`` (slot 0 the own block, ``-1`` where fewer candidates exist).
2. ``_attend_kernel`` (one program per row, KV head, block slot and chunk): flash-decoding
   partials over one chunk of one selected block, read in place from the strided cache. It is GQA
   native: a program serves every query head of its group that chose its block, so a block
   chosen by several heads is read once. The grid has ``1 + G * (K - 1)`` slots per KV head (the
   own block, then every (head, rank) choice; a repeated block is read by its first slot only),
   so it does not grow with the cache; a cache of fewer blocks than slots is covered block by
   block instead.
3. ``_combine_kernel`` (one program per row and query head) merges the partials of that head's
   K blocks only (found from ``sel``), so its cost does not grow with the grid either.

The pure-PyTorch twin (oracle and CPU path) is ``decode_select`` + ``decode_attend`` of
:mod:`moba_dist.integrations.hf_decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "DEFAULT_CONFIG",
    "DecodeConfig",
    "decode_attend_triton",
    "decode_chunk",
    "decode_gate_triton",
    "moba_decode_triton",
]

# Gate keys pack (order-preserving int image of the float32 score) << 32 | (2^31 - 1 - block), so
# one integer max finds the best score and, among exact ties, the lowest block. Every real key
# lies strictly between these two sentinels (the image of -inf << 32 is about -9.187e18).
_KEY_NONE = tl.constexpr(-9_200_000_000_000_000_000)
_KEY_TOP = tl.constexpr(9_200_000_000_000_000_000)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch knobs of the decode kernels.

    Args:
        block_n: keys per inner step of the attention kernel (16..256, a power of two).
        num_warps, num_stages: of the attention kernel.
        target_programs: blocks are split into chunks until at least this many attention
            programs would be busy when every KV head reads exactly K blocks.
        min_chunk: smallest chunk a block is split into.
        gate_tile: blocks scored per step of the gate (a power of two).
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 1024
    min_chunk: int = 512
    gate_tile: int = 128

    def __post_init__(self) -> None:
        for name in ("block_n", "gate_tile", "num_warps"):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1 or val & (val - 1):
                raise ValueError(
                    f"DecodeConfig.{name} must be a positive power of two, got {val!r}"
                )
        if not 16 <= self.block_n <= 256:
            raise ValueError(f"DecodeConfig.block_n must be in [16, 256], got {self.block_n}")
        for name in ("num_stages", "target_programs", "min_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"DecodeConfig.{name} must be a positive int, got {getattr(self, name)!r}"
                )


DEFAULT_CONFIG = DecodeConfig()


@triton.jit
def _gate_kernel(
    Q, SUMS, T, KEYS, SEL, stride_qb, stride_qh, stride_sb, stride_sh, stride_sn,
    stride_selb, stride_selh, n_sums,
    HQ: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, BLOCK: tl.constexpr,
    N_PAD: tl.constexpr, TILE: tl.constexpr, SEL_TILE: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # (row, query head)
    b = pid // HQ
    hq = pid % HQ
    h = hq // G
    own = (tl.load(T + b) // BLOCK).to(tl.int32)
    dd = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + hq * stride_qh + dd).to(tl.float32)
    keys = KEYS + pid.to(tl.int64) * N_PAD
    sums = SUMS + b.to(tl.int64) * stride_sb + h * stride_sh
    for j0 in range(0, N_PAD, TILE):
        j = j0 + tl.arange(0, TILE)
        ok = (j < n_sums) & (j < own)  # candidates: complete blocks before the own block
        c = tl.load(sums + j[:, None] * stride_sn + dd[None, :], mask=ok[:, None], other=0.0)
        # Centroid first, correctly rounded, as the PyTorch gate computes sums / B.
        s = tl.sum(tl.div_rn(c, tl.full(c.shape, BLOCK, tl.float32)) * q[None, :], axis=1)
        s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties +0.0, as in a float compare
        bits = s.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = (ordered.to(tl.int64) << 32) + (0x7FFFFFFF - j).to(tl.int64)
        tl.store(keys + j, tl.where(ok, key, _KEY_NONE))
    tl.debug_barrier()  # the keys written by every thread are read back by every thread
    out = SEL + b * stride_selb + hq * stride_selh
    tl.store(out, own)
    prev = tl.full([1], _KEY_TOP, tl.int64)
    # Keys are distinct, so the r-th choice is the largest key below the (r-1)-th.
    for r in range(1, TOPK):
        best = tl.full([1], _KEY_NONE, tl.int64)
        for j0 in range(0, N_PAD, SEL_TILE):
            kk = tl.load(keys + j0 + tl.arange(0, SEL_TILE))
            below = tl.where(kk < prev, kk, _KEY_NONE)
            best = tl.maximum(best, tl.max(below, axis=0))
        blk = 0x7FFFFFFF - (best & 0x7FFFFFFF)
        tl.store(out + r + tl.arange(0, 1), tl.where(best > _KEY_NONE, blk, -1).to(tl.int32))
        prev = best


@triton.jit
def _attend_kernel(
    Q, K, V, SEL, STARTS, T, M, L, ACC,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_selb, stride_selh, scale,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, TOPK: tl.constexpr,
    K_PAD: tl.constexpr, BY_RANK: tl.constexpr, DEN: tl.constexpr, BLOCK: tl.constexpr,
    CHUNK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)  # (block slot, split)
    b = pid_bh // HKV
    h = pid_bh % HKV
    slot = pid_c // SPLITS
    split = pid_c % SPLITS
    g = tl.arange(0, G_PAD)
    gmask = g < G
    dd = tl.arange(0, D)
    kk = tl.arange(0, K_PAD)
    sel_base = SEL + b * stride_selb + (h * G) * stride_selh
    sel = tl.load(
        sel_base + g[:, None] * stride_selh + kk[None, :],
        mask=gmask[:, None] & (kk[None, :] < TOPK), other=-1,
    )  # fmt: skip
    # int32 positions (a cache holds < 2^31 slots); addresses are formed in int64 below.
    t = tl.load(T + b).to(tl.int32)
    start = tl.load(STARTS + b).to(tl.int32)
    if BY_RANK:
        # Slot 0: the own block; slot 1 + g0 * (K-1) + r0 - 1: head g0's choice of rank r0.
        f = slot - 1
        g0 = tl.maximum(f, 0) // DEN  # DEN = max(K - 1, 1)
        r0 = tl.maximum(f, 0) % DEN + 1
        blk = tl.load(sel_base + g0 * stride_selh + r0, mask=slot > 0, other=-1).to(tl.int32)
        blk = tl.where(slot == 0, t // BLOCK, blk)
        flat = g[:, None] * (TOPK - 1) + kk[None, :] - 1
        earlier = (sel == blk) & (kk[None, :] >= 1) & (flat < f)
        blk = tl.where(tl.sum(tl.sum(earlier.to(tl.int32), axis=1), axis=0) == 0, blk, -1)
    else:
        blk = slot
    chosen = (tl.sum((sel == blk).to(tl.int32), axis=1) > 0) & (blk >= 0)  # [G_PAD]
    lo = blk * BLOCK + split * CHUNK  # in-sequence position of the chunk's first key
    hi = tl.minimum(lo + CHUNK, t + 1)
    hi = tl.where(tl.max(chosen.to(tl.int32), axis=0) > 0, hi, lo)
    q = tl.load(
        Q + b * stride_qb + (h * G + g)[:, None] * stride_qh + dd[None, :],
        mask=gmask[:, None], other=0.0,
    )  # fmt: skip
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    for p0 in range(lo, hi, BLOCK_N):
        pos = p0 + tl.arange(0, BLOCK_N)
        inside = pos < hi
        slot_k = (start + pos).to(tl.int64)
        k = tl.load(k_base + slot_k[:, None] * stride_ks + dd[None, :], mask=inside[:, None],
                    other=0.0)  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale
        s = tl.where(chosen[:, None] & inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Heads that did not choose this block keep m = -inf; shift by 0 there so no NaN appears.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + slot_k[:, None] * stride_vs + dd[None, :], mask=inside[:, None],
                    other=0.0)  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        m_i = m_new
    row = (pid_bh * tl.num_programs(1) + pid_c) * G + g
    tl.store(M + row, m_i, mask=gmask)
    # An empty partial is marked by m = -inf alone: its sum and output are never read.
    busy = (g * 0 + hi) > lo  # as a [G_PAD] vector: masks must be tensors
    tl.store(L + row, l_i, mask=gmask & busy)
    tl.store(ACC + row[:, None] * D + dd[None, :], acc, mask=(gmask & busy)[:, None])


@triton.jit
def _combine_kernel(
    SEL, M, L, ACC, OUT, stride_selb, stride_selh, stride_ob, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, TOPK: tl.constexpr,
    K_PAD: tl.constexpr, BY_RANK: tl.constexpr, NSLOT: tl.constexpr, SPLITS: tl.constexpr,
    S_TILE: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # (row, query head)
    b = pid // (HKV * G)
    hq = pid % (HKV * G)
    bh = b * HKV + hq // G
    g = hq % G
    kk = tl.arange(0, K_PAD)
    sel_base = SEL + b * stride_selb
    mine = tl.load(sel_base + hq * stride_selh + kk, mask=kk < TOPK, other=-1)  # [K_PAD]
    valid = mine >= 0
    # The slot whose program read each of this head's blocks (see _attend_kernel's grid); only
    # those K * SPLITS partials are merged, however many slots the grid has.
    if BY_RANK:
        gg = tl.arange(0, G_PAD)
        past = (gg[:, None] < G) & (kk[None, :] >= 1) & (kk[None, :] < TOPK)
        grp = tl.load(
            sel_base + ((hq // G) * G + gg)[:, None] * stride_selh + kk[None, :], mask=past,
            other=-1,
        )  # fmt: skip
        flat = gg[:, None] * (TOPK - 1) + kk[None, :] - 1
        hit = (grp[None, :, :] == mine[:, None, None]) & past[None, :, :]
        first = tl.min(tl.min(tl.where(hit, flat[None, :, :], NSLOT), axis=2), axis=1)
        slot = tl.where(kk == 0, 0, 1 + first)
    else:
        slot = mine
    slot = tl.where(valid, slot, 0)
    dd = tl.arange(0, D)
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, SPLITS, S_TILE):
        sp = s0 + tl.arange(0, S_TILE)
        ok = tl.reshape(valid[:, None] & (sp[None, :] < SPLITS), [K_PAD * S_TILE])
        idx = tl.reshape(((bh * NSLOT + slot[:, None]) * SPLITS + sp[None, :]) * G + g,
                         [K_PAD * S_TILE])  # fmt: skip
        m = tl.load(M + idx, mask=ok, other=float("-inf"))
        # Sums and outputs of empty partials (m = -inf) are never written: loaded in parallel
        # with m, then dropped.
        l_part = tl.load(L + idx, mask=ok, other=0.0)
        part = tl.load(ACC + idx[:, None] * D + dd[None, :], mask=ok[:, None], other=0.0)
        full = m > float("-inf")
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.where(full, tl.exp(m - m_use), 0.0)
        alpha = tl.exp(m_run - m_use)
        l_run = l_run * alpha + tl.sum(w * tl.where(full, l_part, 0.0), axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * tl.where(full[:, None], part, 0.0), axis=0)
        m_run = m_new
    # The own block always holds the query's own key, so l_run > 0.
    out = acc / l_run
    tl.store(OUT + b * stride_ob + hq * stride_oh + dd, out.to(OUT.dtype.element_ty))


def decode_chunk(block: int, busy_blocks: int, config: DecodeConfig = DEFAULT_CONFIG) -> int:
    """Keys per attention program: whole blocks when ``busy_blocks`` (row, KV head, block) reads
    already fill the GPU, else halves of them down to ``config.min_chunk``, so that about
    ``config.target_programs`` programs stream keys at once (a decode step is bandwidth bound)."""
    chunk = block
    while (
        chunk > config.min_chunk
        and chunk % 2 == 0
        and busy_blocks * (block // chunk) < config.target_programs
    ):
        chunk //= 2
    return chunk


def _check(q: torch.Tensor, hkv: int, what: str, **tensors: torch.Tensor) -> None:
    d = q.shape[-1]
    if q.dim() != 3 or d not in (16, 32, 64, 128) or q.shape[1] % hkv or q.stride(-1) != 1:
        raise ValueError(
            f"{what} needs q [Bt, Hq, D] with D in (16, 32, 64, 128), unit stride over D and Hq a "
            f"multiple of Hkv={hkv}, got q {tuple(q.shape)} strides {q.stride()}"
        )
    for name, x in tensors.items():
        if x.shape[0] != q.shape[0] or x.shape[-1] != d or x.stride(-1) != 1:
            raise ValueError(
                f"{what}: {name} must be [Bt={q.shape[0]}, Hkv, ..., D={d}] with unit stride over "
                f"D, got {tuple(x.shape)} strides {x.stride()}"
            )


def decode_gate_triton(
    q: torch.Tensor, sums: torch.Tensor, t: torch.Tensor, block: int, topk: int,
    config: DecodeConfig = DEFAULT_CONFIG,
) -> torch.Tensor:  # fmt: skip
    """The decode gate: ``q [Bt, Hq, D]``, ``sums [Bt, Hkv, n, D]`` float32 block key sums,
    ``t [Bt]`` int query positions -> ``sel [Bt, Hq, K]`` int32 (see the module docstring)."""
    _check(q, sums.shape[1], "decode_gate_triton", sums=sums)
    if sums.dtype != torch.float32:
        raise ValueError(f"decode_gate_triton takes float32 sums, got {sums.dtype}")
    bt, hq, d = q.shape
    n = sums.shape[2]
    n_pad = max(16, triton.next_power_of_2(n))
    t = t.contiguous()  # read as T[b]
    tile = min(config.gate_tile, n_pad)
    keys = torch.empty(bt * hq * n_pad, dtype=torch.int64, device=q.device)
    sel = torch.empty(bt, hq, topk, dtype=torch.int32, device=q.device)
    _gate_kernel[(bt * hq,)](
        q, sums, t, keys, sel, q.stride(0), q.stride(1), sums.stride(0), sums.stride(1),
        sums.stride(2), sel.stride(0), sel.stride(1), n, HQ=hq, G=hq // sums.shape[1], TOPK=topk,
        BLOCK=block, N_PAD=n_pad, TILE=tile, SEL_TILE=min(n_pad, 1024), D=d, num_warps=8,
    )  # fmt: skip
    return sel


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
    config: DecodeConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """MoBA attention of one new query per row over its selected blocks, read in place.

    Args:
        q: ``[Bt, Hq, D]`` queries (D in 16, 32, 64, 128; Hq a multiple of Hkv).
        k, v: ``[Bt, Hkv, capacity, D]`` caches, any strides with unit stride over D.
        sel: ``[Bt, Hq, K]`` int in-sequence block ids (slot 0 the own block, then distinct past
            blocks, ``-1`` none), as :func:`decode_gate_triton` writes them.
        starts: ``[Bt]`` int first real cache slot of every row (left padding before it).
        t: ``[Bt]`` int in-sequence position of every query (keys ``0..t`` are real).
        block: MoBA block size B. scale: softmax scale.
        n_blocks: blocks the cache can hold (default ``ceil(capacity / B)``).
        config: launch knobs.

    Returns:
        ``[Bt, Hq, D]`` in q's dtype.
    """
    _check(q, k.shape[1], "decode_attend_triton", k=k, v=v)
    bt, hq, d = q.shape
    hkv, topk = k.shape[1], sel.shape[-1]
    g = hq // hkv
    n_blocks = -(-k.shape[2] // block) if n_blocks is None else n_blocks
    t, starts = t.contiguous(), starts.contiguous()  # read as T[b], STARTS[b]
    slots = 1 + g * (topk - 1)
    by_rank = slots < n_blocks
    slots = slots if by_rank else n_blocks
    chunk = decode_chunk(block, bt * hkv * min(topk, n_blocks), config)
    splits = -(-block // chunk)
    n = slots * splits
    m = torch.empty(bt * hkv * n * g, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty(bt * hkv * n * g, d, dtype=torch.float32, device=q.device)
    _attend_kernel[(bt * hkv, n)](
        q, k, v, sel, starts, t, m, l_sum, acc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sel.stride(0), sel.stride(1), float(scale),
        HKV=hkv, G=g, G_PAD=max(16, triton.next_power_of_2(g)), TOPK=topk,
        K_PAD=triton.next_power_of_2(topk), BY_RANK=by_rank, DEN=max(topk - 1, 1), BLOCK=block,
        CHUNK=chunk, SPLITS=splits, D=d,
        BLOCK_N=max(16, min(config.block_n, triton.next_power_of_2(chunk))),
        # float32 caches attend in IEEE float32 (TF32 would differ from the PyTorch twin).
        PREC="ieee" if q.dtype == torch.float32 else None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    out = torch.empty(bt, hq, d, dtype=q.dtype, device=q.device)
    k_pad = triton.next_power_of_2(topk)
    s_tile = min(triton.next_power_of_2(splits), max(1, 128 // k_pad))  # ~128 partials a step
    _combine_kernel[(bt * hq,)](
        sel, m, l_sum, acc, out, sel.stride(0), sel.stride(1), out.stride(0), out.stride(1),
        HKV=hkv, G=g, G_PAD=triton.next_power_of_2(g), TOPK=topk, K_PAD=k_pad, BY_RANK=by_rank,
        NSLOT=slots, SPLITS=splits, S_TILE=s_tile,
        D=d, num_warps=8,
    )  # fmt: skip
    return out


def moba_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sums: torch.Tensor,
    starts: torch.Tensor,
    t: torch.Tensor,
    block: int,
    topk: int,
    scale: float,
    config: DecodeConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """One MoBA decode step, three launches: :func:`decode_gate_triton` then
    :func:`decode_attend_triton` (attention and merge). Arguments as in
    :func:`moba_dist.integrations.hf_decode.moba_decode_step`; returns ``[Bt, Hq, D]``."""
    sel = decode_gate_triton(q, sums, t, block, topk, config)
    return decode_attend_triton(q, k, v, sel, starts, t, block, scale, config=config)
