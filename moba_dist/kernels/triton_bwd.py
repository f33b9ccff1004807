"""Triton backward of routed attention, given the final (merged) ``out`` and ``lse``.

Probabilities are ``exp(s - lse)`` with the caller's lse and ``delta = rowsum(dout * out)`` with
the caller's out, so the gradients of one key set are exact shares of the full gradient when the
forward spanned several key sets (the CP op). Three kernels, none with atomics, so results are
bitwise repeatable:

- ``_prep_kernel``: per query row (t * Hq + h), ``delta`` and ``lse`` in base 2 (+inf for
  key-less rows, which makes every probability exactly 0).
- ``_dkdv_kernel``: one program per (group, BLOCK_N key rows): loops over the group's entries,
  whose q / dout rows are first gathered into contiguous slab buffers (an indirect load in the
  inner loop is not software-pipelined: measured 4x slower than the direct-load kernels). A key
  row (with its KV head) belongs to exactly one group, so one program per launch writes it.
- ``_dq_kernel``: one program per entry tile (the forward's tiles), streaming the block's keys;
  writes a per-entry partial dQ, summed over the K slots of each (t, h) afterwards.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moba_dist.kernels.plan_types import DEFAULT_BWD, BwdConfig, EntryPlan, RoutedProblem
from moba_dist.kernels.triton_moba import chunk_tiles, tile_table, token_chunks

__all__ = ["bwd_all"]

_LOG2E = 1.4426950408889634
_PREP_ROWS = 32
_GATHER_ROWS = 64
_SUM_ROWS = 32


@triton.jit
def _prep_kernel(
    DO, OUT, LSE, DLSE, LSE2, DELTA, TQ, HQ, n_rows,
    D: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DLSE: tl.constexpr,
):  # fmt: skip
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rv = r < n_rows
    dd = tl.arange(0, D)
    off = r[:, None] * D + dd[None, :]
    do = tl.load(DO + off, mask=rv[:, None], other=0.0).to(tl.float32)
    o = tl.load(OUT + off, mask=rv[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(do * o, 1)
    if HAS_DLSE:  # d lse / d s = p, so a gradient on lse enters as delta - dlse
        delta -= tl.load(DLSE + (r % HQ) * TQ + r // HQ, mask=rv, other=0.0)
    tl.store(DELTA + r, delta, mask=rv)
    lse = tl.load(LSE + (r % HQ) * TQ + r // HQ, mask=rv, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(LSE2 + r, lse2, mask=rv)


@triton.jit
def _gather_kernel(
    COMP, Q, DO, LSE2, DELTA, QPOS, QS, DOS, LSE2S, DELTAS, QPOSS, b0, n_rows, NENT, KSEL, HQ,
    D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Slab row i <- entry comp[b0 + i]: its q / dout rows, lse2, delta and position, in one pass
    # (replaces five torch gathers and the int64 index arithmetic feeding them).
    i = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    iv = i < n_rows
    th = tl.load(COMP + b0 + i, mask=iv, other=0) % NENT // KSEL
    dd = tl.arange(0, D)
    src = th[:, None] * D + dd[None, :]
    dst = i[:, None] * D + dd[None, :]
    tl.store(QS + dst, tl.load(Q + src, mask=iv[:, None]), mask=iv[:, None])
    tl.store(DOS + dst, tl.load(DO + src, mask=iv[:, None]), mask=iv[:, None])
    tl.store(LSE2S + i, tl.load(LSE2 + th, mask=iv), mask=iv)
    tl.store(DELTAS + i, tl.load(DELTA + th, mask=iv), mask=iv)
    tl.store(QPOSS + i, tl.load(QPOS + th // HQ, mask=iv), mask=iv)


@triton.jit
def _dq_sum_kernel(
    PART, SEL, DQ, t0, HQ, n_rows, KSEL, D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dq[t0 * Hq + r] = sum over the valid slots s of part[r * K + s], in slot order. Every valid
    # entry was written by the dQ kernel (zeros when it saw no key), invalid slots never are.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rv = r < n_rows
    row = t0 * HQ + r
    dd = tl.arange(0, D)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for s in range(KSEL):
        live = rv & (tl.load(SEL + row * KSEL + s, mask=rv, other=-1) >= 0)
        acc += tl.load(PART + (r * KSEL + s)[:, None] * D + dd[None, :], mask=live[:, None],
                       other=0.0)  # fmt: skip
    tl.store(DQ + row[:, None] * D + dd[None, :], acc.to(DQ.dtype.element_ty), mask=rv[:, None])


@triton.jit
def _load_entries(COMP, rows, rv, NENT, KSEL, HQ, QPOS, Q, DO, LSE2, DELTA, D: tl.constexpr):
    """Gather the query-side rows of entries ``rows``: q, dout, lse2, delta, position."""
    ent = tl.load(COMP + rows, mask=rv, other=0) % NENT
    th = ent // KSEL
    dd = tl.arange(0, D)
    off = th[:, None] * D + dd[None, :]
    q = tl.load(Q + off, mask=rv[:, None], other=0.0)
    do = tl.load(DO + off, mask=rv[:, None], other=0.0)
    lse2 = tl.load(LSE2 + th, mask=rv, other=float("inf"))
    delta = tl.load(DELTA + th, mask=rv, other=0.0)
    qpos = tl.load(QPOS + th // HQ, mask=rv, other=-1)
    return ent, q, do, lse2, delta, qpos


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _dkdv_kernel(
    QS, K, V, DOS, LSE2S, DELTAS, QPOSS, KPOS, BROWS, GOFF, GLO, GHI, NGROUP, NINDEX, DK, DV,
    ACCK, ACCV, RD_OFF, WR_OFF, b0, scale_log2, scale, HKV,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ACCUM: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grp = tl.load(NGROUP + pid)
    if grp < 0:
        return
    blk = grp // HKV
    kvh = grp % HKV
    r1 = tl.load(BROWS + blk + 1)
    inblk = tl.load(NINDEX + pid) * BLOCK_N + tl.arange(0, BLOCK_N)  # row within the block
    cols = tl.load(BROWS + blk) + inblk
    cvalid = cols < r1
    kpos = tl.load(KPOS + cols, mask=cvalid, other=0)
    dd = tl.arange(0, D)
    koff = (cols[:, None] * HKV + kvh) * D + dd[None, :]
    kt = tl.load(K + koff, mask=cvalid[:, None], other=0.0)
    vt = tl.load(V + koff, mask=cvalid[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    # The slab holds this group's entries [GLO, GHI) gathered contiguously (slab-local rows):
    # direct addresses in the inner loop let the compiler pipeline its loads.
    s1 = tl.load(GHI + grp) - b0
    for m0 in range(tl.load(GLO + grp) - b0, s1, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rv = rows < s1
        q = tl.load(QS + rows[:, None] * D + dd[None, :], mask=rv[:, None], other=0.0)
        do = tl.load(DOS + rows[:, None] * D + dd[None, :], mask=rv[:, None], other=0.0)
        lse2 = tl.load(LSE2S + rows, mask=rv, other=float("inf"))
        delta = tl.load(DELTAS + rows, mask=rv, other=0.0)
        qpos = tl.load(QPOSS + rows, mask=rv, other=-1)
        # Transposed scores [BLOCK_N, BLOCK_M] so dK/dV accumulate as (keys x D) products.
        st = _dot(kt, tl.trans(q), IEEE) * scale_log2
        ok = cvalid[:, None] & rv[None, :] & (kpos[:, None] <= qpos[None, :])
        pt = tl.where(ok, tl.exp2(st - lse2[None, :]), 0.0)
        dv += _dot(pt, do, IEEE)
        dpt = _dot(vt, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst, q, IEEE)
    dk = dk * scale
    if ACCUM:
        # A group split over slabs (at most one per slab boundary) carries its partial dK/dV in
        # float32 from slab to slab through a small scratch of [2, max block rows, D] (read from
        # one half, write the other, alternating per slab: the group arriving and the group
        # leaving a slab may differ), in launch order (deterministic); only its last slab
        # stores to DK, rounding once.
        coff = inblk[:, None] * D + dd[None, :]
        if tl.load(GLO + grp) != tl.load(GOFF + grp):  # started in an earlier slab
            dk += tl.load(ACCK + RD_OFF + coff, mask=cvalid[:, None], other=0.0)
            dv += tl.load(ACCV + RD_OFF + coff, mask=cvalid[:, None], other=0.0)
        # Ends in this slab? (else it continues in a later one); as a [BLOCK_N] vector mask.
        ends = (tl.load(GHI + grp) == tl.load(GOFF + grp + 1)).to(tl.int32) + 0 * cols
        carry = cvalid & (ends == 0)
        tl.store(ACCK + WR_OFF + coff, dk, mask=carry[:, None])
        tl.store(ACCV + WR_OFF + coff, dv, mask=carry[:, None])
        cvalid = cvalid & (ends != 0)
    tl.store(DK + koff, dk.to(DK.dtype.element_ty), mask=cvalid[:, None])
    tl.store(DV + koff, dv.to(DV.dtype.element_ty), mask=cvalid[:, None])


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE2, DELTA, QPOS, KPOS, BROWS, COMP, TGROUP, TSTART, TSTOP, TKEND, DQPART,
    e0, scale_log2, scale, HQ, HKV, KSEL, NENT,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grp = tl.load(TGROUP + pid)
    if grp < 0:
        return
    stop = tl.load(TSTOP + pid)
    kend = tl.load(TKEND + pid)
    rows = tl.load(TSTART + pid) + tl.arange(0, BLOCK_M)
    rv = rows < stop
    ent, q, do, lse2, delta, qpos = _load_entries(
        COMP, rows, rv, NENT, KSEL, HQ, QPOS, Q, DO, LSE2, DELTA, D
    )
    kvh = grp % HKV
    dd = tl.arange(0, D)
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(tl.load(BROWS + grp // HKV), kend, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cvalid = cols < kend
        kpos = tl.load(KPOS + cols, mask=cvalid, other=0)
        koff = (cols[:, None] * HKV + kvh) * D + dd[None, :]
        kt = tl.load(K + koff, mask=cvalid[:, None], other=0.0)
        vt = tl.load(V + koff, mask=cvalid[:, None], other=0.0)
        s = _dot(q, tl.trans(kt), IEEE) * scale_log2
        ok = cvalid[None, :] & rv[:, None] & (kpos[None, :] <= qpos[:, None])
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(vt), IEEE)
        dq += _dot(p * (dp - delta[:, None]), kt, IEEE)
    local = ent - e0
    tl.store(DQPART + local[:, None] * D + dd[None, :], dq * scale, mask=rv[:, None])


def _max_block_rows(prob: RoutedProblem) -> int:
    if prob.max_block_rows is not None:
        return prob.max_block_rows
    rows = prob.keys.block_rows
    return int((rows[1:] - rows[:-1]).max()) if rows.numel() > 1 else 0  # one host sync


def _dkdv(q, k, v, dout, lse2, delta, prob: RoutedProblem, plan: EntryPlan, cfg, dk, dv):
    """dK/dV over entry slabs: each slab's query rows are gathered into contiguous buffers first,
    then one launch covers every (group, key tile) with entries in the slab. Writes ``dk``,
    ``dv`` in place (accumulated in float32 across slabs when there are several)."""
    tk, hkv, d = k.shape
    tile = cfg.dkdv_tile(q)
    keys = prob.keys
    # Valid entries come first in plan.comp; their count needs a host sync, so the slabs cover
    # all E entries instead (the sentinel tail, invalid slots, belongs to no group: its slab
    # rows are gathered but never read).
    n_ent = plan.num_entries
    slab = max(tile.block_m, cfg.slab_elems // (2 * d))
    multi = n_ent > slab
    # Every carried row read was written by the previous slab: no zero fill needed.
    carry_rows = _max_block_rows(prob) if multi else 0
    acc_k, acc_v = dk, dv  # unread unless several slabs (ACCUM)
    if multi:
        acc_k = torch.empty(2 * carry_rows * d, dtype=torch.float32, device=dk.device)
        acc_v = torch.empty_like(acc_k)
    blk_len = (keys.block_rows[1:] - keys.block_rows[:-1])[:, None].expand(-1, hkv).reshape(-1)
    bound = hkv * (tk // tile.block_n + keys.block_rows.numel())
    rows = min(slab, n_ent)
    qs, dos = q.new_empty(rows, d), dout.new_empty(rows, d)
    lse2s, deltas = lse2.new_empty(rows), delta.new_empty(rows)
    qposs = prob.q_pos.new_empty(rows)
    scale = prob.softmax_scale
    for i, b0 in enumerate(range(0, n_ent, slab)):
        b1 = min(n_ent, b0 + slab)
        _gather_kernel[(triton.cdiv(b1 - b0, _GATHER_ROWS),)](
            plan.comp, q, dout, lse2, delta, prob.q_pos, qs, dos, lse2s, deltas, qposs, b0,
            b1 - b0, n_ent, plan.topk, plan.hq, D=d, BLOCK_R=_GATHER_ROWS,
        )  # fmt: skip
        glo = plan.group_off[:-1].clamp(b0, b1)
        ghi = plan.group_off[1:].clamp(b0, b1)
        group, index = tile_table(torch.where(ghi > glo, blk_len, 0), tile.block_n, bound)
        half = carry_rows * d
        _dkdv_kernel[(bound,)](
            qs, k, v, dos, lse2s, deltas, qposs, keys.k_pos, keys.block_rows, plan.group_off,
            glo, ghi, group.to(torch.int32), index, dk, dv, acc_k, acc_v, (i % 2) * half,
            ((i + 1) % 2) * half, b0, scale * _LOG2E, scale, hkv, D=d,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, IEEE=q.dtype == torch.float32,
            ACCUM=multi, num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip


def _dq(q, k, v, dout, lse2, delta, prob: RoutedProblem, plan: EntryPlan, cfg, dq):
    """Launch the dQ kernel per token chunk and sum each (t, h)'s K slot partials into ``dq``."""
    tq, hq, d = q.shape
    tile = cfg.dq_tile(q)
    topk, keys, scale = plan.topk, prob.keys, prob.softmax_scale
    for t0, t1 in token_chunks(tq, hq, topk, d, cfg.chunk_elems):
        e0, e1 = t0 * hq * topk, t1 * hq * topk
        tiles = chunk_tiles(plan, prob.q_pos, keys, e0, e1, tile.block_m)
        # Every valid slot is written (zeros when it saw no key); invalid ones are masked below.
        part = torch.empty(e1 - e0, d, dtype=torch.float32, device=q.device)
        _dq_kernel[(tiles.group.numel(),)](
            q, k, v, dout, lse2, delta, prob.q_pos, keys.k_pos, keys.block_rows, plan.comp,
            tiles.group, tiles.start, tiles.stop, tiles.kend, part, e0, scale * _LOG2E, scale,
            hq, plan.hkv, topk, plan.num_entries, D=d, BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n, IEEE=q.dtype == torch.float32, num_warps=tile.num_warps,
            num_stages=tile.num_stages,
        )  # fmt: skip
        # Sum over the valid slots in slot order (deterministic), cast to dq's dtype on store.
        n_rows = (t1 - t0) * hq
        _dq_sum_kernel[(triton.cdiv(n_rows, _SUM_ROWS),)](
            part, prob.sel, dq, t0, hq, n_rows, topk, D=d, BLOCK_R=_SUM_ROWS
        )


