"""Dense causal flash attention in Triton, built from the routed kernels' own tile steps.

The yardstick issue 13 asks for: at block 4096 MoBA's kernels should reach >= 0.9x this
kernel's useful TFLOP/s. Because the inner loops are literally the routed kernels' steps
(``fwd_tile_step``, ``dkdv_tile_step``, ``dq_tile_step``), the gap between the two measures what
routing costs (gathers, per-entry partials, the merge, the plan), not a different inner loop.

Inputs ``[B, H, S, D]`` contiguous (``S`` a multiple of the tiles), GQA by ``H % Hkv == 0``.
Forward per (query tile, b * H + h): keys before the tile unmasked, the diagonal masked. Backward:
dK/dV per (key tile, b * Hkv + g) looping over the group's query heads and the query tiles from
the diagonal on; dQ per (query tile, b * H + h). No atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_dist.kernels.triton_bwd import dkdv_tile_step, dq_tile_step
from moba_dist.kernels.triton_fwd import fwd_tile_step

__all__ = ["dense_triton_fwd", "dense_triton_fwd_bwd"]

_LOG2E = 1.4426950408889634


@triton.jit
def _dense_fwd(
    Q, K, V, OUT, LSE2, POS, S, H, HKV, scale_log2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    mb, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kvbh = (b * HKV + h // (H // HKV)).to(tl.int64)
    offs = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, D)
    qp = Q + bh.to(tl.int64) * S * D
    q = tl.load(qp + offs[:, None] * D + dd[None, :])
    tile_off = tl.arange(0, BLOCK_N)[:, None] * D + dd[None, :]
    kb = K + kvbh * S * D + tile_off
    vb = V + kvbh * S * D + tile_off
    ones = dd < D
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, mb * BLOCK_M, BLOCK_N):
        acc, m_i, l_i = fwd_tile_step(
            acc, m_i, l_i, q, kb + n0 * D, vb + n0 * D, POS, offs, 0, ones, scale_log2,
            False, False, False, BLOCK_N,
        )  # fmt: skip
    for n0 in range(mb * BLOCK_M, (mb + 1) * BLOCK_M, BLOCK_N):
        acc, m_i, l_i = fwd_tile_step(
            acc, m_i, l_i, q, kb + n0 * D, vb + n0 * D, POS + n0 + tl.arange(0, BLOCK_N), offs,
            BLOCK_N, ones, scale_log2, True, False, False, BLOCK_N,
        )  # fmt: skip
    tl.store(
        OUT + bh.to(tl.int64) * S * D + offs[:, None] * D + dd[None, :],
        (acc / l_i[:, None]).to(OUT.dtype.element_ty),
    )
    tl.store(LSE2 + bh.to(tl.int64) * S + offs, m_i + tl.log2(l_i))


@triton.jit
def _dense_dkdv(
    Q, K, V, DO, LSE2, DELTA, POS, DK, DV, S, H, HKV, scale_log2, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    nb, bg = tl.program_id(0), tl.program_id(1)
    b, g = bg // HKV, bg % HKV
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, D)
    koff = bg.to(tl.int64) * S * D + cols[:, None] * D + dd[None, :]
    kt = tl.load(K + koff)
    vt = tl.load(V + koff)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    ones = dd < D
    group = H // HKV
    for hh in range(group):
        bh = (b * H + g * group + hh).to(tl.int64)
        for m0 in range(nb * BLOCK_N // BLOCK_M * BLOCK_M, S, BLOCK_M):
            dk, dv = dkdv_tile_step(
                dk, dv, kt, vt, cols, Q + bh * S * D, DO + bh * S * D, LSE2 + bh * S,
                DELTA + bh * S, POS, m0, 0, D, ones, scale_log2, False, False, False, BLOCK_M, D,
            )  # fmt: skip
    tl.store(DK + koff, (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + koff, dv.to(DV.dtype.element_ty))


@triton.jit
def _dense_dq(
    Q, K, V, DO, LSE2, DELTA, POS, DQ, S, H, HKV, scale_log2, scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    mb, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    kvbh = (b * HKV + h // (H // HKV)).to(tl.int64)
    offs = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, D)
    qoff = bh.to(tl.int64) * S * D + offs[:, None] * D + dd[None, :]
    q, do = tl.load(Q + qoff), tl.load(DO + qoff)
    lse2 = tl.load(LSE2 + bh.to(tl.int64) * S + offs)
    delta = tl.load(DELTA + bh.to(tl.int64) * S + offs)
    tile_off = tl.arange(0, BLOCK_N)[:, None] * D + dd[None, :]
    kb = K + kvbh * S * D + tile_off
    vb = V + kvbh * S * D + tile_off
    ones = dd < D
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, mb * BLOCK_M, BLOCK_N):
        dq = dq_tile_step(
            dq, q, do, lse2, delta, offs, kb + n0 * D, vb + n0 * D, POS, 0, ones, scale_log2,
            False, False, False, BLOCK_N,
        )  # fmt: skip
    for n0 in range(mb * BLOCK_M, (mb + 1) * BLOCK_M, BLOCK_N):
        dq = dq_tile_step(
            dq, q, do, lse2, delta, offs, kb + n0 * D, vb + n0 * D,
            POS + n0 + tl.arange(0, BLOCK_N), BLOCK_N, ones, scale_log2, True, False, False,
            BLOCK_N,
        )  # fmt: skip
    tl.store(DQ + qoff, (dq * scale).to(DQ.dtype.element_ty))


def _check(q, k, tiles):
    s = q.shape[2]
    if s % max(tiles) or q.shape[1] % k.shape[1]:
        raise ValueError(f"S={s} must be a multiple of the tiles {tiles}; got q {tuple(q.shape)}")


def dense_triton_fwd(q, k, v, tiles=(128, 64, 8, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal ``out [B, H, S, D]`` and base-2 ``lse2 [B, H, S]``."""
    bm, bn, warps, stages = tiles
    _check(q, k, (bm, bn))
    b, h, s, d = q.shape
    out = torch.empty_like(q)
    lse2 = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    pos = torch.arange(s, device=q.device)
    _dense_fwd[(s // bm, b * h)](
        q, k, v, out, lse2, pos, s, h, k.shape[1], d**-0.5 * _LOG2E,
        D=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse2


def dense_triton_fwd_bwd(q, k, v, do, fwd_tiles=(128, 64, 8, 3), dkdv_tiles=(64, 128, 8, 2),
                         dq_tiles=(128, 64, 8, 2)):  # fmt: skip
    """Forward then backward: ``dq, dk, dv`` in the inputs' dtype."""
    out, lse2 = dense_triton_fwd(q, k, v, fwd_tiles)
    b, h, s, d = q.shape
    hkv = k.shape[1]
    delta = (do.float() * out.float()).sum(-1)
    pos = torch.arange(s, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scale = d**-0.5
    bm, bn, warps, stages = dkdv_tiles
    _check(q, k, (bm, bn))
    _dense_dkdv[(s // bn, b * hkv)](
        q, k, v, do, lse2, delta, pos, dk, dv, s, h, hkv, scale * _LOG2E, scale,
        D=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    bm, bn, warps, stages = dq_tiles
    _check(q, k, (bm, bn))
    _dense_dq[(s // bm, b * h)](
        q, k, v, do, lse2, delta, pos, dq, s, h, hkv, scale * _LOG2E, scale,
        D=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dq, dk, dv
