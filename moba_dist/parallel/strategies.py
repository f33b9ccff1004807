"""The CP strategies: one small object per way of moving K/V (step 6 of the CP algorithm).

Every strategy implements :class:`Strategy`. ``plan`` builds it from the call's shared
:class:`~moba_dist.parallel.plan.Routing`, identically on every rank for the same routing (it
may enqueue collectives, never on a rank-local condition, and reads the host only for sizes that
``Routing`` does not already hold). ``forward_exchange`` launches the K/V transfer and returns a
callable that waits for it and assembles a :class:`Fetched` key set; the forward attends to the
local keys in between. The backward calls ``forward_exchange`` again (unless ``keep_fetched``)
and ``backward_exchange`` to send the fetched rows' float32 gradients to their owners.
``stats`` gives the byte counts of ``last_stats``. To add one: a class with this interface in
its own module, its name in ``parallel.config.STRATEGIES`` and in :data:`STRATEGY_TYPES`.

``streamed`` (``parallel/streamed.py``) is planned from the selective plan and attends its pieces
as they arrive, so the autograd function hands it the whole forward and backward (its
``forward`` / ``backward``) instead of calling the two exchanges.

A strategy that needs no routing before its exchange (``heads``: the sequence is re-split by
heads and the local op routes whole sequences) implements :class:`WholeCallStrategy` instead
and is listed in :data:`WHOLE_CALL_TYPES`; the runtime then calls its ``run`` in place of the
routing, the plan and the autograd function.

``auto`` (:func:`choose_strategy`) prices selective, allgather and streamed with
``parallel.cost_model`` (the model ``benchmarks/project_cp.py`` projects with) from host numbers
every rank holds after the plan: the union fractions, the shape and the fetch limit. Every rank
takes the same one with no further collective, and no device read.

Transfers carry (row, KV head) vectors, K and V side by side as ``[n, 2D]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from moba_dist.kernels.plan_types import RoutedKeys
from moba_dist.parallel import comm, cost_model
from moba_dist.parallel.config import STRATEGIES
from moba_dist.parallel.heads import Heads
from moba_dist.parallel.plan import Routing
from moba_dist.parallel.requests import compact, keys_from_positions, ranges
from moba_dist.parallel.stats import row_traffic
from moba_dist.parallel.streamed import Streamed, default_max_fetch_bytes

if TYPE_CHECKING:
    from moba_dist.parallel.config import CPConfig
    from moba_dist.parallel.context import CPContext

__all__ = [
    "AUTO_LINKS",
    "STRATEGY_TYPES",
    "WHOLE_CALL_TYPES",
    "AllGather",
    "Fetched",
    "Selective",
    "Strategy",
    "WholeCallStrategy",
    "auto_costs",
    "auto_fetch_limit",
    "auto_shape",
    "choose_strategy",
]


@dataclass(frozen=True)
class Fetched:
    """Remote K/V of one call: ``k, v [U, Hkv, D]`` at the ascending positions of ``keys`` (zeros
    where a (row, head) was not fetched: the routing never reads those)."""

    k: torch.Tensor
    v: torch.Tensor
    keys: RoutedKeys


class Strategy(Protocol):
    """Interface of a CP strategy object (module doc). ``name`` is what ``last_stats`` reports."""

    name: str

    @classmethod
    def plan(cls, routing: Routing) -> Strategy:
        """This call's exchange plan, from the shared routing."""
        ...

    def forward_exchange(self, k: torch.Tensor, v: torch.Tensor) -> Callable[[], Fetched]:
        """Launch the transfer of the remote K/V this rank needs (``k, v [T_local, Hkv, D]``);
        the returned callable waits for it and assembles the key set."""
        ...

    def backward_exchange(
        self, dk_f: torch.Tensor, dv_f: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
    ) -> None:
        """Send the gradients ``dk_f, dv_f`` of the fetched rows (float32, shaped like
        ``Fetched.k``) to their owners and add what others return into ``dk, dv``."""
        ...

    def stats(self, k: torch.Tensor, keep_fetched: bool) -> dict[str, int]:
        """Host byte counts: ``bytes_sent``, ``bytes_received`` (forward K/V payload),
        ``bwd_bytes_sent``, ``bwd_bytes_received`` (re-fetch and gradient return)."""
        ...


class WholeCallStrategy(Protocol):
    """Interface of a strategy that runs the whole call itself (module doc)."""

    name: str

    @staticmethod
    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: CPContext, cfg: CPConfig
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """``(out [T_local, Hq, D], lse [Hq, T_local], traffic)`` for this rank's shards, with
        autograd for q, k, v; ``traffic`` holds the four byte counts of :meth:`Strategy.stats`.
        Agrees with the other ranks on shapes itself (no rank may hang on a mismatch)."""
        ...


