"""Triton backend of routed attention: entry points and the selection plan the kernels read.

Per-query routing defeats tile-level block sparsity (the union of blocks chosen by a 128-query
tile covers most blocks), so the kernels work the other way round, FlashMoBA-style: every valid
selection ``(t, h, slot)`` of ``sel [Tq, Hq, K]`` is an *entry* ``e = (t * Hq + h) * K + slot``;
entries are sorted by group ``g = block * Hkv + kv_head`` (ties by e, so by token), and one
program takes a tile of up to BLOCK_M entries of one group: it gathers those query rows and
streams the block's K/V rows once for all of them.

- Forward (``triton_fwd``): each entry gets a partial ``(o, lse)`` over its block; a merge kernel
  LSE-combines the K partials of every ``(t, h)`` in a fixed order (deterministic, no atomics).
- Backward (``triton_bwd``): dK/dV per (group, key tile) looping over the group's entries (every
  key row belongs to exactly one group, so it is written once), dQ per entry tile into a per-slot
  buffer summed over K.

Partial buffers are ``[entries, D]``, so the entries are processed in token chunks (sizes in
``FwdConfig`` / ``BwdConfig``); the sort and the group offsets are global (int64 throughout).
The plan is built on the device without host synchronisation (group offsets come from a search
of the sorted keys, not from a bincount, whose CUDA kernel reads its input's max on the host).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moba_dist.kernels.plan_types import (
    DEFAULT_BWD,
    DEFAULT_FWD,
    BwdConfig,
    EntryPlan,
    FwdConfig,
    RoutedKeys,
    RoutedProblem,
)

__all__ = [
    "QueryTiles",
    "chunk_tiles",
    "padded_dim",
    "plan_entries",
    "routed_backward",
    "routed_forward",
    "tile_table",
    "token_chunks",
    "unavailable_reason",
]

# 16 and 32 serve small models and the interpreter tests; 96 runs padded to 128 lanes.
_HEAD_DIMS = (16, 32, 64, 96, 128, 256)


def padded_dim(d: int) -> int:
    """The power-of-two lane count the kernels use for head dim ``d`` (masked past ``d``)."""
    return 1 << (d - 1).bit_length()


def unavailable_reason(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot run tensors like ``q [T, H, D]`` (None when they can).
    The caller has already checked that triton imports."""
    d = q.shape[-1]
    if d not in _HEAD_DIMS:
        return f"the triton kernels take head_dim in {_HEAD_DIMS}, got {d}"
    if q.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
        if q.dtype != torch.float32:
            return "bf16 tl.dot is wrong in the Triton interpreter; use float32 on CPU"
        return None
    if q.device.type != "cuda":
        return f"the triton kernels run on CUDA (or CPU under the interpreter), got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the triton kernels take float16/bfloat16/float32, got {q.dtype}"
    return None


def plan_entries(sel: torch.Tensor, num_blocks: int, hkv: int) -> EntryPlan:
    """Sort the entries of ``sel [Tq, Hq, K]`` by (block, KV head), then by entry id."""
    from moba_dist.kernels.triton_plan import compose, entry_keys

    tq, hq, topk = sel.shape
    n_ent = tq * hq * topk
    groups = num_blocks * hkv
    # Keys in the narrowest dtype that holds G (invalid slots get the sentinel G, sorted last);
    # a stable sort (radix passes scale with the key's bits; ties keep entry order, so the plan
    # is deterministic), then comp = group * E + e over the sort's order, in place.
    key = entry_keys(sel, hkv, groups, _key_dtype(groups))
    skey, order = torch.sort(key, stable=True)
    del key
    comp = compose(skey, order)
    del skey
    bounds = torch.arange(groups + 1, device=sel.device) * n_ent
    group_off = torch.searchsorted(comp, bounds)
    return EntryPlan(comp, group_off, groups, topk, hq, hkv)


def _key_dtype(groups: int) -> torch.dtype:
    """Narrowest signed dtype holding group ids 0..groups (the sentinel included)."""
    if groups < 1 << 15:
        return torch.int16
    return torch.int32 if groups < 1 << 31 else torch.int64


