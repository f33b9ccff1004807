"""Requests of context-parallel MoBA: which K/V rows each rank needs, as dense tables.

A rank's needs are one table ``need [N, Hkv]`` int64: ``need[j, g]`` is the last global position
up to which the rows of block j, KV head g are needed, ``-1`` when none are. For a past block it
lies at or after the block's end (all rows); for the own block of a run of local queries it is
the run's last query, so the causal prefix held by another rank is fetched and nothing after it.
Every rank all-gathers every rank's table (a fixed size: no split sizes to agree on), so every
rank can count and list, without further exchange, the rows each owner sends each requester:
owner o sends requester r, for each (j, g) in ascending order, its rows of block j at positions
<= ``need_r[j, g]``, ascending. Nothing here reads a device tensor on the host; sizes that
allocate come from the caller (the plan's one host read).
"""

from __future__ import annotations

import torch

from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.plan_types import RoutedKeys
from moba_dist.parallel.layouts import _segment_positions

__all__ = [
    "compact",
    "keys_from_positions",
    "needed_maxpos",
    "query_runs",
    "ranges",
    "rows_total",
    "rows_upto",
]


def query_runs(q_pos: torch.Tensor, q_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of local queries in one block (ascending positions: one run per block with local
    queries): ``run [Tq]``, the run of every query, and ``run_last_pos [R]``, each run's last
    position. Once per batch (reads sizes on the host)."""
    starts = torch.ones(q_block.numel(), dtype=torch.bool, device=q_block.device)
    starts[1:] = q_block[1:] != q_block[:-1]
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    return torch.cumsum(starts, 0) - 1, q_pos[ends]


def needed_maxpos(
    sel: torch.Tensor, run: torch.Tensor, run_last_pos: torch.Tensor, hkv: int, num_blocks: int
) -> torch.Tensor:
    """The need table ``[N, Hkv]`` of the routing ``sel [Tq, Hq, K]`` (module doc).

    Instead of a max-reduction of every routing entry into ``N * Hkv`` slots (all entries contend
    for few slots), entries only mark a dense ``[runs, N * Hkv]`` hit table, one row per run, and
    a plain column max finds the last run. That is exact: a past block selected by run b needs
    all its rows (b's queries lie after it), and the own block is selected by every query of its
    run, whose last position is the run's last query.
    """
    nh = num_blocks * hkv
    n_runs = run_last_pos.numel()
    if sel.shape[0] == 0 or nh == 0:
        return torch.full((num_blocks, hkv), -1, dtype=torch.int64, device=sel.device)
    hq = sel.shape[1]
    head = torch.arange(hq, device=sel.device) // (hq // hkv)
    key = torch.where(sel >= 0, sel.long() * hkv + head.view(1, hq, 1), nh)
    hit = torch.zeros(n_runs * (nh + 1), dtype=torch.bool, device=sel.device)
    hit.index_fill_(0, (run.view(-1, 1, 1) * (nh + 1) + key).reshape(-1), True)
    order = torch.arange(1, n_runs + 1, dtype=torch.int32, device=sel.device)
    last = (hit.view(n_runs, nh + 1)[:, :nh].to(torch.int32) * order.view(-1, 1)).amax(0)
    maxpos = torch.where(last > 0, run_last_pos[(last.long() - 1).clamp_min(0)], -1)
    return maxpos.view(num_blocks, hkv)


def rows_upto(
    positions: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, need: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows an owner sends for need tables: ``(start, length)`` shaped like ``need``.

    ``positions [Tl]`` (or ``[B, Tl]``, one owner per leading row, ``need [B, N, Hkv]``): the
    owner's global positions, ascending; ``lo, hi [N]`` (or ``[B, N]``): its local rows of block
    j are ``lo[j]:hi[j]``. The rows sent for ``need[..., j, g]`` are local rows
    ``start:start + length``, those of block j at positions <= the need.
    """
    flat = need.reshape(*need.shape[:-2], -1) if positions.dim() == 2 else need
    stop = torch.searchsorted(positions, flat.contiguous(), right=True).view(need.shape)
    start = lo.unsqueeze(-1).expand(need.shape)
    stop = torch.minimum(stop, hi.unsqueeze(-1))
    return start, (stop - start).clamp_min(0)


def rows_total(need: torch.Tensor, blocks: BlockLayout) -> torch.Tensor:
    """Rows of block j at positions <= ``need[..., j, g]``, whoever holds them."""
    start, end = blocks.block_starts[:-1].view(-1, 1), blocks.block_starts[1:].view(-1, 1)
    return (torch.minimum(need + 1, end) - start).clamp_min(0)


def ranges(starts: torch.Tensor, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenated ``[starts[i], starts[i] + lengths[i])`` of host-known ``total`` length."""
    return _segment_positions(starts.reshape(-1), lengths.reshape(-1), total)


def compact(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` True entries of the 1-D ``mask``, ascending, without a host read
    (``nonzero`` would need one to size its output)."""
    csum = torch.cumsum(mask, 0)
    return torch.searchsorted(csum, torch.arange(1, count + 1, device=mask.device))


def keys_from_positions(pos: torch.Tensor, blocks: BlockLayout) -> RoutedKeys:
    """Routed-key description of a key set holding the ascending global positions ``pos``."""
    rows = torch.searchsorted(pos, blocks.block_starts)
    return RoutedKeys(block_rows=rows, k_pos=pos)
