"""MoBA for cached decoding: new queries against a KV cache, with per-row block key sums.

Used by :mod:`moba_dist.integrations.hf` when the query is shorter than the keys (a decode step,
or a chunk of new tokens appended to a cache). Pure PyTorch, any device, no transformers import.

Layout follows transformers: ``q [Bt, Hq, nq, D]``, ``k, v [Bt, Hkv, L, D]`` (the whole cache, the
new tokens last). Row b's real tokens are the cache slots ``[starts[b], L)`` (left padding before
them); its in-sequence position p lives in slot ``starts[b] + p``, so its blocks start at its own
first real token, exactly as in ``docs/semantics.md``. The new queries are the last
``nq`` slots of every row.

Each query t attends to its own block (positions ``block_start..t``) plus the top-(K-1) complete
blocks strictly before it, scored ``q . mean(k of block)`` in float32 (float64 for float64
inputs), exact ties to the lower block: the same rule as the single-device gate
(``moba_dist.kernels.gate``). Blocks strictly before a query's own block are always complete,
so a centroid is always ``sum / block``; the cache keeps only complete blocks' sums.

One new query per row (the decode step proper) runs through :func:`moba_decode_step`: on CUDA
three Triton launches (:mod:`moba_dist.kernels.triton_decode`: the gate over a fixed number of
block sums, the selected blocks read in place from a preallocated cache, the merge), whose
pure-PyTorch twin is :func:`decode_select` + :func:`decode_attend`. Every shape depends on the
cache capacity only and positions are device tensors, so the step is CUDA-graph capturable.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from moba_dist.kernels.dispatch import TRITON_MISSING, triton_installed

# The same IEEE-float32 guard the library's gate uses (no TF32 for gate scores).
from moba_dist.kernels.gate import _exact_fp32, gate_dtype

if TYPE_CHECKING:  # the kernels import triton, which this module must not need
    from moba_dist.kernels.triton_decode import DecodeConfig

__all__ = [
    "block_sums",
    "decode_attend",
    "decode_backend",
    "decode_select",
    "moba_decode",
    "moba_decode_step",
    "query_positions",
    "union_blocks",
]

# Element budget of one chunk of decode work (gathered keys/values and masked scores), so decode
# memory stays bounded whatever the batch, head count, topk and block size are.
_GATHER_BUDGET = 1 << 24


def moba_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sums: torch.Tensor,
    starts: torch.Tensor,
    block: int,
    topk: int,
    scale: float,
) -> torch.Tensor:
    """MoBA for the last ``nq`` cache slots of every row: ``q [Bt, Hq, nq, D]``,
    ``k, v [Bt, Hkv, L, D]``, ``sums [Bt, Hkv, n, D]`` complete-block key sums (n >= the most
    complete blocks of any row), ``starts [Bt]`` int64 first real slot -> ``[Bt, nq, Hq, D]``.

    Queries go in chunks so that chunk x past keys stays near ``_GATHER_BUDGET`` (a long chunk of
    new tokens appended to a cache must not build ``nq x L`` scores at once).
    """
    _, hq, nq, _ = q.shape
    kv_len = k.shape[2]
    t = query_positions(starts, kv_len, nq)
    if nq == 1 and decode_backend("auto", q) == "triton":
        from moba_dist.kernels.triton_decode import moba_decode_triton

        return moba_decode_triton(q[:, :, 0], k, v, sums, starts, t[:, 0], block, topk, scale)[
            :, None
        ]
    n_cand = (kv_len - 1 - int(starts.min())) // block  # the largest own-block index
    step = max(1, _GATHER_BUDGET // (hq * (n_cand + 1) * block))
    outs = []
    for i0 in range(0, nq, step):
        qc, tc = q[:, :, i0 : i0 + step], t[:, i0 : i0 + step]
        sel = decode_select(qc, sums, tc, block, topk, n_cand)
        outs.append(decode_attend(qc, k, v, sel, tc, starts, block, scale))
    return torch.cat(outs, 1)


def decode_backend(backend: str, q: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for a decode step on tensors like ``q [..., D]``.

    ``"auto"`` takes the Triton kernel for 16/32-bit CUDA tensors with D in 16..128 (a power of
    two) and the PyTorch twin otherwise; an explicit ``"triton"`` that cannot run raises (it runs
    on CPU tensors under ``TRITON_INTERPRET=1``, for tests).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be one of auto, triton, torch; got {backend!r}")
    if backend == "torch":
        return backend
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    reason = None
    if not triton_installed():
        reason = TRITON_MISSING
    elif q.device.type != "cuda" and not interpreted:
        reason = f"it needs a CUDA tensor (or TRITON_INTERPRET=1), got {q.device}"
    elif q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reason = f"it takes float16/bfloat16/float32, got {q.dtype}"
    elif q.shape[-1] not in (16, 32, 64, 128):
        reason = f"it takes head_dim 16, 32, 64 or 128, got {q.shape[-1]}"
    if backend == "auto":
        return "triton" if reason is None and q.device.type == "cuda" else "torch"
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run this decode step: {reason}")
    return backend


def moba_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sums: torch.Tensor,
    starts: torch.Tensor,
    t: torch.Tensor,
    block: int,
    topk: int,
    scale: float,
    backend: str = "auto",
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """One MoBA decode step over a preallocated cache, with no host synchronisation.

    Args:
        q: ``[Bt, Hq, D]`` one new query per row.
        k, v: ``[Bt, Hkv, capacity, D]`` caches (strided views are read in place); row b's key at
            in-sequence position p is slot ``starts[b] + p``, the query's own key included.
        sums: ``[Bt, Hkv, n, D]`` key sums per block (gate dtype); only complete blocks before a
            query's own block are read, so partial sums of later blocks may be anything.
        starts, t: ``[Bt]`` int device tensors, first real slot and query position per row.
        block, topk, scale: MoBA block size, K, softmax scale.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see :func:`decode_backend`).
        config: launch knobs of the Triton kernels (default ``DecodeConfig()``).

    Returns:
        ``[Bt, Hq, D]`` in q's dtype. The gate scores all ``n`` blocks (masked to the candidates)
        so shapes depend on the capacity only: a CUDA-graph capturable step. On the Triton
        backend the step is three kernel launches (gate, attention, merge), nothing else.
    """
    if q.dim() != 3 or k.dim() != 4 or sums.dim() != 4 or sums.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q must be [Bt, Hq, D], k [Bt, Hkv, capacity, D] and sums [Bt, Hkv, n, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(sums.shape)}"
        )
    if decode_backend(backend, q) == "triton":
        from moba_dist.kernels.triton_decode import DEFAULT_CONFIG, moba_decode_triton

        cfg = DEFAULT_CONFIG if config is None else config
        return moba_decode_triton(q, k, v, sums, starts, t, block, topk, scale, cfg)
    t = t.to(torch.int64)
    sel = decode_select(q[:, :, None], sums, t[:, None], block, topk, sums.shape[2])
    return decode_attend(q[:, :, None], k, v, sel, t[:, None], starts, block, scale)[:, 0]


def block_sums(
    keys: torch.Tensor, starts: list[int], block: int, first: list[int], last: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key sums of complete blocks ``j in [first[b], last[b])`` of every row b.

    Args:
        keys: ``[Bt, Hkv, L, D]``; block j of row b is slots ``starts[b] + j*block ..`` (+block).
        starts, first, last: host ints per row; every summed block must lie inside ``[0, L)``.

    Returns:
        ``(rows [P], blocks [P], sums [P, Hkv, D])`` for the P requested (row, block) pairs, sums
        in :func:`gate_dtype` (at least float32), each block summed in one fixed order.
    """
    pairs = [(b, j) for b in range(len(starts)) for j in range(first[b], last[b])]
    dev, acc = keys.device, gate_dtype(keys.dtype)
    rows = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=dev)
    blocks = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=dev)
    starts_t = torch.tensor(starts, dtype=torch.int64, device=dev)
    out = torch.empty(len(pairs), keys.shape[1], keys.shape[3], dtype=acc, device=dev)
    offs = torch.arange(block, device=dev)
    chunk = max(1, _GATHER_BUDGET // (block * keys.shape[1] * keys.shape[3]))
    for c0 in range(0, len(pairs), chunk):
        r, j = rows[c0 : c0 + chunk], blocks[c0 : c0 + chunk]
        slots = (starts_t[r] + j * block)[:, None] + offs  # [c, block]
        # Advanced indices around a slice put their dims first: [c, block, Hkv, D].
        out[c0 : c0 + chunk] = keys[r[:, None], :, slots].to(acc).sum(1)
    return rows, blocks, out


def query_positions(starts: torch.Tensor, kv_len: int, nq: int) -> torch.Tensor:
    """In-sequence positions ``t [Bt, nq]`` of the last ``nq`` cache slots of every row."""
    tail = torch.arange(kv_len - nq, kv_len, device=starts.device)
    return tail[None, :] - starts[:, None]


def decode_select(
    q: torch.Tensor, sums: torch.Tensor, t: torch.Tensor, block: int, topk: int, n_cand: int
) -> torch.Tensor:
    """Route cached-decoding queries.

    Args:
        q: ``[Bt, Hq, nq, D]`` queries.
        sums: ``[Bt, Hkv, >= n_cand, D]`` key sums of complete blocks (gate dtype).
        t: ``[Bt, nq]`` int64 in-sequence position of every query.
        block, topk: MoBA block size B and K.
        n_cand: host int, the largest own-block index over all queries (candidates of a query in
            block c are blocks ``0..c-1``).

    Returns:
        ``sel [Bt, nq, Hq, K]`` int64 in-sequence block ids: slot 0 the own block, then the chosen
        past blocks by descending score, ``-1`` where fewer than K - 1 candidates exist.
    """
    bt, hq, nq, d = q.shape
    hkv = sums.shape[1]
    own = t // block
    sel = torch.full((bt, nq, hq, topk), -1, dtype=torch.int64, device=q.device)
    sel[..., 0] = own[:, :, None]
    if topk == 1 or n_cand == 0:
        return sel
    cent = sums[:, :, :n_cand] / block  # complete blocks only: every count is exactly `block`
    qg = q.to(cent.dtype).reshape(bt, hkv, hq // hkv, nq, d)
    with _exact_fp32():
        # GQA groups share their KV head's centroids: [Bt, nq, Hkv, G, n_cand].
        scores = torch.einsum("bhgqd,bhjd->bqhgj", qg, cent).reshape(bt, nq, hq, n_cand)
    cand = torch.arange(n_cand, device=q.device)[None, None, :] < own[:, :, None]
    scores = scores.masked_fill(~cand[:, :, None, :], float("-inf"))
    # A stable descending sort keeps the lower block id first among exact ties.
    vals, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    take = min(topk - 1, n_cand)
    picked = order[..., :take].masked_fill(vals[..., :take] == float("-inf"), -1)
    sel[..., 1 : 1 + take] = picked
    return sel


def union_blocks(sel: torch.Tensor, hkv: int) -> torch.Tensor:
    """Blocks selected by any query head of each KV group: ``sel [Bt, nq, Hq, K]`` ->
    ``[Bt, Hkv, U]`` ascending block ids, ``-1``-padded to the largest union U."""
    bt, nq, hq, kk = sel.shape
    per_kv = sel.view(bt, nq, hkv, hq // hkv, kk).transpose(1, 2).reshape(bt, hkv, -1)
    n_blk = int(per_kv.max()) + 1
    used = torch.zeros(bt, hkv, n_blk + 1, dtype=torch.bool, device=sel.device)
    used.scatter_(2, per_kv + 1, True)  # slot 0 collects the -1 (no block) entries
    used = used[..., 1:]
    ids = torch.where(used, torch.arange(n_blk, device=sel.device), n_blk)
    union = ids.sort(-1).values[..., : int(used.sum(-1).max())]
    return union.masked_fill(union == n_blk, -1)


def decode_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: torch.Tensor,
    t: torch.Tensor,
    starts: torch.Tensor,
    block: int,
    scale: float,
) -> torch.Tensor:
    """Attention of every query to the keys of its selected blocks only.

    ``q [Bt, Hq, nq, D]``, ``k, v [Bt, Hkv, L, D]``, ``sel [Bt, nq, Hq, K]`` from
    :func:`decode_select`, ``t [Bt, nq]`` positions, ``starts [Bt]`` first real slot per row.
    Returns ``out [Bt, nq, Hq, D]`` in q's dtype (softmax in float32, float64 for float64).

    Each KV head's keys are gathered once for the union of the blocks its query heads chose
    (GQA native: at most ``G * (K - 1) + 1`` blocks, never more than the whole cache); every
    query head then attends to its own K blocks of that union, the own block token-causally
    (positions <= t). Batch rows are processed in chunks of about ``_GATHER_BUDGET`` elements.
    """
    bt, hq, nq, _ = q.shape
    union = union_blocks(sel, k.shape[1])
    per_row = union.shape[-1] * block * (hq * nq + 2 * k.shape[1] * q.shape[-1])
    rows = max(1, _GATHER_BUDGET // max(1, per_row))
    parts = [
        _attend_rows(q[b0 : b0 + rows], k[b0 : b0 + rows], v[b0 : b0 + rows], sel[b0 : b0 + rows],
                     t[b0 : b0 + rows], starts[b0 : b0 + rows], union[b0 : b0 + rows], block, scale)
        for b0 in range(0, bt, rows)
    ]  # fmt: skip
    return torch.cat(parts)


def _attend_rows(q, k, v, sel, t, starts, union, block: int, scale: float) -> torch.Tensor:
    """:func:`decode_attend` for one chunk of batch rows, given their block ``union``."""
    bt, hq, nq, d = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    g, acc = hq // hkv, gate_dtype(q.dtype)
    pos = union[..., None] * block + torch.arange(block, device=q.device)  # [Bt, Hkv, U, B]
    # -1 padding (and its negative positions) reads some clamped slot; the mask drops it.
    slots = (starts[:, None, None, None] + pos).clamp(0, kv_len - 1).flatten(2)
    bi = torch.arange(bt, device=q.device)[:, None, None]
    hi = torch.arange(hkv, device=q.device)[None, :, None]
    # Indexing, not reshape: a strided cache view is read in place, never copied whole.
    keys = k[bi, hi, slots].to(acc)  # [Bt, Hkv, U*B, D]
    vals = v[bi, hi, slots].to(acc)
    # Query rows r = (head in group, query) of each KV head.
    sel_r = sel.view(bt, nq, hkv, g, -1).permute(0, 2, 3, 1, 4).reshape(bt, hkv, g * nq, -1)
    chosen = (sel_r[..., None] == union[:, :, None, None, :]).any(-2) & (union >= 0)[:, :, None]
    t_r = t[:, None, None, :].expand(bt, hkv, g, nq).reshape(bt, hkv, g * nq)
    allowed = (chosen[..., None] & (pos[:, :, None] <= t_r[..., None, None])).flatten(3)
    qg = q.reshape(bt, hkv, g * nq, d).to(acc)
    scores = torch.einsum("bgrd,bgkd->bgrk", qg, keys) * scale
    # Every query keeps at least its own position, so no row is all -inf.
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = torch.einsum("bgrk,bgkd->bgrd", probs, vals)  # [Bt, Hkv, G*nq, D]
    return out.view(bt, hkv, g, nq, d).permute(0, 3, 1, 2, 4).reshape(bt, nq, hq, d).to(q.dtype)
