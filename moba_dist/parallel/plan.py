"""The shared plan of one context-parallel MoBA call (steps 1-3 of the CP algorithm): global
centroids, routing, every rank's needs and the counts each strategy plans from.

:func:`route` makes two collectives (the centroid all-reduce, the need-table all-gather that
also carries the layer's fingerprint) and one host read; the strategy objects
(``parallel/strategies.py``) build their exchange from the :class:`Routing` it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moba_dist.kernels.blocks import segment_sums
from moba_dist.kernels.gate import select_blocks
from moba_dist.parallel import comm
from moba_dist.parallel.handshake import FIELDS, check_rows
from moba_dist.parallel.layouts import local_positions
from moba_dist.parallel.requests import needed_maxpos, rows_total, rows_upto

if TYPE_CHECKING:
    from moba_dist.parallel.context import CPContext

__all__ = ["Ownership", "Routing", "build_ownership", "global_centroids", "route"]


@dataclass(frozen=True)
class Ownership:
    """Where every global token lives: ``owner [T]`` (group rank) and ``local_index [T]`` (row in
    the owner's shard); ``all_positions [P, T_local]``, every rank's positions (ascending), and
    this rank's ``positions [T_local]``."""

    owner: torch.Tensor
    local_index: torch.Tensor
    all_positions: torch.Tensor
    positions: torch.Tensor


def build_ownership(
    cu_seqlens: torch.Tensor, rank: int, world_size: int, layout: str, device: torch.device
) -> Ownership:
    """Invert the layout for all ranks (O(T) int64, computed identically on every rank)."""
    total = int(cu_seqlens[-1])
    owner = torch.empty(total, dtype=torch.int64, device=device)
    local_index = torch.empty(total, dtype=torch.int64, device=device)
    every = []
    for r in range(world_size):
        pos = local_positions(cu_seqlens, rank=r, world_size=world_size, layout=layout).to(device)
        owner[pos] = r
        local_index[pos] = torch.arange(pos.numel(), device=device)
        every.append(pos)
    all_positions = torch.stack(every)
    return Ownership(owner, local_index, all_positions, all_positions[rank])


def _local_block_sums(k: torch.Tensor, ctx: CPContext, acc: torch.dtype) -> torch.Tensor:
    """Sums ``[N, Hkv, D]`` of this rank's keys per global block. Local rows of block j are the
    contiguous range ``ctx.local_keys.block_rows[j:j + 2]``, so on CUDA one Triton kernel sums
    them without a host sync; elsewhere ``segment_sums`` (which finds its runs on the host)."""
    if k.device.type == "cuda" and acc == torch.float32:
        try:
            from moba_dist.kernels.triton_gate import block_sums_triton
        except ImportError:
            pass
        else:
            return block_sums_triton(k, ctx.local_keys.block_rows)
    b = ctx.blocks
    return segment_sums(k, ctx.local_block, b.num_blocks, b.block_size, acc)


def global_centroids(k: torch.Tensor, ctx: CPContext, group: Any) -> torch.Tensor:
    """Exact centroids ``[N, Hkv, D]`` float32 (float64 for float64) from all-reduced partial
    key sums (exchange 1 of every call)."""
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    sums = comm.all_reduce_sum(_local_block_sums(k, ctx, acc), group)
    lengths = (ctx.blocks.block_starts[1:] - ctx.blocks.block_starts[:-1]).to(acc)
    return sums / lengths.view(-1, 1, 1)


@dataclass(frozen=True)
class Routing:
    """One call's routing and every rank's needs: what every strategy plans from.

    ``sel [T_local, Hq, K]`` int32 global block ids; ``need [P, N, Hkv]`` every rank's need table
    (``parallel/requests.py``). Selective counts, owner-major ``[P, N, Hkv]`` range tables in
    local rows: ``recv_start/recv_len`` what each owner sends this rank (in the owner's rows),
    ``send_start/send_len`` what this rank sends each requester (in its own rows). Host ints:
    ``recv_rows[o]`` / ``send_rows[r]`` their sums, ``union_rows[r]`` the remote (row, KV head)
    pairs rank r needs, ``fetched_rows`` the distinct remote positions this rank needs (selected
    by ``fetch_mask`` over ``ctx.remote_pos``).
    """

    ctx: CPContext
    group: Any
    sel: torch.Tensor
    hkv: int
    need: torch.Tensor
    recv_start: torch.Tensor
    recv_len: torch.Tensor
    send_start: torch.Tensor
    send_len: torch.Tensor
    fetch_mask: torch.Tensor
    recv_rows: list[int]
    send_rows: list[int]
    union_rows: list[int]
    fetched_rows: int

    @property
    def union_fractions(self) -> list[float]:
        """Share of the remote (row, KV head) pairs each rank needs (identical on every rank)."""
        remote_total = (self.ctx.num_tokens - self.ctx.own.positions.numel()) * self.hkv
        return [n / max(remote_total, 1) for n in self.union_rows]


def _exchange_shape(k: Any, error: Exception | None) -> tuple[int, int]:
    """``(Hkv, D)`` of the exchanges. A rank whose k cannot even size them cannot take part: it
    raises at once, and the others fail at the process group's timeout."""
    if isinstance(k, torch.Tensor) and k.dim() == 3 and k.shape[1] > 0:
        return k.shape[1], k.shape[2]
    raise error if error is not None else ValueError("k must be [T_local, Hkv, D], Hkv >= 1")


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a stream sync (pinned, non-blocking) on CUDA."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _counts(
    ctx: CPContext, need: torch.Tensor, fetch_mask: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Device-side range tables, and the ``[3P + 1]`` counts the plan reads on the host."""
    me, own = ctx.rank, ctx.own
    recv_start, recv_len = rows_upto(
        own.all_positions, ctx.block_lo, ctx.block_hi, need[me].expand_as(need)
    )
    send_start, send_len = rows_upto(own.positions, ctx.block_lo[me], ctx.block_hi[me], need)
    recv_len[me] = 0  # a rank's own rows are its local keys, never sent
    send_len[me] = 0
    _, own_len = rows_upto(own.all_positions, ctx.block_lo, ctx.block_hi, need)
    union = (rows_total(need, ctx.blocks) - own_len).sum((1, 2))
    counts = torch.cat(
        [recv_len.sum((1, 2)), send_len.sum((1, 2)), union, fetch_mask.sum().view(1)]
    )
    tables = dict(recv_start=recv_start, recv_len=recv_len, send_start=send_start,
                  send_len=send_len)  # fmt: skip
    return tables, counts


def route(
    q: torch.Tensor, k: torch.Tensor, ctx: CPContext, group: Any, topk: int,
    header: list[int], error: Exception | None, gate_precision: str = "float32",
) -> Routing:  # fmt: skip
    """Centroids, routing, need tables and counts; checks every rank's fingerprint ``header``.

    A rank whose own validation failed (``error``) takes part with empty needs and then raises
    it; the others raise naming that rank. Raises on every rank when fingerprints disagree.
    """
    hkv, d = _exchange_shape(k, error)
    n, world = ctx.blocks.num_blocks, ctx.world
    if error is None:
        centroids = global_centroids(k, ctx, group)  # step 1 (exchange 1)
        tok = ctx.local_block
        # Step 2: route the local queries against the global centroids.
        first = ctx.blocks.block_seq_first[tok]
        sel = select_blocks(q, centroids, tok, first, topk, precision=gate_precision)
        need = needed_maxpos(sel, ctx.run, ctx.run_last_pos, hkv, n)  # step 3
    else:
        acc = torch.float64 if k.dtype == torch.float64 else torch.float32
        comm.all_reduce_sum(torch.zeros(n, hkv, d, dtype=acc, device=ctx.device), group)
        sel = torch.empty(0, 0, 0, dtype=torch.int32, device=ctx.device)
        need = torch.full((n, hkv), -1, dtype=torch.int64, device=ctx.device)
    head = _to_device(torch.tensor(header, dtype=torch.int64), ctx.device)
    # Steps 0 and 3: every rank's needs and fingerprint in one equal-size all-gather.
    table = comm.all_gather_rows(torch.cat([need.reshape(-1), head]), group)
    need_all = table[:, : n * hkv].view(world, n, hkv)
    fetch_mask = ctx.remote_pos <= need_all[ctx.rank].amax(1)[ctx.remote_block]
    tables, counts = _counts(ctx, need_all, fetch_mask)
    host = torch.cat([counts, table[:, n * hkv :].reshape(-1)]).tolist()  # the one host read
    fp, c = len(FIELDS), 3 * world + 1
    rows = [host[c + r * fp : c + (r + 1) * fp] for r in range(world)]
    check_rows(rows, FIELDS, ctx.rank, error)
    return Routing(
        ctx=ctx, group=group, sel=sel, hkv=hkv, need=need_all, fetch_mask=fetch_mask,
        recv_rows=host[:world], send_rows=host[world : 2 * world],
        union_rows=host[2 * world : 3 * world], fetched_rows=host[3 * world], **tables,
    )  # fmt: skip
