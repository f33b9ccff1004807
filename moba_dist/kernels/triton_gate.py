"""Fused MoBA gate in Triton: query-centroid scores and a running top-(K-1) in registers.

Same contract as ``gate.select_blocks`` (``sel [Tq, Hq, K]`` int32, slot 0 the own block, slots
1.. the chosen strictly-past blocks in descending score order, -1 where there are fewer
candidates, exact ties to the lower block id) without ever storing a score: one program takes
BLOCK_T queries of one head, walks the candidate blocks in ascending id, scores each as an exact
IEEE float32 dot product (elementwise products and a sum, no TF32), and keeps the best K-1 in a
``[BLOCK_T, KP]`` register set. Memory is the output alone, O(T * H * K).

Tie rule inside the running set: a new block (higher id than every kept one) replaces the
weakest kept one only when its score is strictly greater, and the weakest is the lowest score,
among equals the highest id; so among equal scores lower ids win, as in the stable sort of the
torch gate. Scores of near-ties may differ from the torch gate by float32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["select_blocks_triton"]

_BLOCK_T = 32


@triton.jit
def _gate_kernel(
    Q, C, QBLOCK, QFIRST, SEL, TQ, HQ, HKV, KSEL,
    D: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
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
    slot = tl.arange(0, KP)
    # Slots past K - 1 hold +inf so they are never the weakest: they stay out of the set.
    top_v = tl.where(slot[None, :] < KSEL - 1, float("-inf"), float("inf")) + tl.zeros(
        [BLOCK_T, KP], tl.float32
    )
    top_i = (1 << 30) + slot[None, :] + tl.zeros([BLOCK_T, KP], tl.int64)
    for j in range(lo, hi):
        c = tl.load(C + (j * HKV + g) * D + dd).to(tl.float32)
        s = tl.sum(q * c[None, :], 1)
        s = tl.where((j >= first) & (j < own), s, float("-inf"))
        weak_v = tl.min(top_v, 1)
        is_weak = top_v == weak_v[:, None]
        weak_i = tl.max(tl.where(is_weak, top_i, -1), 1)
        put = is_weak & (top_i == weak_i[:, None]) & (s > weak_v)[:, None]
        top_v = tl.where(put, s[:, None], top_v)
        top_i = tl.where(put, j, top_i)
    tl.store(SEL + (t * HQ + h) * KSEL, own.to(tl.int32), mask=tv)
    # Emit in descending score order, ties to the lower id; slots past K - 1 hold +inf: skip.
    top_v = tl.where(slot[None, :] < KSEL - 1, top_v, float("-inf"))
    for r in range(1, KSEL):
        best_v = tl.max(top_v, 1)
        is_best = top_v == best_v[:, None]
        best_i = tl.min(tl.where(is_best, top_i, 1 << 62), 1)
        out = tl.where(best_v > float("-inf"), best_i, -1)
        tl.store(SEL + (t * HQ + h) * KSEL + r, out.to(tl.int32), mask=tv)
        taken = is_best & (top_i == best_i[:, None])
        top_v = tl.where(taken, float("-inf"), top_v)
        top_i = tl.where(taken, 1 << 62, top_i)


def select_blocks_triton(
    q: torch.Tensor,
    centroids: torch.Tensor,
    q_block: torch.Tensor,
    q_seq_first: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    """Drop-in for ``gate.select_blocks`` (float32 centroids; CUDA, or CPU under the Triton
    interpreter): ``q [Tq, Hq, D]``, ``centroids [N, Hkv, D]``, ``q_block, q_seq_first [Tq]``
    -> ``sel [Tq, Hq, K]`` int32."""
    if centroids.dtype != torch.float32:
        raise TypeError(f"select_blocks_triton takes float32 centroids, got {centroids.dtype}")
    tq, hq, d = q.shape
    sel = torch.empty((tq, hq, topk), dtype=torch.int32, device=q.device)
    if tq == 0:
        return sel
    kp = max(2, triton.next_power_of_2(max(1, topk - 1)))
    grid = (triton.cdiv(tq, _BLOCK_T), hq)
    _gate_kernel[grid](
        q.contiguous(), centroids.contiguous(), q_block.to(torch.int64).contiguous(),
        q_seq_first.to(torch.int64).contiguous(), sel, tq, hq, centroids.shape[1], topk,
        D=d, KP=kp, BLOCK_T=_BLOCK_T,
    )  # fmt: skip
    return sel