class Selective:
    """Fetch exactly the requested (row, KV head) pairs, each once however many query heads chose
    it, with one variable-size all-to-all (gradients return by the reverse one)."""

    name = "selective"

    def __init__(self, routing: Routing) -> None:
        ctx, hkv = routing.ctx, routing.hkv
        self.routing = routing
        head = torch.arange(hkv, device=ctx.device).expand_as(routing.need).reshape(-1)
        # Owner side: rows this rank sends each requester, requester-major, in request order.
        n_send = sum(routing.send_rows)
        send_len = routing.send_len.reshape(-1)
        self.send_row = ranges(routing.send_start, send_len, n_send)
        self.send_head = torch.repeat_interleave(head, send_len, output_size=n_send)
        # Requester side: the same rows as each owner lists them, owner-major.
        n_recv = sum(routing.recv_rows)
        recv_len = routing.recv_len.reshape(-1)
        t_local = ctx.own.positions.numel()
        offset = (torch.arange(ctx.world, device=ctx.device) * t_local).view(-1, 1, 1)
        flat = ranges(routing.recv_start + offset, recv_len, n_recv)
        recv_pos = ctx.own.all_positions.reshape(-1)[flat]
        self.recv_head = torch.repeat_interleave(head, recv_len, output_size=n_recv)
        fetched_pos = ctx.remote_pos[compact(routing.fetch_mask, routing.fetched_rows)]
        self.recv_slot = torch.searchsorted(fetched_pos, recv_pos)
        self.keys = keys_from_positions(fetched_pos, ctx.blocks)

    @classmethod
    def plan(cls, routing: Routing) -> Selective:
        return cls(routing)

    def forward_exchange(self, k: torch.Tensor, v: torch.Tensor) -> Callable[[], Fetched]:
        r = self.routing
        send = torch.cat([k[self.send_row, self.send_head], v[self.send_row, self.send_head]], -1)
        recv, work = comm.all_to_all_rows(send, r.send_rows, r.recv_rows, r.group, async_op=True)
        return lambda: self._assemble(recv, work, k.shape[1], k.shape[-1])

    def _assemble(self, recv, work, hkv: int, d: int) -> Fetched:
        work.wait()
        kv = recv.new_zeros(self.keys.k_pos.numel(), hkv, 2 * d)
        kv[self.recv_slot, self.recv_head] = recv
        return Fetched(k=kv[..., :d], v=kv[..., d:], keys=self.keys)

    def backward_exchange(self, dk_f, dv_f, dk, dv) -> None:
        r = self.routing
        slot, head = self.recv_slot, self.recv_head
        send = torch.cat([dk_f[slot, head], dv_f[slot, head]], -1)
        got, _ = comm.all_to_all_rows(send, r.recv_rows, r.send_rows, r.group)
        d = dk.shape[-1]
        offs = [0, *torch.tensor(r.send_rows).cumsum(0).tolist()]  # host ints, no sync
        # One source at a time: within a source each (row, head) appears once, so index_put with
        # accumulate has no duplicate targets and the sum order is fixed (bitwise repeatable).
        for src in range(r.ctx.world):
            sl = slice(offs[src], offs[src + 1])
            idx = (self.send_row[sl], self.send_head[sl])
            dk.index_put_(idx, got[sl, :d], accumulate=True)
            dv.index_put_(idx, got[sl, d:], accumulate=True)

    def stats(self, k: torch.Tensor, keep_fetched: bool) -> dict[str, int]:
        r = self.routing
        return row_traffic(k, sum(r.send_rows), sum(r.recv_rows), keep_fetched)


class AllGather:
    """Gather every remote row of every KV head with one equal-size all-gather; gradients go back
    by an equal-size all-to-all and are summed in rank order."""

    name = "allgather"

    def __init__(self, routing: Routing) -> None:
        ctx = routing.ctx
        self.routing = routing
        self.owner = ctx.own.owner[ctx.remote_pos]
        self.local_index = ctx.own.local_index[ctx.remote_pos]

    @classmethod
    def plan(cls, routing: Routing) -> AllGather:
        return cls(routing)

    def forward_exchange(self, k: torch.Tensor, v: torch.Tensor) -> Callable[[], Fetched]:
        gathered, work = comm.all_gather_rows(torch.cat([k, v], -1), self.routing.group, True)
        return lambda: self._assemble(gathered, work, k.shape[-1])

    def _assemble(self, gathered, work, d: int) -> Fetched:
        work.wait()
        # gathered [P, T_local, Hkv, 2D]: owner r's row i is global token owner==r, local_index==i.
        kv = gathered[self.owner, self.local_index]
        return Fetched(k=kv[..., :d], v=kv[..., d:], keys=self.routing.ctx.remote_keys)

    def backward_exchange(self, dk_f, dv_f, dk, dv) -> None:
        world, tl = self.routing.ctx.world, dk.shape[0]
        buf = dk.new_zeros(world, tl, *dk.shape[1:-1], 2 * dk.shape[-1])
        buf[self.owner, self.local_index] = torch.cat([dk_f, dv_f], -1)
        got, _ = comm.all_to_all_rows(
            buf.flatten(0, 1), [tl] * world, [tl] * world, self.routing.group
        )
        total = got.view(world, tl, *dk.shape[1:-1], -1).sum(0)
        d = dk.shape[-1]
        dk += total[..., :d]
        dv += total[..., d:]

    def stats(self, k: torch.Tensor, keep_fetched: bool) -> dict[str, int]:
        t_local, hkv, _ = k.shape
        n = (self.routing.ctx.world - 1) * t_local * hkv
        return row_traffic(k, n, n, keep_fetched)


