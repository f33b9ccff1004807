"""The parameter-free MoBA gate: block centroids, query-centroid scores, top-k block selection.

The routing is a table ``sel [Tq, Hq, K]`` of global block ids (int32): slot 0 holds the query's
own block, slots 1.. the chosen strictly-past blocks in descending score order, ``-1`` where the
query has fewer than K - 1 candidates. Exact ties go to the lower block id.

Centroids come from :func:`block_sums`, the one dispatch of per-block key sums (on CUDA one
Triton kernel: one read of k, float32 sums in a fixed order; ``segment_sums`` elsewhere). The
single-device op calls it through :func:`block_centroids`; it takes a context-parallel rank's
own rows of each block as they are (partial sums to all-reduce). The routing computed in the
forward is saved for the backward, which never recomputes centroids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from moba_dist.config import HEAD_DIMS, check_gate_precision
from moba_dist.kernels.blocks import BlockLayout, segment_sums

__all__ = ["block_centroids", "block_sums", "gate_dtype", "select_blocks"]

# Score-chunk budget in elements: a chunk of queries scores against at most this many
# (query, head, block) entries at once (64 MiB in float32), so gate memory stays O(T * H * K).
_SCORE_BUDGET = 1 << 24


def gate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gate arithmetic precision: at least float32, float64 inputs stay float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    # The contract asks for IEEE float32 scores; a user's global TF32 setting must not leak in.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def block_centroids(k: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Mean key of every block: ``k [T, Hkv, D]`` -> ``[N, Hkv, D]`` in :func:`gate_dtype`."""
    sums = block_sums(
        k, layout.token_block, layout.num_blocks, layout.block_size, layout.block_starts
    )
    counts = (layout.block_starts[1:] - layout.block_starts[:-1]).to(sums.dtype)
    return sums / counts.clamp_min(1).view(-1, 1, 1)


