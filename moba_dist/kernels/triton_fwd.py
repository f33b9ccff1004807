"""Triton forward of routed attention: per-entry partials over one block, then an LSE merge.

See ``triton_moba`` for the entry plan. ``_fwd_kernel`` runs one tile of up to BLOCK_M entries of
one group (block j, KV head g): it gathers their query rows ``q[t, h]``, streams block j's rows
of ``k[:, g]`` / ``v[:, g]`` in BLOCK_N tiles with an online softmax in float32 (base 2), and
writes each entry's normalised partial ``o [D]`` and natural-log ``lse`` into chunk buffers
indexed by ``e - e0``. ``_merge_kernel`` combines the K slots of each ``(t, h)`` in slot order.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moba_dist.kernels.plan_types import DEFAULT_FWD, EntryPlan, FwdConfig, RoutedProblem
from moba_dist.kernels.triton_moba import chunk_tiles, token_chunks

__all__ = ["fwd_chunks"]

_LOG2E = 1.4426950408889634
_MERGE_ROWS = 32


@triton.jit
def _fwd_kernel(
    Q, K, V, QPOS, KPOS, BROWS, COMP, TGROUP, TSTART, TSTOP, TKEND, OPART, LPART,
    e0, scale_log2, HQ, HKV, KSEL, NENT,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grp = tl.load(TGROUP + pid)
    if grp < 0:  # past the real tile count (static grid bound)
        return
    start = tl.load(TSTART + pid)
    stop = tl.load(TSTOP + pid)
    kend = tl.load(TKEND + pid)
    rows = start + tl.arange(0, BLOCK_M)
    rvalid = rows < stop
    ent = tl.load(COMP + rows, mask=rvalid, other=0) % NENT  # int64 entry id
    th = ent // KSEL  # flat t * Hq + h: the query row
    qpos = tl.load(QPOS + th // HQ, mask=rvalid, other=-1)
    dd = tl.arange(0, D)
    q = tl.load(Q + th[:, None] * D + dd[None, :], mask=rvalid[:, None], other=0.0)
    kvh = grp % HKV
    r0 = tl.load(BROWS + grp // HKV)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(r0, kend, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cvalid = cols < kend
        kpos = tl.load(KPOS + cols, mask=cvalid, other=0)
        koff = (cols[:, None] * HKV + kvh) * D + dd[None, :]
        kt = tl.load(K + koff, mask=cvalid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        # Position mask: token-level causal inside the own block, a no-op for past blocks.
        ok = cvalid[None, :] & (kpos[None, :] <= qpos[:, None])
        s = tl.where(ok, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with no visible key yet keep m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + koff, mask=cvalid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    empty = l_i == 0.0
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634
    )
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    local = ent - e0
    tl.store(
        OPART + local[:, None] * D + dd[None, :], o.to(OPART.dtype.element_ty), mask=rvalid[:, None]
    )
    tl.store(LPART + local, lse, mask=rvalid)


@triton.jit
def _merge_kernel(
    OPART, LPART, OUT, LSE, t0, TQ, HQ, n_rows, KSEL,
    D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Rows r = (t - t0) * Hq + h of this chunk; int64 because (t0 * Hq + r) * D passes 2^31.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rv = r < n_rows
    dd = tl.arange(0, D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(KSEL):
        m = tl.maximum(m, tl.load(LPART + r * KSEL + s, mask=rv, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    wsum = tl.zeros([BLOCK_R], tl.float32)
    for s in range(KSEL):
        lp = tl.load(LPART + r * KSEL + s, mask=rv, other=float("-inf"))
        w = tl.exp(lp - m_safe)  # 0 for slots without keys (never written: o is garbage)
        live = rv & (lp > float("-inf"))
        o = tl.load(OPART + (r * KSEL + s)[:, None] * D + dd[None, :], mask=live[:, None], other=0)
        o = o.to(tl.float32)
        acc += w[:, None] * o
        wsum += w
    empty = wsum == 0.0
    out = acc / tl.where(empty, 1.0, wsum)[:, None]
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, wsum)))
    row = t0 * HQ + r
    tl.store(OUT + row[:, None] * D + dd[None, :], out.to(OUT.dtype.element_ty), mask=rv[:, None])
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
    ``prob`` holds int64 contiguous positions and block rows."""
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
            tiles.stop, tiles.kend, opart, lpart, e0, prob.softmax_scale * _LOG2E, hq, plan.hkv,
            topk, plan.num_entries,
            D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, IEEE=q.dtype == torch.float32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        n_rows = (t1 - t0) * hq
        _merge_kernel[(math.ceil(n_rows / _MERGE_ROWS),)](
            opart, lpart, out, lse, t0, tq, hq, n_rows, topk, D=d, BLOCK_R=_MERGE_ROWS
        )
    return out, lse
