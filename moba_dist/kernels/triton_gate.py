"""MoBA gate in Triton: one fused kernel for scores and top-k, plus the block-sum kernel.

Same contract as ``gate.select_blocks`` (``sel [Tq, Hq, K]`` int32, slot 0 the own block, slots
1.. the chosen strictly-past blocks in descending score order, -1 where there are fewer
candidates, exact ties to the lower block id; see docs/routing.md).

``_gate_kernel``: one program per (tile of BLOCK_T queries, query head). It streams the centroid
tiles of the tile's candidate range (past blocks of the queries' own sequences, so about
T / (2 B) blocks per query at long context), scores them on tensor cores and merges them into a
running top-(K-1) held in registers: no score reaches memory, memory is O(T * H * K).

Float32-quality scores on bf16 tensor cores: every float32 centroid is split into bf16 pieces
``c = c1 + c2 + c3 (+ |c| * 2^-27)`` once per call, the query into 1 (bf16, exact), 2 (fp16,
exact) or 3 (float32) bf16 pieces in the kernel, and the products whose pieces sum to an error
above ~2^-24 are accumulated in float32, smallest first. The error of a score is then below
~2^-24 * |q| * |c|, float32 level (docs/routing.md). ``precision="bf16x2"`` / ``"bf16"`` drop
pieces (faster, measured agreement in docs/routing.md) and are opt-in only.

Head dims: D in ``config.HEAD_DIMS`` (64, 96, 128, 256). ``tl.dot`` needs a power-of-two
reduction length, so the dot dimension is padded to ``DP = next_power_of_2(D)`` (96 -> 128) with
masked loads that read zeros past D; the padding adds nothing to any score.

Tie rule inside the running set: a new block (higher id than every kept one, tiles stream in
ascending id order) replaces the weakest kept one only when its score is strictly greater, and
the weakest is the lowest score, among equals the highest id; so among equal scores lower ids
win, as in the stable sort of the torch gate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moba_dist.config import GATE_PRECISIONS, check_head_dim

__all__ = [
    "PRECISIONS",
    "block_sums_triton",
    "centroid_pieces",
    "launch_config",
    "select_blocks_triton",
]

#: Score precisions of the fused gate: centroid pieces per name (float32 quality needs 3).
PRECISIONS = dict(zip(GATE_PRECISIONS, (3, 2, 1), strict=True))
# Tile shape and launch shape of the gate kernel per head dim (tl.dot needs both tile sides
# >= 16); tests shrink the tiles to exercise tiles that straddle blocks and sequences. D <= 128:
# measured best of 8 shapes at D = 128 on the H200 (benchmarks/results/nvidia-h200/gate/);
# D = 256 takes 8 warps, the one shape tried whose query tile stays in registers without a
# stack (ptxas for sm_90: 232 registers, no stack; 4 warps spill 1-3 KB).
_BASE_CONFIG = dict(BLOCK_T=128, BLOCK_C=32, num_warps=4, num_stages=3)
_CONFIGS = {64: _BASE_CONFIG, 96: _BASE_CONFIG, 128: _BASE_CONFIG,
            256: dict(BLOCK_T=128, BLOCK_C=32, num_warps=8, num_stages=2)}  # fmt: skip
# Bytes of query pieces a program may hold (the compiler keeps them in shared memory across the
# loop): float32 queries at D = 256 (3 pieces) halve the query tile to stay under the H200's
# 227 KB of shared memory per program.
_Q_PIECE_BYTES = 128 * 1024
# Elements of k per step of a block-sum program (rows = this / padded D).
_SUM_ELEMS = 8192
_BIG = tl.constexpr(2147483647)


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
    dp = triton.next_power_of_2(d)
    _block_sum_kernel[(n, hkv)](
        k.contiguous(), block_starts.to(torch.int64).contiguous(), out, hkv, d,
        BLOCK_R=max(16, _SUM_ELEMS // dp), BLOCK_D=dp,
    )  # fmt: skip
    return out


@triton.jit
def _split(x, QP: tl.constexpr, DOT: tl.constexpr):
    """``x`` (float32) as up to 3 pieces of the dot dtype, largest first (unused ones = p1)."""
    p1 = x.to(DOT)
    p2 = p1
    p3 = p1
    if QP >= 2:
        r = x - p1.to(tl.float32)
        p2 = r.to(DOT)
        if QP >= 3:
            p3 = (r - p2.to(tl.float32)).to(DOT)
    return p1, p2, p3


@triton.jit
def _load_tile(ptr, PSTRIDE, cv, dd, D: tl.constexpr, DP: tl.constexpr, CPN: tl.constexpr):
    """The ``[BLOCK_C, DP]`` tiles of the centroid pieces at ``ptr`` (piece p at
    ``+ (p - 1) * PSTRIDE``; unused ones = piece 1), zero in rows past the candidate range and
    in the padding columns ``dd >= D``."""
    m = cv[:, None]
    if D < DP:  # constexpr: power-of-two D loads without a column mask
        m = m & (dd < D)[None, :]
    c1 = tl.load(ptr, mask=m, other=0.0)
    c2 = c1
    c3 = c1
    if CPN >= 2:
        c2 = tl.load(ptr + PSTRIDE, mask=m, other=0.0)
        if CPN >= 3:
            c3 = tl.load(ptr + 2 * PSTRIDE, mask=m, other=0.0)
    return c1, c2, c3


@triton.jit
def _scores(q1, q2, q3, c1, c2, c3, QP: tl.constexpr, CPN: tl.constexpr, acc):
    """Scores of the query pieces against one tile of centroid pieces: the products q_i * c_j
    with i + j <= CPN + 1, smallest first, so float32 accumulation keeps the small terms."""
    if CPN >= 2:
        if CPN >= 3:
            acc = tl.dot(q1, tl.trans(c3), acc)
            if QP >= 3:
                acc = tl.dot(q3, tl.trans(c1), acc)
            if QP >= 2:
                acc = tl.dot(q2, tl.trans(c2), acc)
        acc = tl.dot(q1, tl.trans(c2), acc)
        if QP >= 2:
            acc = tl.dot(q2, tl.trans(c1), acc)
    return tl.dot(q1, tl.trans(c1), acc)


@triton.jit
def _merge(s, cid, top_v, top_i, KSEL):
    """Merge a score tile ``s [BLOCK_T, BLOCK_C]`` (ids ``cid``, above every kept id) into the
    kept set. Only entries beating a row's weakest kept score can enter, so the tile costs one
    compare-and-count unless some row has such entries; then one round per entry that can enter
    (at most K - 1), each moving the tile's best (lowest id among equals) in when it beats the
    weakest kept entry strictly."""
    weak_v = tl.min(top_v, 1)
    beats = tl.sum((s > weak_v[:, None]).to(tl.int32), 1)
    rounds = tl.minimum(tl.max(beats, 0), KSEL - 1)
    for _ in range(rounds):
        best = tl.max(s, 1)
        bid = tl.min(tl.where(s == best[:, None], cid[None, :], _BIG), 1)
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
    Q, CP, QBLOCK, QFIRST, SEL, TQ, HQ, HKV, N, PSTRIDE, KSEL, NUM_TILES,
    D: tl.constexpr, DP: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr, QP: tl.constexpr, CPN: tl.constexpr,
):  # fmt: skip
    # Latest query tiles (most candidates) first, so the causal imbalance does not make a tail;
    # consecutive programs share a head and so stream the same centroids (L2 reuse).
    tile = NUM_TILES - 1 - tl.program_id(0)
    h = tl.program_id(1)
    t = (tile * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tv = t < TQ
    g = h // (HQ // HKV)
    dd = tl.arange(0, DP)
    qm = tv[:, None]
    if D < DP:
        qm = qm & (dd < D)[None, :]
    q = tl.load(Q + (t[:, None] * HQ + h) * D + dd[None, :], mask=qm, other=0.0)
    q1, q2, q3 = _split(q.to(tl.float32), QP, CP.dtype.element_ty)
    own = tl.load(QBLOCK + t, mask=tv, other=0).to(tl.int32)
    first = tl.load(QFIRST + t, mask=tv, other=0).to(tl.int32)
    lo = tl.min(tl.where(tv, first, _BIG), 0)
    hi = tl.max(tl.where(tv, own, 0), 0)
    # Tiles inside [max first, min own) hold candidates of every query: no mask needed.
    first_max = tl.max(tl.where(tv, first, 0), 0)
    own_min = tl.min(tl.where(tv, own, _BIG), 0)
    slot = tl.arange(0, KP)
    # Empty kept set: slots past K - 1 hold +inf so they are never the weakest.
    top_v = tl.where(slot[None, :] < KSEL - 1, float("-inf"), float("inf")) + tl.zeros(
        [BLOCK_T, KP], tl.float32
    )
    top_i = (1 << 30) + slot[None, :] + tl.zeros([BLOCK_T, KP], tl.int32)
    cid = lo + tl.arange(0, BLOCK_C)
    ptr = CP + g.to(tl.int64) * N * D + cid[:, None].to(tl.int64) * D + dd[None, :]
    # The next tile's loads are issued at the end of each step (a hand prefetch before the
    # dots measured slower on the H200: benchmarks/results/nvidia-h200/gate/).
    n1, n2, n3 = _load_tile(ptr, PSTRIDE, cid < hi, dd, D, DP, CPN)
    for c0 in range(lo, hi, BLOCK_C):
        c1, c2, c3 = n1, n2, n3
        cid = c0 + tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        s = _scores(q1, q2, q3, c1, c2, c3, QP, CPN, acc)
        if (c0 < first_max) | (c0 + BLOCK_C > own_min):
            ok = (cid[None, :] >= first[:, None]) & (cid[None, :] < own[:, None])
            s = tl.where(ok, s, float("-inf"))
        top_v, top_i = _merge(s, cid, top_v, top_i, KSEL)
        ptr += BLOCK_C * D
        n1, n2, n3 = _load_tile(ptr, PSTRIDE, cid + BLOCK_C < hi, dd, D, DP, CPN)
    _emit(SEL + (t * HQ + h) * KSEL, tv, own, top_v, top_i, KSEL, KP)


@triton.jit
def _emit(OUT, valid, own, top_v, top_i, KSEL, KP: tl.constexpr):
    """Write slot 0 (own block), then the kept set in descending score order (ties to the lower
    id) into ``OUT [rows] -> K int32 slots``; -1 where fewer candidates were kept."""
    tl.store(OUT, own, mask=valid)
    slot = tl.arange(0, KP)
    top_v = tl.where(slot[None, :] < KSEL - 1, top_v, float("-inf"))
    for r in range(1, KSEL):
        best_v = tl.max(top_v, 1)
        is_best = top_v == best_v[:, None]
        best_i = tl.min(tl.where(is_best, top_i, _BIG), 1)
        tl.store(OUT + r, tl.where(best_v > float("-inf"), best_i, -1), mask=valid)
        taken = is_best & (top_i == best_i[:, None])
        top_v = tl.where(taken, float("-inf"), top_v)
        top_i = tl.where(taken, _BIG, top_i)


def centroid_pieces(centroids: torch.Tensor, pieces: int, dtype: torch.dtype) -> torch.Tensor:
    """``centroids [N, Hkv, D]`` float32 -> ``[pieces, Hkv, N, D]`` whose sum over the first axis
    is ``centroids`` to ``2^(-9 * pieces)`` relative (each piece is the bf16 rounding of what the
    previous ones left). ``dtype`` float32 keeps the bf16-rounded values in float32 storage (the
    Triton interpreter's bf16 dot is wrong)."""
    rest = centroids.transpose(0, 1).contiguous()
    out = torch.empty((pieces, *rest.shape), dtype=dtype, device=centroids.device)
    for p in range(pieces):
        piece = rest.to(torch.bfloat16)
        out[p] = piece
        rest = rest - piece.float()
    return out


def select_blocks_triton(
    q: torch.Tensor,
    centroids: torch.Tensor,
    q_block: torch.Tensor,
    q_seq_first: torch.Tensor,
    topk: int,
    precision: str = "float32",
) -> torch.Tensor:
    """Drop-in for ``gate.select_blocks`` (float32 centroids; CUDA, or CPU under the Triton
    interpreter): ``q [Tq, Hq, D]`` fp16/bf16/fp32 with D in ``config.HEAD_DIMS``,
    ``centroids [N, Hkv, D]``, ``q_block, q_seq_first [Tq]`` -> ``sel [Tq, Hq, K]`` int32.

    ``precision``: "float32" (default; float32-quality scores, docs/routing.md) or the opt-ins
    "bf16x2" / "bf16" (fewer centroid pieces; near-tie choices can change, measured agreement
    in docs/routing.md)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if centroids.dtype != torch.float32:
        raise TypeError(f"select_blocks_triton takes float32 centroids, got {centroids.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"select_blocks_triton takes fp16/bf16/fp32 q, got {q.dtype}")
    tq, hq, d = q.shape
    n, hkv, _ = centroids.shape
    check_head_dim(d, "the fused gate's head dim D of q [Tq, Hq, D]")
    if centroids.shape[2] != d or hq % hkv:
        raise ValueError(
            f"centroids [N, Hkv, D] must match q [Tq, Hq, D] in D with Hq % Hkv == 0, got q "
            f"{tuple(q.shape)}, centroids {tuple(centroids.shape)}"
        )
    sel = torch.empty((tq, hq, topk), dtype=torch.int32, device=q.device)
    if tq == 0:
        return sel
    cpn = PRECISIONS[precision]
    # Query pieces: bf16 is exact in 1, fp16 in 2 (11 bits), float32 needs 3 (24 bits).
    qp = {torch.bfloat16: 1, torch.float16: 2}.get(q.dtype, 3) if cpn > 1 else 1
    interpreted = q.device.type == "cpu"
    if interpreted:  # float32 storage and dots: q needs no split
        qp, q = 1, q.float()
    pieces = centroid_pieces(centroids, cpn, torch.float32 if interpreted else torch.bfloat16)
    cfg = launch_config(d, qp, cpn, topk)
    n_tiles = triton.cdiv(tq, cfg["BLOCK_T"])
    _gate_kernel[(n_tiles, hq)](
        q.contiguous(), pieces, q_block.to(torch.int32).contiguous(),
        q_seq_first.to(torch.int32).contiguous(), sel, tq, hq, hkv, n, hkv * n * d, topk,
        n_tiles, **cfg,
    )  # fmt: skip
    return sel


def launch_config(d: int, qp: int, cpn: int, topk: int) -> dict:
    """Constexprs and launch options (``num_warps``, ``num_stages``) of ``_gate_kernel`` for head
    dim ``d``, ``qp`` query and ``cpn`` centroid pieces and ``topk``."""
    cfg = dict(_CONFIGS[d])
    dp = triton.next_power_of_2(d)
    while qp * cfg["BLOCK_T"] * dp * 2 > _Q_PIECE_BYTES and cfg["BLOCK_T"] > 16:
        cfg["BLOCK_T"] //= 2
    kp = max(2, triton.next_power_of_2(max(1, topk - 1)))  # kept-set slots, >= 2 for tl.arange
    return dict(cfg, D=d, DP=dp, KP=kp, QP=qp, CPN=cpn)