def bwd_all(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    prob: RoutedProblem,
    plan: EntryPlan,
    grad_dtype: torch.dtype,
    config: BwdConfig = DEFAULT_BWD,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq [Tq, Hq, D]``, ``dk, dv [Tk, Hkv, D]`` in ``grad_dtype`` (contiguous inputs, int64
    positions and block rows in ``prob``)."""
    tq, hq, d = q.shape
    dq = torch.empty(q.shape, dtype=grad_dtype, device=q.device)
    # Key rows no query selected get no program: they must start at zero.
    dk = torch.zeros(k.shape, dtype=grad_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=grad_dtype, device=v.device)
    if tq == 0 or k.shape[0] == 0:
        return dq.zero_(), dk, dv
    lse2 = torch.empty(tq * hq, dtype=torch.float32, device=q.device)
    delta = torch.empty_like(lse2)
    dlse_f = None if dlse is None else dlse.float().contiguous()
    _prep_kernel[(math.ceil(tq * hq / _PREP_ROWS),)](
        dout, out, lse.float().contiguous(), lse2 if dlse_f is None else dlse_f, lse2, delta,
        tq, hq, tq * hq, D=d, BLOCK_R=_PREP_ROWS, HAS_DLSE=dlse_f is not None,
    )  # fmt: skip
    _dkdv(q, k, v, dout, lse2, delta, prob, plan, config, dk, dv)
    _dq(q, k, v, dout, lse2, delta, prob, plan, config, dq)
    return dq, dk, dv
