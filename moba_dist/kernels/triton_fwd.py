"""Triton forward of routed attention: per-entry partials over one block, then an LSE merge.

See ``triton_moba`` for the entry plan. ``_fwd_kernel`` runs one tile of up to BLOCK_M entries of
one group (block j, KV head g): it gathers their query rows ``q[t, h]``, streams block j's rows
of ``k[:, g]`` / ``v[:, g]`` in BLOCK_N tiles with an online softmax in float32 (base 2), and
writes each entry's normalised partial ``o [D]`` and natural-log ``lse`` into chunk buffers
indexed by ``e - e0``. ``_merge_kernel`` combines the K slots of each ``(t, h)`` in slot order.

The key loop is split like FlashAttention's: the key tiles every query of the tile sees in full
(``kfree``: all past blocks, and the own block's rows before the tile's first query) run without
masks or position loads; only the tail up to ``kend`` (the own block's causal diagonal, a ragged
last tile) is masked. Addresses inside the loop are a 64-bit base pointer advanced per tile plus
32-bit tile offsets: 64-bit offset arithmetic per element was the loop's largest cost.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moba_dist.kernels.plan_types import DEFAULT_FWD, EntryPlan, FwdConfig, RoutedProblem
from moba_dist.kernels.triton_moba import chunk_tiles, padded_dim, token_chunks

__all__ = ["fwd_chunks", "fwd_tile_step", "load_kv_tile", "tile_dot"]

_LOG2E = 1.4426950408889634
_MERGE_ROWS = 32


@triton.jit
def tile_dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def load_kv_tile(kp, vp, n_left, dmask, CAUSAL: tl.constexpr, MASK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    """K and V rows of one key tile and the mask of rows that exist (``n_left`` of them when
    ``CAUSAL``: the tail of a block; full tiles load unmasked but for padded head dims)."""
    cvalid = tl.arange(0, BLOCK_N) < n_left
    if CAUSAL:
        kt = tl.load(kp, mask=cvalid[:, None] & dmask[None, :], other=0.0)
        vt = tl.load(vp, mask=cvalid[:, None] & dmask[None, :], other=0.0)
    elif MASK_D:
        kt = tl.load(kp, mask=dmask[None, :], other=0.0)
        vt = tl.load(vp, mask=dmask[None, :], other=0.0)
    else:
        kt = tl.load(kp)
        vt = tl.load(vp)
    return kt, vt, cvalid


@triton.jit
def fwd_tile_step(
    acc, m_i, l_i, q, kp, vp, kpos_p, qpos, n_left, dmask, scale_log2,
    CAUSAL: tl.constexpr, MASK_D: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax. ``CAUSAL``: mask by key position and by ``n_left``
    (rows left in the block); otherwise every key of the tile is visible to every query row."""
    kt, vt, cvalid = load_kv_tile(kp, vp, n_left, dmask, CAUSAL, MASK_D, BLOCK_N)
    s = tile_dot(q, tl.trans(kt), IEEE)
    if CAUSAL:
        kpos = tl.load(kpos_p, mask=cvalid, other=0)
        ok = cvalid[None, :] & (kpos[None, :] <= qpos[:, None])
        s = tl.where(ok, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with no visible key yet keep m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
    else:  # every row sees every key: m is finite from the first tile on
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_safe = m_new
        p = tl.exp2(s * scale_log2 - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tile_dot(p, vt, IEEE)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, QPOS, KPOS, BROWS, COMP, TGROUP, TSTART, TSTOP, TKEND, TKFREE, OPART, LPART,
    e0, scale_log2, HQ, HKV, KSEL, NENT, K_ROW, K_HEAD,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grp = tl.load(TGROUP + pid)
    if grp < 0:  # past the real tile count (static grid bound)
        return
    stop = tl.load(TSTOP + pid)
    rows = tl.load(TSTART + pid) + tl.arange(0, BLOCK_M)
    rvalid = rows < stop
    ent = tl.load(COMP + rows, mask=rvalid, other=0) % NENT  # int64 entry id
    th = ent // KSEL  # flat t * Hq + h: the query row
    qpos = tl.load(QPOS + th // HQ, mask=rvalid, other=-1)
    dd = tl.arange(0, DP)
    dmask = dd < D
    q = tl.load(Q + th[:, None] * D + dd[None, :], mask=rvalid[:, None] & dmask[None, :], other=0.0)
    kvh = grp % HKV
    r0 = tl.load(BROWS + grp // HKV)
    kend = tl.load(TKEND + pid)
    # Key tile i starts at row r0 + i * BLOCK_N; addresses derive from the (32-bit) induction
    # variable, which the software pipeliner needs to prefetch the next tiles.
    n_full = ((tl.load(TKFREE + pid) - r0) // BLOCK_N).to(tl.int32)  # tiles with no mask
    n_all = ((kend - r0 + BLOCK_N - 1) // BLOCK_N).to(tl.int32)
    stride = K_ROW  # elements from one key row to the next (k and v share strides)
    tile_off = tl.arange(0, BLOCK_N)[:, None] * stride + dd[None, :]
    krow = r0 * 0 + K_ROW  # int64: row offsets of long blocks pass 2^31
    kbase = K + r0 * K_ROW + kvh.to(tl.int64) * K_HEAD
    vbase = V + r0 * K_ROW + kvh.to(tl.int64) * K_HEAD
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    for i in range(n_full):
        step = i * BLOCK_N * krow
        acc, m_i, l_i = fwd_tile_step(
            acc, m_i, l_i, q, kbase + step + tile_off, vbase + step + tile_off, KPOS, qpos, 0,
            dmask, scale_log2, False, DP != D, IEEE, BLOCK_N,
        )  # fmt: skip
    for i in range(n_full, n_all):
        step = i * BLOCK_N * krow
        n0 = r0 + i * BLOCK_N
        acc, m_i, l_i = fwd_tile_step(
            acc, m_i, l_i, q, kbase + step + tile_off, vbase + step + tile_off,
            KPOS + n0 + tl.arange(0, BLOCK_N), qpos, kend - n0, dmask, scale_log2,
            True, DP != D, IEEE, BLOCK_N,
        )  # fmt: skip
    empty = l_i == 0.0
    lse2 = m_i + tl.log2(tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), lse2 / 1.4426950408889634)
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    local = ent - e0
    omask = rvalid[:, None] & dmask[None, :]
    tl.store(OPART + local[:, None] * D + dd[None, :], o.to(OPART.dtype.element_ty), mask=omask)
    tl.store(LPART + local, lse, mask=rvalid)


@triton.jit
def _merge_kernel(
    OPART, LPART, OUT, LSE, t0, TQ, HQ, n_rows, KSEL,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Rows r = (t - t0) * Hq + h of this chunk; int64 because (t0 * Hq + r) * D passes 2^31.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rv = r < n_rows
    dd = tl.arange(0, DP)
    dmask = dd < D
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(KSEL):
        m = tl.maximum(m, tl.load(LPART + r * KSEL + s, mask=rv, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, DP], tl.float32)
    wsum = tl.zeros([BLOCK_R], tl.float32)
    for s in range(KSEL):
        lp = tl.load(LPART + r * KSEL + s, mask=rv, other=float("-inf"))
        w = tl.exp(lp - m_safe)  # 0 for slots without keys (never written: o is garbage)
        live = rv & (lp > float("-inf"))
        o = tl.load(
            OPART + (r * KSEL + s)[:, None] * D + dd[None, :],
            mask=live[:, None] & dmask[None, :], other=0,
        )  # fmt: skip
        acc += w[:, None] * o.to(tl.float32)
        wsum += w
    empty = wsum == 0.0
    out = acc / tl.where(empty, 1.0, wsum)[:, None]
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, wsum)))
    row = t0 * HQ + r
    omask = rv[:, None] & dmask[None, :]
    tl.store(OUT + row[:, None] * D + dd[None, :], out.to(OUT.dtype.element_ty), mask=omask)
    tl.store(LSE + (row % HQ) * TQ + row // HQ, lse, mask=rv)


def fwd_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prob: RoutedProblem,
    plan: EntryPlan,
    config: FwdConfig = DEFAULT_FWD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward over token chunks: ``out [Tq, Hq, D]`` (q's dtype), ``lse [Hq, Tq]``.
    ``prob`` holds int64 contiguous positions and block rows; ``q`` is contiguous, ``k`` and
    ``v`` share strides with unit stride along D (token-major or head-major storage)."""
    tq, hq, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(hq, tq, dtype=torch.float32, device=q.device)
    cfg = config.tile(q)
    keys, topk = prob.keys, plan.topk
    for t0, t1 in token_chunks(tq, hq, topk, d, config.chunk_elems):
        e0, e1 = t0 * hq * topk, t1 * hq * topk
        tiles = chunk_tiles(plan, prob.q_pos, keys, e0, e1, cfg.block_m)
        opart = torch.empty(e1 - e0, d, dtype=config.partial(q), device=q.device)
        lpart = torch.full((e1 - e0,), float("-inf"), dtype=torch.float32, device=q.device)
        _fwd_kernel[(tiles.group.numel(),)](
            q, k, v, prob.q_pos, keys.k_pos, keys.block_rows, plan.comp, tiles.group, tiles.start,
            tiles.stop, tiles.kend, tiles.kfree, opart, lpart, e0, prob.softmax_scale * _LOG2E,
            hq, plan.hkv, topk, plan.num_entries, k.stride(0), k.stride(1),
            D=d, DP=padded_dim(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            IEEE=q.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        n_rows = (t1 - t0) * hq
        _merge_kernel[(math.ceil(n_rows / _MERGE_ROWS),)](
            opart, lpart, out, lse, t0, tq, hq, n_rows, topk,
            D=d, DP=padded_dim(d), BLOCK_R=_MERGE_ROWS,
        )  # fmt: skip
    return out, lse
