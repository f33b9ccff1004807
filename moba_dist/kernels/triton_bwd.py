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
from moba_dist.kernels.triton_fwd import load_kv_tile, tile_dot
from moba_dist.kernels.triton_moba import chunk_tiles, padded_dim, tile_table, token_chunks

__all__ = ["bwd_all", "dkdv_tile_step", "dq_tile_step", "prep_rows"]

_LOG2E = 1.4426950408889634
_PREP_ROWS = 32
_GATHER_ROWS = 64
_SUM_ROWS = 32


@triton.jit
def _prep_kernel(
    DO, OUT, LSE, DLSE, LSE2, DELTA, TQ, HQ, n_rows,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr, HAS_DLSE: tl.constexpr,
):  # fmt: skip
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rv = r < n_rows
    dd = tl.arange(0, DP)
    off = r[:, None] * D + dd[None, :]
    m2 = rv[:, None] & (dd < D)[None, :]
    do = tl.load(DO + off, mask=m2, other=0.0).to(tl.float32)
    o = tl.load(OUT + off, mask=m2, other=0.0).to(tl.float32)
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
    D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # Slab row i <- entry comp[b0 + i]: its q / dout rows, lse2, delta and position, in one pass
    # (replaces five torch gathers and the int64 index arithmetic feeding them).
    i = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    iv = i < n_rows
    th = tl.load(COMP + b0 + i, mask=iv, other=0) % NENT // KSEL
    dd = tl.arange(0, DP)
    src = th[:, None] * D + dd[None, :]
    dst = i[:, None] * D + dd[None, :]
    m2 = iv[:, None] & (dd < D)[None, :]
    tl.store(QS + dst, tl.load(Q + src, mask=m2), mask=m2)
    tl.store(DOS + dst, tl.load(DO + src, mask=m2), mask=m2)
    tl.store(LSE2S + i, tl.load(LSE2 + th, mask=iv), mask=iv)
    tl.store(DELTAS + i, tl.load(DELTA + th, mask=iv), mask=iv)
    tl.store(QPOSS + i, tl.load(QPOS + th // HQ, mask=iv), mask=iv)


@triton.jit
def _dq_sum_kernel(
    PART, SEL, DQ, t0, HQ, n_rows, KSEL, D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    # dq[t0 * Hq + r] = sum over the valid slots s of part[r * K + s], in slot order. Every valid
    # entry was written by the dQ kernel (zeros when it saw no key), invalid slots never are.
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rv = r < n_rows
    row = t0 * HQ + r
    dd = tl.arange(0, DP)
    dmask = (dd < D)[None, :]
    acc = tl.zeros([BLOCK_R, DP], tl.float32)
    for s in range(KSEL):
        live = rv & (tl.load(SEL + row * KSEL + s, mask=rv, other=-1) >= 0)
        acc += tl.load(PART + (r * KSEL + s)[:, None] * D + dd[None, :],
                       mask=live[:, None] & dmask, other=0.0)  # fmt: skip
    out = acc.to(DQ.dtype.element_ty)
    tl.store(DQ + row[:, None] * D + dd[None, :], out, mask=rv[:, None] & dmask)


@triton.jit
def dkdv_tile_step(
    dk, dv, kt, vt, kpos, QS, DOS, LSE2S, DELTAS, QPOSS, m0, n_left, slab_off, dmask, scale_log2,
    MASK_M: tl.constexpr, MASK_D: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
    DP: tl.constexpr,
):  # fmt: skip
    """One tile of BLOCK_M slab rows from ``m0`` against the program's keys. ``MASK_M``: only
    ``n_left`` rows remain (the group's last, ragged tile)."""
    rows = m0 + tl.arange(0, BLOCK_M)
    off = rows[:, None] * slab_off + tl.arange(0, DP)[None, :]
    if MASK_M:
        rv = tl.arange(0, BLOCK_M) < n_left
        q = tl.load(QS + off, mask=rv[:, None] & dmask[None, :], other=0.0)
        do = tl.load(DOS + off, mask=rv[:, None] & dmask[None, :], other=0.0)
        lse2 = tl.load(LSE2S + rows, mask=rv, other=float("inf"))
        delta = tl.load(DELTAS + rows, mask=rv, other=0.0)
        qpos = tl.load(QPOSS + rows, mask=rv, other=-1)
    else:
        if MASK_D:
            q = tl.load(QS + off, mask=dmask[None, :], other=0.0)
            do = tl.load(DOS + off, mask=dmask[None, :], other=0.0)
        else:
            q = tl.load(QS + off)
            do = tl.load(DOS + off)
        lse2 = tl.load(LSE2S + rows)
        delta = tl.load(DELTAS + rows)
        qpos = tl.load(QPOSS + rows)
    # Transposed scores [BLOCK_N, BLOCK_M] so dK/dV accumulate as (keys x D) products. Key-less
    # rows carry lse2 = +inf (p = 0); keys past the block are never stored.
    st = tile_dot(kt, tl.trans(q), IEEE) * scale_log2
    pt = tl.where(kpos[:, None] <= qpos[None, :], tl.exp2(st - lse2[None, :]), 0.0)
    dv += tile_dot(pt, do, IEEE)
    dpt = tile_dot(vt, tl.trans(do), IEEE)
    dk += tile_dot(pt * (dpt - delta[None, :]), q, IEEE)
    return dk, dv


@triton.jit
def _first_seeing_tile(QPOSS, s0, n_full, kmin, BLOCK_M: tl.constexpr):
    """Number of leading full BLOCK_M-row tiles (from slab row ``s0``) whose rows all sit before
    ``kmin``, the first key position of this program: they see none of its keys (p = 0), so
    skipping them keeps the sums bitwise. A scan that stops at the first tile with a row at or
    past ``kmin`` is right whatever the row order; in a group's ascending order the blind tiles
    are the diagonal block's early rows, a few position loads each."""
    rows = tl.arange(0, BLOCK_M)
    i = 0
    go = n_full > 0
    while go:
        go = tl.max(tl.load(QPOSS + s0 + i * BLOCK_M + rows), 0) < kmin
        i += go.to(tl.int32)
        go = go & (i < n_full)
    return i


@triton.jit
def _dkdv_kernel(
    QS, K, V, DOS, LSE2S, DELTAS, QPOSS, KPOS, BROWS, GOFF, GLO, GHI, NGROUP, NINDEX, DK, DV,
    ACCK, ACCV, RD_OFF, WR_OFF, b0, scale_log2, scale, HKV, K_ROW, K_HEAD,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, ACCUM: tl.constexpr, SKIP: tl.constexpr,
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
    dd = tl.arange(0, DP)
    dmask = dd < D
    kmask = cvalid[:, None] & dmask[None, :]
    kin = cols[:, None] * K_ROW + kvh.to(tl.int64) * K_HEAD + dd[None, :]
    kt = tl.load(K + kin, mask=kmask, other=0.0)
    vt = tl.load(V + kin, mask=kmask, other=0.0)
    koff = (cols[:, None] * HKV + kvh) * D + dd[None, :]  # dk / dv: token-major, contiguous
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    dv = tl.zeros([BLOCK_N, DP], tl.float32)
    # The slab holds this group's entries [GLO, GHI) gathered contiguously; slab-local rows fit
    # 32 bits, so the loop's addresses are 32-bit offsets the compiler can pipeline.
    s0 = (tl.load(GLO + grp) - b0).to(tl.int32)
    s1 = (tl.load(GHI + grp) - b0).to(tl.int32)
    n_full = (s1 - s0) // BLOCK_M
    i0 = 0
    if SKIP:
        kmin = tl.min(tl.where(cvalid, kpos, kpos.max()), 0)
        i0 = _first_seeing_tile(QPOSS, s0, n_full, kmin, BLOCK_M)
    for i in range(i0, n_full):
        dk, dv = dkdv_tile_step(
            dk, dv, kt, vt, kpos, QS, DOS, LSE2S, DELTAS, QPOSS, s0 + i * BLOCK_M, 0, D, dmask,
            scale_log2, False, DP != D, IEEE, BLOCK_M, DP,
        )  # fmt: skip
    m0 = s0 + n_full * BLOCK_M
    if m0 < s1:
        dk, dv = dkdv_tile_step(
            dk, dv, kt, vt, kpos, QS, DOS, LSE2S, DELTAS, QPOSS, m0, s1 - m0, D, dmask,
            scale_log2, True, DP != D, IEEE, BLOCK_M, DP,
        )  # fmt: skip
    dk = dk * scale
    if ACCUM:
        # A group split over slabs (at most one per slab boundary) carries its partial dK/dV in
        # float32 from slab to slab through a small scratch of [2, max block rows, D] (read from
        # one half, write the other, alternating per slab: the group arriving and the group
        # leaving a slab may differ), in launch order (deterministic); only its last slab
        # stores to DK, rounding once.
        coff = inblk[:, None] * D + dd[None, :]
        if tl.load(GLO + grp) != tl.load(GOFF + grp):  # started in an earlier slab
            dk += tl.load(ACCK + RD_OFF + coff, mask=kmask, other=0.0)
            dv += tl.load(ACCV + RD_OFF + coff, mask=kmask, other=0.0)
        # Ends in this slab? (else it continues in a later one); as a [BLOCK_N] vector mask.
        ends = (tl.load(GHI + grp) == tl.load(GOFF + grp + 1)).to(tl.int32) + 0 * cols
        carry = cvalid & (ends == 0)
        tl.store(ACCK + WR_OFF + coff, dk, mask=carry[:, None] & dmask[None, :])
        tl.store(ACCV + WR_OFF + coff, dv, mask=carry[:, None] & dmask[None, :])
        kmask = kmask & (ends != 0)[:, None]
    tl.store(DK + koff, dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + koff, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def dq_tile_step(
    dq, q, do, lse2, delta, qpos, kp, vp, kpos_p, n_left, dmask, scale_log2,
    CAUSAL: tl.constexpr, MASK_D: tl.constexpr, IEEE: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key tile of dQ; ``CAUSAL`` as in the forward's ``fwd_tile_step``."""
    kt, vt, cvalid = load_kv_tile(kp, vp, n_left, dmask, CAUSAL, MASK_D, BLOCK_N)
    s = tile_dot(q, tl.trans(kt), IEEE) * scale_log2
    p = tl.exp2(s - lse2[:, None])
    if CAUSAL:
        kpos = tl.load(kpos_p, mask=cvalid, other=0)
        p = tl.where(cvalid[None, :] & (kpos[None, :] <= qpos[:, None]), p, 0.0)
    dp = tile_dot(do, tl.trans(vt), IEEE)
    return dq + tile_dot(p * (dp - delta[:, None]), kt, IEEE)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, LSE2, DELTA, QPOS, KPOS, BROWS, COMP, TGROUP, TSTART, TSTOP, TKEND, TKFREE,
    DQPART, e0, scale_log2, scale, HQ, HKV, KSEL, NENT, K_ROW, K_HEAD,
    D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grp = tl.load(TGROUP + pid)
    if grp < 0:
        return
    rows = tl.load(TSTART + pid) + tl.arange(0, BLOCK_M)
    rv = rows < tl.load(TSTOP + pid)
    ent = tl.load(COMP + rows, mask=rv, other=0) % NENT
    th = ent // KSEL
    dd = tl.arange(0, DP)
    dmask = dd < D
    qoff = th[:, None] * D + dd[None, :]
    q = tl.load(Q + qoff, mask=rv[:, None] & dmask[None, :], other=0.0)
    do = tl.load(DO + qoff, mask=rv[:, None] & dmask[None, :], other=0.0)
    lse2 = tl.load(LSE2 + th, mask=rv, other=float("inf"))
    delta = tl.load(DELTA + th, mask=rv, other=0.0)
    qpos = tl.load(QPOS + th // HQ, mask=rv, other=-1)
    kvh = grp % HKV
    r0 = tl.load(BROWS + grp // HKV)
    kend = tl.load(TKEND + pid)
    # As in the forward: 32-bit induction variables, addresses derived from them.
    n_full = ((tl.load(TKFREE + pid) - r0) // BLOCK_N).to(tl.int32)
    n_all = ((kend - r0 + BLOCK_N - 1) // BLOCK_N).to(tl.int32)
    tile_off = tl.arange(0, BLOCK_N)[:, None] * K_ROW + dd[None, :]
    krow = r0 * 0 + K_ROW  # int64: row offsets of long blocks pass 2^31
    kbase = K + r0 * K_ROW + kvh.to(tl.int64) * K_HEAD
    vbase = V + r0 * K_ROW + kvh.to(tl.int64) * K_HEAD
    dq = tl.zeros([BLOCK_M, DP], tl.float32)
    for i in range(n_full):
        step = i * BLOCK_N * krow
        dq = dq_tile_step(
            dq, q, do, lse2, delta, qpos, kbase + step + tile_off, vbase + step + tile_off, KPOS,
            0, dmask, scale_log2, False, DP != D, IEEE, BLOCK_N,
        )  # fmt: skip
    for i in range(n_full, n_all):
        step = i * BLOCK_N * krow
        n0 = r0 + i * BLOCK_N
        dq = dq_tile_step(
            dq, q, do, lse2, delta, qpos, kbase + step + tile_off, vbase + step + tile_off,
            KPOS + n0 + tl.arange(0, BLOCK_N), kend - n0, dmask, scale_log2, True, DP != D, IEEE,
            BLOCK_N,
        )  # fmt: skip
    local = ent - e0
    tl.store(
        DQPART + local[:, None] * D + dd[None, :], dq * scale, mask=rv[:, None] & dmask[None, :]
    )


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
            b1 - b0, n_ent, plan.topk, plan.hq, D=d, DP=padded_dim(d), BLOCK_R=_GATHER_ROWS,
        )  # fmt: skip
        glo = plan.group_off[:-1].clamp(b0, b1)
        ghi = plan.group_off[1:].clamp(b0, b1)
        group, index = tile_table(torch.where(ghi > glo, blk_len, 0), tile.block_n, bound)
        half = carry_rows * d
        _dkdv_kernel[(bound,)](
            qs, k, v, dos, lse2s, deltas, qposs, keys.k_pos, keys.block_rows, plan.group_off,
            glo, ghi, group.to(torch.int32), index, dk, dv, acc_k, acc_v, (i % 2) * half,
            ((i + 1) % 2) * half, b0, scale * _LOG2E, scale, hkv, k.stride(0), k.stride(1),
            D=d, DP=padded_dim(d), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
            IEEE=q.dtype == torch.float32, ACCUM=multi, SKIP=cfg.dkdv_skip,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
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
            tiles.group, tiles.start, tiles.stop, tiles.kend, tiles.kfree, part, e0,
            scale * _LOG2E, scale, hq, plan.hkv, topk, plan.num_entries, k.stride(0), k.stride(1),
            D=d, DP=padded_dim(d),
            BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n, IEEE=q.dtype == torch.float32, num_warps=tile.num_warps,
            num_stages=tile.num_stages,
        )  # fmt: skip
        # Sum over the valid slots in slot order (deterministic), cast to dq's dtype on store.
        n_rows = (t1 - t0) * hq
        _dq_sum_kernel[(triton.cdiv(n_rows, _SUM_ROWS),)](
            part, prob.sel, dq, t0, hq, n_rows, topk, D=d, DP=padded_dim(d), BLOCK_R=_SUM_ROWS
        )


def prep_rows(
    dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row ``t * Hq + h``: ``lse2`` (base-2 lse, +inf for key-less rows) and
    ``delta = rowsum(dout * out) - dlse``, both float32 ``[Tq * Hq]``; contiguous inputs."""
    tq, hq, d = out.shape
    lse2 = torch.empty(tq * hq, dtype=torch.float32, device=out.device)
    delta = torch.empty_like(lse2)
    dlse_f = None if dlse is None else dlse.float().contiguous()
    _prep_kernel[(math.ceil(tq * hq / _PREP_ROWS),)](
        dout, out, lse.float().contiguous(), lse2 if dlse_f is None else dlse_f, lse2, delta,
        tq, hq, tq * hq, D=d, DP=padded_dim(d), BLOCK_R=_PREP_ROWS, HAS_DLSE=dlse_f is not None,
    )  # fmt: skip
    return lse2, delta


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
    tq = q.shape[0]
    dq = torch.empty(q.shape, dtype=grad_dtype, device=q.device)
    # Key rows no query selected get no program: they must start at zero.
    dk = torch.zeros(k.shape, dtype=grad_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=grad_dtype, device=v.device)
    if tq == 0 or k.shape[0] == 0:
        return dq.zero_(), dk, dv
    lse2, delta = prep_rows(dout, out, lse, dlse)
    _dkdv(q, k, v, dout, lse2, delta, prob, plan, config, dk, dv)
    _dq(q, k, v, dout, lse2, delta, prob, plan, config, dq)
    return dq, dk, dv
