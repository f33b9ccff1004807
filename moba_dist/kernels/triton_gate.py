"""MoBA gate in Triton: query-centroid scores and a running top-(K-1) in registers.

Same contract as ``gate.select_blocks`` (``sel [Tq, Hq, K]`` int32, slot 0 the own block, slots
1.. the chosen strictly-past blocks in descending score order, -1 where there are fewer
candidates, exact ties to the lower block id), without sorting every score row. Two paths:

- exact (default): scores of a query chunk by cuBLAS in IEEE float32 (TF32 off), then
  ``_topk_kernel`` walks each row's candidate columns BLOCK_C at a time and keeps the best K-1
  in a ``[BLOCK_T, KP]`` register set. (A fused kernel with an IEEE ``tl.dot`` measured slower
  than the torch gate on the H100: Triton's float32 dot without TF32 is not tensor-core work.)
- fused (opt-in "tf32x3" / "tf32"): ``_gate_kernel`` scores with ``tl.dot`` on tensor cores and
  merges the tiles into the same register set; no score ever reaches memory, O(T * H * K).

Tie rule inside the running set: a new block (higher id than every kept one) replaces the
weakest kept one only when its score is strictly greater, and the weakest is the lowest score,
among equals the highest id; so among equal scores lower ids win, as in the stable sort of the
torch gate. Scores of near-ties may differ from the torch gate by float32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["block_sums_triton", "select_blocks_triton"]

# Queries per program x candidate blocks per score tile: tl.dot needs both >= 16.
_BLOCK_T = 64
_BLOCK_C = 32
# Scores of one query chunk in the exact path (float32 elements: 256 MiB).
_SCORE_BUDGET = 1 << 26
# Key rows per step of the block-sum kernel.
_SUM_ROWS = 64


@triton.jit
def _block_sum_kernel(K, STARTS, OUT, HKV, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (block j, KV head g): float32 sum of k[starts[j]:starts[j+1], g], rows in
    # a fixed order (deterministic). STARTS is int64, so every row offset is int64.
    j = tl.program_id(0)
    g = tl.program_id(1)
    r0 = tl.load(STARTS + j)
    r1 = tl.load(STARTS + j + 1)
    dd = tl.arange(0, BLOCK_D)
    dv = dd < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for r in range(r0, r1, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        x = tl.load(
            K + (rows[:, None] * HKV + g) * D + dd[None, :],
            mask=(rows < r1)[:, None] & dv[None, :], other=0.0,
        )  # fmt: skip
        acc += x.to(tl.float32)
    tl.store(OUT + (j.to(tl.int64) * HKV + g) * D + dd, tl.sum(acc, 0), mask=dv)


def block_sums_triton(k: torch.Tensor, block_starts: torch.Tensor) -> torch.Tensor:
    """Float32 sums of the contiguous row blocks ``k[block_starts[j]:block_starts[j + 1]]`` of
    ``k [T, Hkv, D]`` -> ``[N, Hkv, D]``: one read of k, no host synchronisation."""
    _, hkv, d = k.shape
    n = block_starts.numel() - 1
    out = torch.empty((n, hkv, d), dtype=torch.float32, device=k.device)
    if n == 0 or hkv == 0 or d == 0:
        return out.zero_()
    _block_sum_kernel[(n, hkv)](
        k.contiguous(), block_starts.to(torch.int64).contiguous(), out, hkv, d,
        BLOCK_R=_SUM_ROWS, BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
    return out


@triton.jit
def _insert_tile(s, cid, top_v, top_i, KSEL):
    """Merge one tile of scores ``s [BLOCK_T, BLOCK_C]`` (ids ``cid``, all above the kept ids)
    into the kept set: K - 1 rounds, each moving the tile's best (lowest id among equals) in
    when it beats the weakest kept entry strictly."""
    for _ in range(KSEL - 1):
        best = tl.max(s, 1)
        bid = tl.min(tl.where(s == best[:, None], cid[None, :], 2147483647), 1)
        weak_v = tl.min(top_v, 1)
        is_weak = top_v == weak_v[:, None]
        weak_i = tl.max(tl.where(is_weak, top_i, -1), 1)
        put = is_weak & (top_i == weak_i[:, None]) & (best > weak_v)[:, None]
        top_v = tl.where(put, best[:, None], top_v)
        top_i = tl.where(put, bid[:, None], top_i)
        s = tl.where(cid[None, :] == bid[:, None], float("-inf"), s)
    return top_v, top_i


@triton.jit
def _gate_kernel(
    Q, C, QBLOCK, QFIRST, SEL, TQ, HQ, HKV, KSEL,
    D: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tv = t < TQ
    g = h // (HQ // HKV)
    dd = tl.arange(0, D)
    q = tl.load(Q + (t[:, None] * HQ + h) * D + dd[None, :], mask=tv[:, None], other=0.0)
    q = q.to(tl.float32)
    own = tl.load(QBLOCK + t, mask=tv, other=0)
    first = tl.load(QFIRST + t, mask=tv, other=0)
    lo = tl.min(tl.where(tv, first, 1 << 62), 0)
    hi = tl.max(tl.where(tv, own, 0), 0)
    top_v, top_i = _empty_set(KSEL, BLOCK_T, KP)
    for c0 in range(lo, hi, BLOCK_C):
        cid = c0 + tl.arange(0, BLOCK_C)
        cv = cid < hi
        ct = tl.load(C + (cid[None, :] * HKV + g) * D + dd[:, None], mask=cv[None, :], other=0.0)
        s = tl.dot(q, ct.to(tl.float32), input_precision=PREC)
        # Candidates: strictly-past blocks of the query's own sequence.
        ok = (cid[None, :] >= first[:, None]) & (cid[None, :] < own[:, None])
        top_v, top_i = _insert_tile(tl.where(ok, s, float("-inf")), cid, top_v, top_i, KSEL)
    _emit(SEL + (t * HQ + h) * KSEL, tv, own, top_v, top_i, KSEL, KP)


@triton.jit
def _topk_kernel(
    S, QBLOCK, QFIRST, SEL, t0, n_rows, HQ, R, lo, KSEL, C, GRP,
    KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # Rows (t - t0) * Hq + h of a chunk of C queries; the scores S [Hkv, C, GRP, R] come
    # straight from the batched GEMM (h = g * GRP + i), column c is block lo + c.
    row = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    rv = row < n_rows
    t = t0 + row // HQ
    h = row % HQ
    srow = ((h // GRP) * C + row // HQ) * GRP + h % GRP
    own = tl.load(QBLOCK + t, mask=rv, other=0)
    first = tl.load(QFIRST + t, mask=rv, other=0)
    top_v, top_i = _empty_set(KSEL, BLOCK_T, KP)
    c_lo = tl.maximum(tl.min(tl.where(rv, first, 1 << 62), 0), lo)
    for c0 in range(c_lo, tl.max(tl.where(rv, own, 0), 0), BLOCK_C):
        cid = c0 + tl.arange(0, BLOCK_C)
        ok = (cid[None, :] >= first[:, None]) & (cid[None, :] < own[:, None]) & rv[:, None]
        s = tl.load(S + srow[:, None] * R + (cid - lo)[None, :], mask=ok, other=float("-inf"))
        top_v, top_i = _insert_tile(s, cid, top_v, top_i, KSEL)
    _emit(SEL + (t0 * HQ + row) * KSEL, rv, own, top_v, top_i, KSEL, KP)


@triton.jit
def _empty_set(KSEL, BLOCK_T: tl.constexpr, KP: tl.constexpr):
    """An empty kept set: slots past K - 1 hold +inf so they are never the weakest."""
    slot = tl.arange(0, KP)
    top_v = tl.where(slot[None, :] < KSEL - 1, float("-inf"), float("inf")) + tl.zeros(
        [BLOCK_T, KP], tl.float32
    )
    top_i = (1 << 30) + slot[None, :] + tl.zeros([BLOCK_T, KP], tl.int64)
    return top_v, top_i


@triton.jit
def _emit(OUT, valid, own, top_v, top_i, KSEL, KP: tl.constexpr):
    """Write slot 0 (own block), then the kept set in descending score order (ties to the lower
    id) into ``OUT [rows] -> K int32 slots``; -1 where fewer candidates were kept."""
    tl.store(OUT, own.to(tl.int32), mask=valid)
    slot = tl.arange(0, KP)
    top_v = tl.where(slot[None, :] < KSEL - 1, top_v, float("-inf"))
    for r in range(1, KSEL):
        best_v = tl.max(top_v, 1)
        is_best = top_v == best_v[:, None]
        best_i = tl.min(tl.where(is_best, top_i, 1 << 62), 1)
        out = tl.where(best_v > float("-inf"), best_i, -1)
        tl.store(OUT + r, out.to(tl.int32), mask=valid)
        taken = is_best & (top_i == best_i[:, None])
        top_v = tl.where(taken, float("-inf"), top_v)
        top_i = tl.where(taken, 1 << 62, top_i)


def select_blocks_triton(
    q: torch.Tensor,
    centroids: torch.Tensor,
    q_block: torch.Tensor,
    q_seq_first: torch.Tensor,
    topk: int,
    precision: str = "ieee",
) -> torch.Tensor:
    """Drop-in for ``gate.select_blocks`` (float32 centroids; CUDA, or CPU under the Triton
    interpreter): ``q [Tq, Hq, D]``, ``centroids [N, Hkv, D]``, ``q_block, q_seq_first [Tq]``
    -> ``sel [Tq, Hq, K]`` int32.

    ``precision``: "ieee" (default: exact float32 scores by cuBLAS with TF32 off, then the
    running top-k kernel) or the explicit opt-ins "tf32x3" (one fused kernel on tensor cores,
    near-float32) and "tf32" (about 1e-3 relative score error), which can change near-tie
    choices; measure the routing agreement before using them."""
    if centroids.dtype != torch.float32:
        raise TypeError(f"select_blocks_triton takes float32 centroids, got {centroids.dtype}")
    tq, hq, d = q.shape
    sel = torch.empty((tq, hq, topk), dtype=torch.int32, device=q.device)
    if tq == 0:
        return sel
    kp = max(2, triton.next_power_of_2(max(1, topk - 1)))
    if precision not in ("ieee", "tf32x3", "tf32"):
        raise ValueError(f"precision must be ieee, tf32x3 or tf32; got {precision!r}")
    qb, qf = q_block.to(torch.int64).contiguous(), q_seq_first.to(torch.int64).contiguous()
    if precision == "ieee":
        _select_exact(q, centroids, qb, qf, sel, kp)
        return sel
    grid = (triton.cdiv(tq, _BLOCK_T), hq)
    _gate_kernel[grid](
        q.contiguous(), centroids.contiguous(), qb, qf, sel, tq, hq, centroids.shape[1], topk,
        D=d, KP=kp, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C, PREC=precision,
    )  # fmt: skip
    return sel


def _select_exact(q, centroids, q_block, q_first, sel, kp: int) -> None:
    """Exact float32 path: scores of a query chunk by cuBLAS (TF32 off), then the running
    top-k kernel over each score row (replaces the torch gate's full sort of every row)."""
    tq, hq, d = q.shape
    n, hkv, _ = centroids.shape
    chunk = max(1, _SCORE_BUDGET // (hq * max(1, n)))
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the default gate is exact IEEE float32
    # Candidate range of every chunk, fetched in one host synchronisation (not two per chunk):
    # pad the last chunk with its own last query, so the padded min / max are its own.
    n_chunks = -(-tq // chunk)
    pad = n_chunks * chunk - tq
    ends = torch.stack([
        torch.cat([q_first, q_first[-1:].expand(pad)]).view(n_chunks, chunk).amin(1),
        torch.cat([q_block, q_block[-1:].expand(pad)]).view(n_chunks, chunk).amax(1),
    ]).tolist()  # fmt: skip
    try:
        for i, c0 in enumerate(range(0, tq, chunk)):
            c1 = min(tq, c0 + chunk)
            lo, hi = ends[0][i], max(ends[1][i], 1)
            lo = min(lo, hi - 1)
            # KV-head-major float32 queries (one copy), so the batched GEMM writes the scores
            # [Hkv, C * G, R] contiguous and the top-k kernel reads them in place (no copy of
            # the score chunk).
            c, grp = c1 - c0, hq // hkv
            qg = torch.empty((hkv, c, grp, d), dtype=torch.float32, device=q.device)
            qg.copy_(q[c0:c1].view(c, hkv, grp, d).transpose(0, 1))
            scores = torch.bmm(qg.view(hkv, c * grp, d), centroids[lo:hi].permute(1, 2, 0))
            rows = c * hq
            _topk_kernel[(triton.cdiv(rows, _BLOCK_T),)](
                scores, q_block, q_first, sel, c0, rows, hq, hi - lo, lo, sel.shape[2], c, grp,
                KP=kp, BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C,
            )  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
