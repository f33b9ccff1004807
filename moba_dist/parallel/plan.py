"""Fetch planning for context-parallel MoBA: which K/V rows a rank needs and who owns them.

Pure functions of the layout and the local routing; no process group. Both sides of an exchange
run the same :func:`expand_requests` on the same request triples, so the requester knows the
exact order in which rows will arrive, and the owner the order in which to send them.

A request is a triple ``(block j, kv head g, maxpos)``: "the rows of block j, head g, at
positions <= maxpos". For a past block maxpos lies beyond the block (all rows); for the own block
it is the last local query of that block, so the causal prefix held by another rank is fetched
and nothing after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.reference import RoutedKeys
from moba_dist.parallel.layouts import _segment_positions, local_positions

__all__ = [
    "Ownership",
    "RowSet",
    "build_ownership",
    "expand_requests",
    "keys_from_positions",
    "needed_requests",
    "rows_for_rank",
]


@dataclass(frozen=True)
class Ownership:
    """Where every global token lives: ``owner [T]`` (group rank) and ``local_index [T]`` (row in
    the owner's shard), plus this rank's ``positions [T_local]`` (ascending)."""

    owner: torch.Tensor
    local_index: torch.Tensor
    positions: torch.Tensor


def build_ownership(
    cu_seqlens: torch.Tensor, rank: int, world_size: int, layout: str, device: torch.device
) -> Ownership:
    """Invert the layout for all ranks (O(T) int64, computed identically on every rank)."""
    total = int(cu_seqlens[-1])
    owner = torch.empty(total, dtype=torch.int64, device=device)
    local_index = torch.empty(total, dtype=torch.int64, device=device)
    mine = None
    for r in range(world_size):
        pos = local_positions(cu_seqlens, rank=r, world_size=world_size, layout=layout).to(device)
        owner[pos] = r
        local_index[pos] = torch.arange(pos.numel(), device=device)
        if r == rank:
            mine = pos
    return Ownership(owner=owner, local_index=local_index, positions=mine)


def needed_requests(
    sel: torch.Tensor, q_pos: torch.Tensor, hkv: int, num_blocks: int
) -> torch.Tensor:
    """Unique (block, kv head, maxpos) triples ``[n, 3]`` int64 that the routing ``sel [Tq, Hq,
    K]`` touches, sorted by (block, head); maxpos = last query position that selected it."""
    hq, k = sel.shape[1:]
    flat = sel.reshape(-1).to(torch.int64)
    idx = (flat >= 0).nonzero().squeeze(1)
    t = idx // (hq * k)
    g = (idx // k) % hq // (hq // hkv)
    key = flat[idx] * hkv + g
    maxpos = torch.full((num_blocks * hkv,), -1, dtype=torch.int64, device=sel.device)
    maxpos.scatter_reduce_(0, key, q_pos[t], reduce="amax")
    live = (maxpos >= 0).nonzero().squeeze(1)
    return torch.stack([live // hkv, live % hkv, maxpos[live]], dim=1)


@dataclass(frozen=True)
class RowSet:
    """Rows named by requests: global ``pos [n]``, kv ``head [n]`` and the request each came
    from, ``req [n]``, in request order then ascending position."""

    pos: torch.Tensor
    head: torch.Tensor
    req: torch.Tensor


def expand_requests(triples: torch.Tensor, blocks: BlockLayout) -> RowSet:
    """All rows of each request triple, whoever owns them."""
    j, g, maxpos = triples.unbind(1) if triples.numel() else (triples.new_zeros(0),) * 3
    start = blocks.block_starts[j]
    end = torch.minimum(blocks.block_starts[j + 1], maxpos + 1)
    lengths = (end - start).clamp_min(0)
    pos = _segment_positions(start, lengths)
    req = torch.repeat_interleave(torch.arange(j.numel(), device=j.device), lengths)
    return RowSet(pos=pos, head=g[req], req=req)


def rows_for_rank(rows: RowSet, own: Ownership, rank: int) -> RowSet:
    """The subset of ``rows`` that ``rank`` owns, order kept."""
    keep = own.owner[rows.pos] == rank
    return RowSet(pos=rows.pos[keep], head=rows.head[keep], req=rows.req[keep])


def keys_from_positions(pos: torch.Tensor, blocks: BlockLayout) -> RoutedKeys:
    """Routed-key description of a key set holding the ascending global positions ``pos``."""
    rows = torch.searchsorted(pos, blocks.block_starts)
    return RoutedKeys(block_rows=rows, k_pos=pos)