def block_sums(
    k: torch.Tensor,
    token_block: torch.Tensor,
    num_blocks: int,
    block_size: int,
    block_starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Key sums per block, ``k [T, Hkv, D]`` -> ``[num_blocks, Hkv, D]`` in :func:`gate_dtype`.

    ``token_block [T]`` is the (global) block id of every row, non-decreasing, each block's rows
    contiguous and at most ``block_size`` of them; blocks without rows sum to zero. This is what
    a context-parallel rank holds (its rows of each block: partial sums to all-reduce).
    ``block_starts [num_blocks + 1]``, the first row of every block, may be passed when known
    (single device); it is found on the device otherwise. On CUDA (16/32-bit floats) it is one
    Triton kernel (one read of k, float32, fixed row order, no host sync); elsewhere, and for
    float64, ``blocks.segment_sums``, with the same result up to float32 summation order.
    """
    kernel = _block_sums_kernel(k)
    if kernel is None:
        return segment_sums(k, token_block, num_blocks, block_size, gate_dtype(k.dtype))
    if block_starts is None:
        ids = torch.arange(num_blocks + 1, device=k.device, dtype=token_block.dtype)
        block_starts = torch.searchsorted(token_block, ids)
    return kernel(k, block_starts)


def _block_sums_kernel(k: torch.Tensor):
    """``triton_gate.block_sums_triton`` when it runs for ``k``: CUDA, fp16/bf16/fp32, triton
    installed (CPU and float64 use ``segment_sums``)."""
    if k.device.type != "cuda" or k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    try:
        from moba_dist.kernels.triton_gate import block_sums_triton
    except ImportError:
        return None
    return block_sums_triton


def _triton_gate(q: torch.Tensor, centroids: torch.Tensor):
    """The fused Triton gate (``triton_gate.select_blocks_triton``: tensor-core scores of
    float32 quality, running top-k on chip, no score stored) when it can run: CUDA, float32
    centroids, fp16/bf16/fp32 queries, head dim in ``config.HEAD_DIMS``, triton installed."""
    if q.device.type != "cuda" or centroids.dtype != torch.float32 or q.shape[-1] not in HEAD_DIMS:
        return None
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    try:
        from moba_dist.kernels.triton_gate import select_blocks_triton
    except ImportError:
        return None
    return select_blocks_triton


def select_blocks(
    q: torch.Tensor,
    centroids: torch.Tensor,
    q_block: torch.Tensor,
    q_seq_first: torch.Tensor,
    topk: int,
    *,
    precision: str = "float32",
) -> torch.Tensor:
    """Route queries to blocks.

    Args:
        q: ``[Tq, Hq, D]`` queries (any float dtype).
        centroids: ``[N, Hkv, D]`` block centroids (float32 or float64), ``Hq % Hkv == 0``.
        q_block: ``[Tq]`` global id of each query's own block.
        q_seq_first: ``[Tq]`` id of the first block of each query's sequence.
        topk: K >= 1, blocks per query including the own block.
        precision: score precision of the CUDA Triton gate, one of ``config.GATE_PRECISIONS``:
            "float32" (default, float32-quality scores) or the opt-ins "bf16x2" / "bf16" (see
            docs/routing.md). The torch path (CPU, float64, head dims outside
            ``config.HEAD_DIMS``) always scores exactly in :func:`gate_dtype`.

    Returns:
        ``sel [Tq, Hq, K]`` int32 (see module doc). Candidates of query t are the block ids in
        ``[q_seq_first[t], q_block[t])``. Works in query chunks: peak extra memory is
        ``_SCORE_BUDGET`` scores, whatever T is.
    """
    check_gate_precision(precision, "precision")
    tq, hq, _ = q.shape
    n_blocks = centroids.shape[0]
    sel = torch.full((tq, hq, topk), -1, dtype=torch.int32, device=q.device)
    sel[:, :, 0] = q_block.to(torch.int32).unsqueeze(1)
    if topk == 1 or tq == 0 or n_blocks == 0:
        return sel
    fast = _triton_gate(q, centroids)
    if fast is not None:
        return fast(q, centroids, q_block, q_seq_first, topk, precision)
    chunk = max(1, _SCORE_BUDGET // (hq * n_blocks))
    with _exact_fp32():
        for c0 in range(0, tq, chunk):
            c1 = min(tq, c0 + chunk)
            sel[c0:c1, :, 1:] = _select_chunk(
                q[c0:c1], centroids, q_block[c0:c1], q_seq_first[c0:c1], topk - 1
            )
    return sel


def _select_chunk(
    q: torch.Tensor,
    centroids: torch.Tensor,
    q_block: torch.Tensor,
    q_seq_first: torch.Tensor,
    kpast: int,
) -> torch.Tensor:
    """Top-``kpast`` strictly-past blocks for one chunk of queries -> ``[C, Hq, kpast]`` int32."""
    c, hq, d = q.shape
    hkv = centroids.shape[1]
    lo = int(q_seq_first.min())
    hi = int(q_block.max())  # candidates are strictly below the own block
    out = torch.full((c, hq, kpast), -1, dtype=torch.int32, device=q.device)
    if hi <= lo:
        return out
    cand = centroids[lo:hi]  # [R, Hkv, D]
    # [C, Hkv, G, D] x [R, Hkv, D] -> [C, Hkv, G, R]: GQA groups share a centroid, never repeated.
    qg = q.to(centroids.dtype).view(c, hkv, hq // hkv, d)
    scores = torch.einsum("cgid,rgd->cgir", qg, cand).reshape(c, hq, hi - lo)
    ids = torch.arange(lo, hi, device=q.device)
    valid = (ids >= q_seq_first[:, None]) & (ids < q_block[:, None])  # [C, R]
    scores.masked_fill_(~valid[:, None, :], float("-inf"))
    # A stable descending sort keeps the lower block id first among exact ties (the documented
    # tie rule); torch.topk gives no such guarantee.
    vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    take = min(kpast, hi - lo)
    picked = (order[..., :take] + lo).to(torch.int32)
    picked.masked_fill_(vals[..., :take] == float("-inf"), -1)
    out[..., :take] = picked
    return out