#: Routed strategy objects by name.
STRATEGY_TYPES: dict[str, type] = {
    "selective": Selective, "allgather": AllGather, "streamed": Streamed,
}  # fmt: skip
#: Whole-call strategy objects by name.
WHOLE_CALL_TYPES: dict[str, type[WholeCallStrategy]] = {"heads": Heads}
if {*STRATEGY_TYPES, *WHOLE_CALL_TYPES} != set(STRATEGIES) - {"auto"}:
    raise RuntimeError(f"the strategy objects must match STRATEGIES = {STRATEGIES}")

#: ``strategy="auto"``'s links: the cost model's defaults (8 consecutive group ranks share a
#: node: NVLink 360 GB/s within, 40 GB/s per GPU across). A world of <= 8 is thus one node.
#: Only relative costs matter to the choice; the gloo CPU runs see the same rule.
AUTO_LINKS = cost_model.Links()


def auto_fetch_limit(device: torch.device, max_fetch_bytes: int | None) -> int:
    """The fetched K/V ``auto`` lets a call hold at once: ``max_fetch_bytes``, or when None
    ``streamed.CPU_MAX_FETCH_BYTES`` on CPU and ``streamed.CUDA_FREE_SHARE`` of the device's
    *total* memory on CUDA. Not of its free memory as ``streamed`` sizes its pieces: that differs
    between ranks, and ``auto`` must decide identically everywhere without a collective. Once
    taken, ``streamed`` sizes its pieces as always (``max_fetch_bytes`` or its own default)."""
    if max_fetch_bytes is not None:
        return max_fetch_bytes
    return default_max_fetch_bytes(device, of_total=True)


def auto_shape(routing: Routing, k: torch.Tensor) -> cost_model.Shape:
    """The cost model's shape of this call (identical on every rank: the handshake checked)."""
    ctx = routing.ctx
    return cost_model.Shape(
        ctx.num_tokens, ctx.world, routing.sel.shape[1], k.shape[1], k.shape[2],
        k.element_size(), ctx.blocks.block_size,
    )  # fmt: skip


def auto_costs(
    routing: Routing, k: torch.Tensor, keep_fetched: bool, max_fetch_bytes: int | None
) -> tuple[str, dict[str, cost_model.Cost]]:
    """``auto``'s choice and every candidate's predicted cost, from host values every rank
    holds after the plan (the union fractions, the shape, the limit): no collective, no device
    read. ``streamed`` is a candidate unless ``keep_fetched`` (which it refuses)."""
    limit = auto_fetch_limit(k.device, max_fetch_bytes)
    taken, costs = _priced(
        auto_shape(routing, k), tuple(routing.union_fractions), keep_fetched, limit
    )
    return taken, dict(costs)


@functools.lru_cache(maxsize=64)
def _priced(
    shape: cost_model.Shape, fractions: tuple[float, ...], keep_fetched: bool, limit: int
) -> tuple[str, dict[str, cost_model.Cost]]:
    """The cost model's answer for these exact values. Pricing takes ~1 ms of host time per
    layer call (dozens of small float64 ops); the inputs repeat across layers and steps (at
    scale every rank's union is often exactly 1.0), so equal values are priced once."""
    names = ("selective", "allgather") + (() if keep_fetched else ("streamed",))
    costs = cost_model.auto_costs(shape, list(fractions), AUTO_LINKS, keep_fetched, names, limit)
    return cost_model.choose(costs, fetch_limit=limit), costs


def choose_strategy(
    name: str, routing: Routing, k: torch.Tensor, max_fetch_bytes: int | None = None,
    keep_fetched: bool = False,
) -> tuple[Strategy | Streamed, dict[str, cost_model.Cost] | None]:  # fmt: skip
    """The strategy object of ``name`` for K/V like ``k``, and (``"auto"`` only) every
    candidate's predicted cost. ``"auto"`` takes the cheapest candidate whose fetched K/V fits
    :func:`auto_fetch_limit` (``cost_model.choose``), so every rank takes the same one."""
    costs = None
    if name == "auto":
        name, costs = auto_costs(routing, k, keep_fetched, max_fetch_bytes)
    if name == "streamed":
        return Streamed.plan(Selective(routing), k, max_fetch_bytes), costs
    return STRATEGY_TYPES[name].plan(routing), costs
