"""Steps 1-3 and 5 of the CP algorithm (design.md): global centroids, routing, the fetch plan,
and moving K/V rows to the ranks that selected them (and their gradients back).

Transfers carry (row, kv head) vectors: K and V side by side as ``[n, 2D]``, each KV head fetched
once however many query heads chose it. Under the ``allgather`` strategy every remote row of
every head is moved with an equal-size all-gather instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moba_dist.kernels.blocks import BlockLayout, segment_sums
from moba_dist.kernels.gate import select_blocks
from moba_dist.kernels.reference import RoutedKeys
from moba_dist.parallel import comm
from moba_dist.parallel.handshake import comm_device
from moba_dist.parallel.plan import (
    Ownership,
    expand_requests,
    keys_from_positions,
    needed_requests,
    rows_for_rank,
)

__all__ = [
    "AUTO_ALLGATHER_FRACTION",
    "CPPlan",
    "Fetched",
    "make_plan",
    "return_grads",
    "start_fetch",
]

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


@dataclass
class Fetched:
    """Remote K/V gathered into a position-sorted key set ``[U, Hkv, D]`` (zeros where a (row,
    head) was not fetched: the routing never reads those)."""

    k: torch.Tensor
    v: torch.Tensor
    keys: RoutedKeys


def global_centroids(k: torch.Tensor, plan_blocks: BlockLayout, tok: torch.Tensor, group):
    """Exact centroids ``[N, Hkv, D]`` float32 from all-reduced partial key sums; ``tok
    [T_local]`` is the global block id of every local token."""
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    sums = segment_sums(k, tok, plan_blocks.num_blocks, plan_blocks.block_size, acc)
    comm.all_reduce_sum(sums, group)
    lengths = (plan_blocks.block_starts[1:] - plan_blocks.block_starts[:-1]).to(acc)
    return sums / lengths.view(-1, 1, 1)


def make_plan(q, k, blocks, own, topk, strategy, group, rank, world) -> CPPlan:
    """Centroids, routing, strategy choice and (selective) request exchange."""
    tok = blocks.token_block[own.positions]
    centroids = global_centroids(k, blocks, tok, group)
    sel = select_blocks(q, centroids, tok, blocks.block_seq_first[tok], topk)
    hkv = k.shape[1]
    triples = needed_requests(sel, own.positions, hkv, blocks.num_blocks)
    rows = expand_requests(triples, blocks)
    remote = own.owner[rows.pos] != rank
    remote_total = (blocks.num_tokens - own.positions.numel()) * hkv
    # Destinations of each request: every other rank holding one of its rows.
    dest = torch.zeros(triples.shape[0], world, dtype=torch.bool, device=q.device)
    dest[rows.req[remote], own.owner[rows.pos[remote]]] = True
    stats = torch.tensor(
        [int(remote.sum()), remote_total, *dest.sum(0).tolist()], dtype=torch.int64
    )
    table = comm.all_gather_rows(stats.to(comm_device(group)), group).cpu()
    fractions = (table[:, 0].double() / table[:, 1].clamp_min(1).double()).tolist()
    if strategy == "auto":
        strategy = "allgather" if max(fractions) > AUTO_ALLGATHER_FRACTION else "selective"
    plan = CPPlan(
        group=group, rank=rank, world=world, blocks=blocks, own=own, sel=sel,
        local_keys=keys_from_positions(own.positions, blocks), strategy=strategy,
        union_fraction=fractions[rank], union_fraction_max=max(fractions),
    )  # fmt: skip
    if strategy == "selective":
        _exchange_requests(plan, triples, dest, table[:, 2:].tolist(), k.device)
    else:
        # The all-gather key set: every position held by another rank, ascending.
        plan.remote_pos = (own.owner != rank).nonzero().squeeze(1)
    return plan


def _exchange_requests(plan: CPPlan, triples, dest, counts_table, device) -> None:
    """Send each owner the triples it serves; both sides expand them to the same row order."""
    group, rank, world = plan.group, plan.rank, plan.world
    order = [dest[:, r].nonzero().squeeze(1) for r in range(world)]
    send = torch.cat([triples[o] for o in order]) if triples.numel() else triples.view(0, 3)
    n_recv = [counts_table[r][rank] for r in range(world)]
    cdev = comm_device(group)
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


def start_fetch(plan: CPPlan, k: torch.Tensor, v: torch.Tensor):
    """Launch the K/V transfer; returns a callable that waits and builds the :class:`Fetched`."""
    if plan.strategy == "allgather":
        kv = torch.cat([k, v], dim=-1)
        gathered, work = comm.all_gather_rows(kv, plan.group, async_op=True)
        return lambda: _assemble_allgather(plan, gathered, work, k.shape[-1])
    send = torch.cat([k[plan.send_row, plan.send_head], v[plan.send_row, plan.send_head]], -1)
    recv, work = comm.all_to_all_rows(
        send, plan.send_counts, plan.recv_counts, plan.group, async_op=True
    )
    return lambda: _assemble_selective(plan, recv, work, k.shape[1], k.shape[-1])


def _assemble_selective(plan, recv, work, hkv, d) -> Fetched:
    work.wait()
    n = plan.fetched_keys.k_pos.numel()
    kv = recv.new_zeros(n, hkv, 2 * d)
    kv[plan.recv_slot, plan.recv_head] = recv
    return Fetched(k=kv[..., :d], v=kv[..., d:], keys=plan.fetched_keys)


def _assemble_allgather(plan, gathered, work, d) -> Fetched:
    work.wait()
    pos = plan.remote_pos
    # gathered [P, T_local, Hkv, 2D]: owner r's row i is global token owner==r, local_index==i.
    kv = gathered[plan.own.owner[pos], plan.own.local_index[pos]]
    return Fetched(k=kv[..., :d], v=kv[..., d:], keys=keys_from_positions(pos, plan.blocks))


def return_grads(plan: CPPlan, dk_f, dv_f, dk, dv) -> int:
    """Send fetched-row gradients (float32) back to their owners and add them into the local
    ``dk, dv [T_local, Hkv, D]`` float32 accumulators. Returns bytes sent."""
    if plan.strategy == "allgather":
        return _return_allgather(plan, dk_f, dv_f, dk, dv)
    send = torch.cat(
        [dk_f[plan.recv_slot, plan.recv_head], dv_f[plan.recv_slot, plan.recv_head]], -1
    )
    got, _ = comm.all_to_all_rows(send, plan.recv_counts, plan.send_counts, plan.group)
    d = dk.shape[-1]
    offs = [0, *torch.tensor(plan.send_counts).cumsum(0).tolist()]
    # One source at a time: within a source each (row, head) appears once, so index_put with
    # accumulate has no duplicate targets and the sum order is fixed (bitwise repeatable).
    for r in range(plan.world):
        sl = slice(offs[r], offs[r + 1])
        idx = (plan.send_row[sl], plan.send_head[sl])
        dk.index_put_(idx, got[sl, :d], accumulate=True)
        dv.index_put_(idx, got[sl, d:], accumulate=True)
    return send.numel() * send.element_size()


def _return_allgather(plan, dk_f, dv_f, dk, dv) -> int:
    pos = plan.remote_pos
    tl = dk.shape[0]
    buf = dk.new_zeros(plan.world, tl, *dk.shape[1:-1], 2 * dk.shape[-1])
    buf[plan.own.owner[pos], plan.own.local_index[pos]] = torch.cat([dk_f, dv_f], -1)
    got, _ = comm.all_to_all_rows(
        buf.flatten(0, 1), [tl] * plan.world, [tl] * plan.world, plan.group
    )
    total = got.view(plan.world, tl, *dk.shape[1:-1], -1).sum(0)
    d = dk.shape[-1]
    dk += total[..., :d]
    dv += total[..., d:]
    return (plan.world - 1) * buf[0].numel() * buf.element_size()  # the self slot stays home