def tile_table(sizes: torch.Tensor, tile: int, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each group's ``sizes [G]`` items into tiles of ``tile``.

    Returns ``(group [bound], index [bound])`` int64: tile i covers items
    ``index[i] * tile ...`` of group ``group[i]``; entries past the real tile count have group -1
    (their programs exit at once). ``bound`` must be >= the tile count; a static bound keeps the
    launch free of host synchronisation.
    """
    n_tiles = (sizes + tile - 1) // tile
    ends = torch.cumsum(n_tiles, 0)
    i = torch.arange(bound, device=sizes.device)
    group = torch.searchsorted(ends, i, right=True)
    live = group < sizes.numel()
    group = group.clamp_max(sizes.numel() - 1)
    index = i - (ends - n_tiles)[group]
    return torch.where(live, group, -1), index


@dataclass(frozen=True)
class QueryTiles:
    """Entry tiles of one token chunk: ``start/stop`` index ``plan.comp``; ``kend`` is the key row
    after which no query of the tile sees a key (the own block's causal bound); every query of the
    tile sees every key row before ``kfree`` (all of a past block)."""

    group: torch.Tensor
    start: torch.Tensor
    stop: torch.Tensor
    kend: torch.Tensor
    kfree: torch.Tensor


def chunk_tiles(
    plan: EntryPlan, q_pos: torch.Tensor, keys: RoutedKeys, e0: int, e1: int, block_m: int
) -> QueryTiles:
    """Tiles over the entries in ``[e0, e1)`` of every group: a contiguous range of each group,
    because entries are sorted by e inside a group."""
    n_ent = plan.num_entries
    gid = torch.arange(plan.num_groups, device=plan.comp.device)
    lo = torch.searchsorted(plan.comp, gid * n_ent + e0)
    hi = torch.searchsorted(plan.comp, gid * n_ent + e1)
    bound = (e1 - e0) // block_m + plan.num_groups
    group, index = tile_table(hi - lo, block_m, bound)
    gs = group.clamp_min(0)
    start = lo[gs] + index * block_m
    stop = torch.minimum(start + block_m, hi[gs])
    kend, kfree = _causal_bounds(plan, q_pos, keys, gs, start, stop, block_m)
    return QueryTiles(group.to(torch.int32), start, stop, kend, kfree)


def _causal_bounds(plan, q_pos, keys: RoutedKeys, group, start, stop, block_m: int):
    """Per tile, key rows of its block (within ``[r0, r1]``): ``kend``, the end of the rows any of
    its queries sees, and ``kfree``, the end of the rows all of them see."""
    n_ent = plan.num_entries
    rows = (start[:, None] + torch.arange(block_m, device=start.device)).clamp_max(n_ent - 1)
    live = rows < stop[:, None]
    pos = q_pos[plan.comp[rows] % n_ent // (plan.hq * plan.topk)]
    hi = torch.where(live, pos, -1).amax(1)
    lo = torch.where(live, pos, torch.iinfo(pos.dtype).max).amin(1)
    blk = group // plan.hkv
    r0, r1 = keys.block_rows[blk], keys.block_rows[blk + 1]
    seen = torch.searchsorted(keys.k_pos, torch.stack([hi, lo]), right=True)
    kend, kfree = torch.minimum(seen, r1).maximum(r0).unbind(0)
    return kend, torch.minimum(kfree, kend)


def token_chunks(tq: int, hq: int, topk: int, d: int, elems: int) -> list[tuple[int, int]]:
    """Token ranges whose ``[entries, D]`` partial buffer stays under ``elems`` elements."""
    step = max(1, elems // (hq * topk * d))
    return [(t0, min(tq, t0 + step)) for t0 in range(0, tq, step)]


def _int64_problem(prob: RoutedProblem) -> RoutedProblem:
    keys = RoutedKeys(
        prob.keys.block_rows.to(torch.int64).contiguous(), prob.keys.k_pos.to(torch.int64)
    )
    return RoutedProblem(
        prob.q_pos.to(torch.int64).contiguous(), keys, prob.sel.contiguous(),
        prob.softmax_scale, prob.max_block_rows,
    )  # fmt: skip


def routed_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prob: RoutedProblem,
    config: FwdConfig = DEFAULT_FWD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention (see ``reference.reference_routed_fwd``): ``q [Tq, Hq, D]``,
    ``k, v [Tk, Hkv, D]`` -> ``out [Tq, Hq, D]`` (q's dtype), ``lse [Hq, Tq]`` float32."""
    from moba_dist.kernels.triton_fwd import fwd_chunks

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    prob = _int64_problem(prob)
    plan = plan_entries(prob.sel, prob.num_blocks, k.shape[1])
    return fwd_chunks(q, k, v, prob, plan, config)


def routed_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    prob: RoutedProblem,
    grad_dtype: torch.dtype = torch.float32,
    config: BwdConfig = DEFAULT_BWD,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of routed attention over this key set given the *final* ``out`` and
    ``lse [Hq, Tq]`` (see ``reference.reference_routed_bwd``): ``dq [Tq, Hq, D]``,
    ``dk, dv [Tk, Hkv, D]`` in ``grad_dtype`` (float32 by default: CP callers add partial
    gradients; the single-device op asks for q's dtype to save memory). ``dlse [Hq, Tq]``: the
    gradient reaching lse, if any (it enters as ``delta - dlse``)."""
    from moba_dist.kernels.triton_bwd import bwd_all

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout, out = dout.contiguous(), out.contiguous()
    prob = _int64_problem(prob)
    plan = plan_entries(prob.sel, prob.num_blocks, k.shape[1])
    return bwd_all(dout, q, k, v, out, lse, prob, plan, grad_dtype, config, dlse)
