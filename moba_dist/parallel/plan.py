"""The plan of one context-parallel MoBA call: ownership of tokens, global centroids, routing,
the strategy choice and (selective) the request exchange (steps 1-3 of the CP algorithm).

Everything forward and backward share lives in :class:`CPPlan`; the routing is computed once
and reused by the backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moba_dist.kernels.blocks import BlockLayout, segment_sums
from moba_dist.kernels.gate import select_blocks
from moba_dist.kernels.plan_types import RoutedKeys
from moba_dist.parallel import comm
from moba_dist.parallel.layouts import local_positions
from moba_dist.parallel.requests import (
    exchange_requests,
    expand_requests,
    needed_requests,
)

__all__ = [
    "AUTO_ALLGATHER_FRACTION",
    "CPPlan",
    "Ownership",
    "build_ownership",
    "global_centroids",
    "make_plan",
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


#: ``strategy="auto"`` all-gathers K/V once some rank needs more than this share of the remote
#: (row, head) pairs: past it, many small requests cost more than one bandwidth-optimal gather.
AUTO_ALLGATHER_FRACTION = 0.5


@dataclass
class CPPlan:
    """Everything forward and backward share for one call (routing reused, never recomputed)."""

    group: dist.ProcessGroup
    rank: int
    world: int
    blocks: BlockLayout
    own: Ownership
    sel: torch.Tensor  # [T_local, Hq, K] int32 global block ids
    local_keys: RoutedKeys
    strategy: str
    union_fraction: float
    union_fraction_max: float
    # selective: rows this rank sends (local row, head) per destination, and receives per source
    send_row: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    send_head: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    send_counts: list[int] = field(default_factory=list)
    recv_counts: list[int] = field(default_factory=list)
    recv_slot: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    recv_head: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    fetched_keys: RoutedKeys | None = None
    # allgather: global positions of every remote row, ascending
    remote_pos: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))


def global_centroids(k: torch.Tensor, plan_blocks: BlockLayout, tok: torch.Tensor, group):
    """Exact centroids ``[N, Hkv, D]`` float32 from all-reduced partial key sums; ``tok
    [T_local]`` is the global block id of every local token."""
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    sums = segment_sums(k, tok, plan_blocks.num_blocks, plan_blocks.block_size, acc)
    comm.all_reduce_sum(sums, group)
    lengths = (plan_blocks.block_starts[1:] - plan_blocks.block_starts[:-1]).to(acc)
    return sums / lengths.view(-1, 1, 1)


def make_plan(q, k, ctx, topk: int, strategy: str) -> CPPlan:
    """Centroids, routing, strategy choice and (selective) request exchange; ``ctx`` is the
    batch's :class:`~moba_dist.parallel.context.CPContext` (layout, ownership, key sets)."""
    blocks, own, tok = ctx.blocks, ctx.own, ctx.local_block
    group, rank, world = ctx.group, ctx.rank, ctx.world
    centroids = global_centroids(k, blocks, tok, group)
    sel = select_blocks(q, centroids, tok, blocks.block_seq_first[tok], topk)
    hkv = k.shape[1]
    triples = needed_requests(sel, own.positions, tok, hkv, blocks.num_blocks)
    rows = expand_requests(triples, blocks)
    remote = own.owner[rows.pos] != rank
    remote_total = (blocks.num_tokens - own.positions.numel()) * hkv
    # Destinations of each request: every other rank holding one of its rows.
    dest = torch.zeros(triples.shape[0], world, dtype=torch.bool, device=q.device)
    dest[rows.req[remote], own.owner[rows.pos[remote]]] = True
    stats = torch.tensor(
        [int(remote.sum()), remote_total, *dest.sum(0).tolist()], dtype=torch.int64
    )
    table = comm.all_gather_rows(stats.to(comm.comm_device(group)), group).cpu()
    fractions = (table[:, 0].double() / table[:, 1].clamp_min(1).double()).tolist()
    if strategy == "auto":
        strategy = "allgather" if max(fractions) > AUTO_ALLGATHER_FRACTION else "selective"
    plan = CPPlan(
        group=group, rank=rank, world=world, blocks=blocks, own=own, sel=sel,
        local_keys=ctx.local_keys, strategy=strategy,
        union_fraction=fractions[rank], union_fraction_max=max(fractions),
    )  # fmt: skip
    if strategy == "selective":
        exchange_requests(plan, triples, dest, table[:, 2:].tolist(), k.device)
    else:
        plan.remote_pos = ctx.remote_pos
    return plan
