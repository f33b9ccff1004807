"""Requests of context-parallel MoBA: which K/V rows a rank needs, and swapping them.

Pure functions of the layout and the local routing, plus the one request exchange. Both sides
of an exchange run the same :func:`expand_requests` on the same request triples, so the
requester knows the exact order in which rows will arrive, and the owner the order in which to
send them.

A request is a triple ``(block j, kv head g, maxpos)``: "the rows of block j, head g, at
positions <= maxpos". For a past block maxpos lies beyond the block (all rows); for the own block
it is the last local query of that block, so the causal prefix held by another rank is fetched
and nothing after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.plan_types import RoutedKeys
from moba_dist.parallel import comm
from moba_dist.parallel.layouts import _segment_positions

if TYPE_CHECKING:
    from moba_dist.parallel.plan import CPPlan, Ownership

__all__ = [
    "RowSet",
    "exchange_requests",
    "expand_requests",
    "keys_from_positions",
    "needed_requests",
    "rows_for_rank",
]


def needed_requests(
    sel: torch.Tensor, q_pos: torch.Tensor, q_block: torch.Tensor, hkv: int, num_blocks: int
) -> torch.Tensor:
    """Unique (block, kv head, maxpos) triples ``[n, 3]`` int64 that the routing ``sel [Tq, Hq,
    K]`` touches, sorted by (block, head). For the own block of a run of local queries, maxpos
    is the run's last query (the causal prefix it needs); for a past block it lies at or after
    the block's end (all rows needed): the last position of the last run that selected it.

    ``q_pos [Tq]`` ascending and ``q_block [Tq]`` (global block of each query). Instead of a
    max-reduction of every routing entry into ``N * Hkv`` slots (all entries contend for few
    slots), entries only mark a dense ``[runs, N * Hkv]`` hit table, one row per run of local
    queries in one block, and a plain column max finds the last run. That is exact: a past
    block selected by run b needs all its rows (b's queries lie after it), and the own block is
    selected by every query of its run, whose last position is the run's last query.
    """
    if sel.shape[0] == 0:
        return torch.zeros(0, 3, dtype=torch.int64, device=sel.device)
    hq = sel.shape[1]
    nh = num_blocks * hkv
    starts = torch.ones(q_block.numel(), dtype=torch.bool, device=sel.device)
    starts[1:] = q_block[1:] != q_block[:-1]
    run = torch.cumsum(starts, 0) - 1
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    run_last_pos = q_pos[ends]
    head = torch.arange(hq, device=sel.device) // (hq // hkv)
    key = torch.where(sel >= 0, sel.long() * hkv + head.view(1, hq, 1), nh)
    hit = torch.zeros(run_last_pos.numel() * (nh + 1), dtype=torch.bool, device=sel.device)
    hit.index_fill_(0, (run.view(-1, 1, 1) * (nh + 1) + key).reshape(-1), True)
    order = torch.arange(1, run_last_pos.numel() + 1, dtype=torch.int32, device=sel.device)
    last = (hit.view(-1, nh + 1)[:, :nh].to(torch.int32) * order.view(-1, 1)).amax(0)
    live = (last > 0).nonzero().squeeze(1)
    return torch.stack([live // hkv, live % hkv, run_last_pos[last[live].long() - 1]], dim=1)


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


def exchange_requests(plan: CPPlan, triples, dest, counts_table, device) -> None:
    """Send each owner the triples it serves; both sides expand them to the same row order."""
    group, rank, world = plan.group, plan.rank, plan.world
    order = [dest[:, r].nonzero().squeeze(1) for r in range(world)]
    send = torch.cat([triples[o] for o in order]) if triples.numel() else triples.view(0, 3)
    n_recv = [counts_table[r][rank] for r in range(world)]
    cdev = comm.comm_device(group)
    got, _ = comm.all_to_all_rows(send.to(cdev), [o.numel() for o in order], n_recv, group)
    got = got.to(device)
    # Owner side: rows I hold for each requester, in the requester's order.
    offs = [0, *torch.tensor(n_recv).cumsum(0).tolist()]
    served = [
        rows_for_rank(expand_requests(got[offs[r] : offs[r + 1]], plan.blocks), plan.own, rank)
        for r in range(world)
    ]
    plan.send_row = torch.cat([plan.own.local_index[s.pos] for s in served])
    plan.send_head = torch.cat([s.head for s in served])
    plan.send_counts = [s.pos.numel() for s in served]
    # Requester side: the rows each owner will send, in arrival order.
    wanted = [rows_for_rank(expand_requests(triples[o], plan.blocks), plan.own, r)
              for r, o in enumerate(order)]  # fmt: skip
    plan.recv_counts = comm.all_to_all_counts(plan.send_counts, group, cdev)
    expected = [w.pos.numel() for w in wanted]
    if plan.recv_counts != expected:
        raise RuntimeError(
            f"MoBA CP internal error on rank {rank}: owners announced {plan.recv_counts} rows, "
            f"the plan expects {expected}"
        )
    pos = torch.cat([w.pos for w in wanted])
    uniq, slot = torch.unique(pos, sorted=True, return_inverse=True)
    plan.recv_slot, plan.recv_head = slot, torch.cat([w.head for w in wanted])
    plan.fetched_keys = keys_from_positions(uniq, plan.blocks)
