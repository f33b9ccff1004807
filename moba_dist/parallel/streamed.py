"""The streamed CP strategy: remote K/V arrives in pieces attended as they arrive.

A streamed plan is the selective plan (the same (row, KV head) pairs, nothing else) cut into
pieces: owner by owner in ring order (at step ``s`` rank ``r`` receives from ``(r + s) % P`` and
sends to ``(r - s) % P``), and each owner's shard further cut into runs of ``tokens_per_piece``
local rows, so that a piece's dense K/V ``[U, Hkv, D]`` holds at most half of
``max_fetch_bytes``: the piece being attended and the next one in flight together stay within
it (a piece holds at least one token's KV heads, whatever the budget). Every rank takes the same
``(P - 1) * pieces_per_owner`` exchange steps; a piece nobody selected is an exchange of zero
rows (not sent). The ranks agree on the budget (the smallest wins) with one all-reduce.

Forward: piece i + 1's exchange is launched (async: on NCCL it runs on the process group's own
stream, and ``wait`` makes the compute stream wait on it without blocking the host) before piece
i is attended; partial results merge by log-sum-exp in float32 (float64 for float64), the local
keys attended once while the first piece flies. Backward: the pieces are fetched again the same
way; the routed backward of one piece, given the final out and lse, is that piece's exact share
of dQ and its exact dK/dV, which go back to the owner in float32 (float64 for float64, as in
``selective``: a 16-bit return would round every partial before the owner sums them) while the
next piece is computed, and are added in step order (bitwise repeatable).

Host reads: one for the agreed budget and one for the per-piece row counts when the plan is
built, and one for the flags below at the end of the forward and of the backward; none per
piece. A rank that raises while computing (e.g. out of memory) keeps taking part in the
remaining exchanges with zero gradients, then every rank exchanges one flag: the failing rank
re-raises its error, the others raise naming it, and nobody waits forever.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moba_dist.kernels.dispatch import routed_backward, routed_forward
from moba_dist.kernels.plan_types import RoutedKeys
from moba_dist.parallel import comm
from moba_dist.parallel.requests import keys_from_positions
from moba_dist.parallel.stats import kv_row_bytes, row_traffic

if TYPE_CHECKING:
    from moba_dist.parallel.cp import _Call
    from moba_dist.parallel.strategies import Selective

__all__ = ["CPU_MAX_FETCH_BYTES", "CUDA_FREE_SHARE", "Streamed", "default_max_fetch_bytes"]

#: ``max_fetch_bytes=None`` on CPU: a fixed 1 GiB.
CPU_MAX_FETCH_BYTES = 1 << 30
#: ``max_fetch_bytes=None`` on CUDA: this share of the device's free memory when the call plans.
CUDA_FREE_SHARE = 0.25

Merge = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def default_max_fetch_bytes(device: torch.device, of_total: bool = False) -> int:
    """The budget of ``max_fetch_bytes=None`` on ``device`` (module doc). ``of_total``: the
    share of the device's total memory instead of its free memory (the same on every rank of a
    uniform job, so ``auto`` can decide without exchanging it)."""
    if device.type == "cuda":
        if of_total:
            memory = torch.cuda.get_device_properties(device).total_memory
        else:
            memory, _ = torch.cuda.mem_get_info(device)
        return max(1, int(memory * CUDA_FREE_SHARE))
    return CPU_MAX_FETCH_BYTES


@dataclass(frozen=True)
class _Step:
    """One exchange step: receive piece ``recv`` (slices of the sorted receive lists and of the
    piece positions) from owner ``src``, send ``send`` (a slice of the sorted send lists) to
    requester ``dst``."""

    src: int
    dst: int
    recv: slice
    pos: slice
    send: slice


def _segments(keys: torch.Tensor, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order grouping ``keys`` (ints in ``[0, n_keys)``) and the ``[n_keys + 1]`` segment
    offsets (no ``bincount``: deterministic on every device)."""
    order = torch.argsort(keys, stable=True)
    bounds = torch.arange(n_keys + 1, device=keys.device)
    return order, torch.searchsorted(keys[order], bounds)


def _rank_of_entries(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """The leading (rank) index of every entry listed by the ``[P, N, Hkv]`` table ``lengths``
    in order (``total`` = its host-known sum)."""
    per_rank = lengths[0].numel()
    slots = torch.arange(lengths.numel(), device=lengths.device)
    return torch.repeat_interleave(slots, lengths.reshape(-1), output_size=total) // per_rank


class Streamed:
    """Selective fetch, streamed in pieces bounded by ``max_fetch_bytes`` (module doc)."""

    name = "streamed"

    def __init__(self, sel: Selective, k: torch.Tensor, max_fetch_bytes: int | None) -> None:
        r = sel.routing
        self.routing, self.kv_row = r, kv_row_bytes(k)[0]
        own = default_max_fetch_bytes(k.device) if max_fetch_bytes is None else max_fetch_bytes
        self.max_fetch_bytes = comm.all_reduce_min_int(own, r.group)
        t_local = r.ctx.own.positions.numel()
        self.tokens_per_piece = max(1, self.max_fetch_bytes // 2 // (r.hkv * self.kv_row))
        self.per_owner = max(1, math.ceil(t_local / self.tokens_per_piece))
        self.steps = self._schedule(*self._sort_by_piece(sel))
        self.max_piece_rows = max((st.pos.stop - st.pos.start for st in self.steps), default=0)

    def _piece_key(self, owner: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """Key of (rank, piece) for entries of ``owner``'s local ``row`` (or a requester's)."""
        piece = torch.div(row, self.tokens_per_piece, rounding_mode="floor")
        return owner * self.per_owner + piece

    def _sort_by_piece(self, sel: Selective) -> list[list[int]]:
        """Regroup selective's send list, receive list and fetched positions by (rank, piece),
        keeping their order inside a piece (both sides list one pair's rows in the same order);
        returns the three lists of host segment offsets (the plan's one count read)."""
        r = sel.routing
        own, n_keys = r.ctx.own, r.ctx.world * self.per_owner
        # The rank of every entry comes from the [P, N, Hkv] length tables (no host copy).
        requester = _rank_of_entries(r.send_len, sum(r.send_rows))
        order, send_off = _segments(self._piece_key(requester, sel.send_row), n_keys)
        self.send_row, self.send_head = sel.send_row[order], sel.send_head[order]
        fpos = sel.keys.k_pos
        owner = _rank_of_entries(r.recv_len, sum(r.recv_rows))
        local_row = own.local_index[fpos[sel.recv_slot]]
        order, recv_off = _segments(self._piece_key(owner, local_row), n_keys)
        self.recv_head = sel.recv_head[order]
        # Fetched positions grouped by piece (ascending inside one), every entry's slot there.
        p_order, pos_off = _segments(
            self._piece_key(own.owner[fpos], own.local_index[fpos]), n_keys
        )
        self.piece_pos = fpos[p_order]
        inverse = torch.empty_like(p_order)
        inverse[p_order] = torch.arange(p_order.numel(), device=p_order.device)
        self.recv_slot = inverse[sel.recv_slot[order]]
        host = torch.cat([send_off, recv_off, pos_off]).tolist()
        return [host[i * (n_keys + 1) : (i + 1) * (n_keys + 1)] for i in range(3)]

    def _schedule(self, send_off: list[int], recv_off: list[int], pos_off: list[int]):
        """The exchange steps, ring order then piece order: the same count on every rank."""
        world, me, per = self.routing.ctx.world, self.routing.ctx.rank, self.per_owner

        def cut(off: list[int], key: int) -> slice:
            return slice(off[key], off[key + 1])

        return [
            _Step(src, dst, cut(recv_off, src * per + c), cut(pos_off, src * per + c),
                  cut(send_off, dst * per + c))
            for s in range(1, world)
            for src, dst in [((me + s) % world, (me - s) % world)]
            for c in range(per)
        ]  # fmt: skip

    @classmethod
    def plan(cls, sel: Selective, k: torch.Tensor, max_fetch_bytes: int | None) -> Streamed:
        """The streamed cut of the selective plan ``sel`` for K/V like ``k``."""
        return cls(sel, k, max_fetch_bytes)

    # --- exchanges ---

    def _counts(self, a: int, n_a: int, b: int, n_b: int) -> tuple[list[int], list[int]]:
        """Split sizes of a step: ``n_a`` rows to rank ``a``, ``n_b`` rows from rank ``b``."""
        world = self.routing.ctx.world
        first, second = [0] * world, [0] * world
        first[a], second[b] = n_a, n_b
        return first, second

    def _fetch(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """Launch step i's K/V exchange; returns ``(recv, work)``."""
        st = self.steps[i]
        rows, heads = self.send_row[st.send], self.send_head[st.send]
        send = torch.cat([k[rows, heads], v[rows, heads]], -1)
        n_recv = st.recv.stop - st.recv.start
        sc, rc = self._counts(st.dst, send.shape[0], st.src, n_recv)
        return comm.exchange_rows_async(send, sc, rc, self.routing.group)

    def _give_back(self, i: int, grads: torch.Tensor):
        """Launch the return of step i's gradients (the reverse of its fetch)."""
        st = self.steps[i]
        sc, rc = self._counts(st.src, grads.shape[0], st.dst, st.send.stop - st.send.start)
        return comm.exchange_rows_async(grads, sc, rc, self.routing.group)

    def _piece(self, i: int, recv: torch.Tensor, hkv: int, d: int):
        """The dense K/V of step i's piece, its key set, and where its entries sit."""
        st = self.steps[i]
        pos = self.piece_pos[st.pos]
        slot = self.recv_slot[st.recv] - st.pos.start
        head = self.recv_head[st.recv]
        kv = recv.new_zeros(pos.numel(), hkv, 2 * d)
        kv[slot, head] = recv
        keys: RoutedKeys = keys_from_positions(pos, self.routing.ctx.blocks)
        return kv[..., :d], kv[..., d:], keys, slot, head

    def _agree(self, error: Exception | None) -> None:
        """Every rank learns whether any failed (module doc); raises on every rank if so."""
        if self.routing.ctx.world > 1:
            flags = comm.all_gather_flag(int(error is None), self.routing.group)
        else:
            flags = [int(error is None)]
        if error is not None:
            raise error
        bad = [rank for rank, ok in enumerate(flags) if not ok]
        if bad:
            raise RuntimeError(
                f"MoBA CP streamed: rank(s) {bad} of the process group failed during the "
                f"streamed exchange (see their error); rank {self.routing.ctx.rank} stops too "
                "instead of waiting for them"
            )

    # --- the two passes ---

    def forward(self, call: _Call, q, k, v, merge: Merge) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out, lse)`` of the call: local keys, then every piece as it arrives."""
        n, (hkv, d) = len(self.steps), k.shape[1:]
        pending = self._fetch(0, k, v) if n else None
        error: Exception | None = None
        out = lse = None
        try:
            out, lse = routed_forward(
                call.backend, q, k, v, call.problem(call.routing.ctx.local_keys)
            )
            out = out.to(lse.dtype)
        except Exception as exc:  # re-raised on every rank by _agree
            error = exc
        for i in range(n):
            recv, work = pending
            work.wait()
            pending = self._fetch(i + 1, k, v) if i + 1 < n else None
            if error is not None or self.steps[i].pos.stop == self.steps[i].pos.start:
                continue
            try:
                fk, fv, keys, _, _ = self._piece(i, recv, hkv, d)
                del recv
                o2, l2 = routed_forward(call.backend, q, fk, fv, call.problem(keys))
                out, lse = merge(out, lse, o2, l2)
            except Exception as exc:
                error = exc
        self._agree(error)
        return out.to(q.dtype), lse

    def backward(self, call: _Call, dout, q, k, v, out, lse):
        """``(dq, dk, dv)`` in float32 (float64 for float64): local keys, then every piece
        fetched again, its dK/dV returned to the owner while the next is computed."""
        n, (hkv, d) = len(self.steps), k.shape[1:]
        gdtype = torch.float64 if k.dtype == torch.float64 else torch.float32
        pending = self._fetch(0, k, v) if n else None
        error: Exception | None = None
        dq = dk = dv = None
        try:
            local = call.problem(call.routing.ctx.local_keys)
            dq, dk, dv = routed_backward(call.backend, dout, q, k, v, out, lse, local)
        except Exception as exc:  # re-raised on every rank by _agree
            error = exc
        returning = None
        for i in range(n):
            recv, work = pending
            work.wait()
            pending = self._fetch(i + 1, k, v) if i + 1 < n else None
            grads = recv.new_zeros(recv.shape[0], 2 * d, dtype=gdtype)
            if error is None and recv.shape[0]:
                try:
                    fk, fv, keys, slot, head = self._piece(i, recv, hkv, d)
                    prob = call.problem(keys)
                    dq2, dk_f, dv_f = routed_backward(call.backend, dout, q, fk, fv, out, lse, prob)
                    dq = dq + dq2
                    grads = torch.cat([dk_f[slot, head], dv_f[slot, head]], -1).to(gdtype)
                except Exception as exc:
                    error = exc
            launched = (i, *self._give_back(i, grads))
            if returning is not None:
                self._add_returned(returning, dk, dv, error)
            returning = launched
        if returning is not None:
            self._add_returned(returning, dk, dv, error)
        self._agree(error)
        return dq, dk, dv

    def _add_returned(self, returning, dk, dv, error: Exception | None) -> None:
        """Wait for one step's gradient return and add it to this rank's dK/dV. Within a step
        every (row, head) comes from one requester once: no duplicate targets, fixed order."""
        i, got, work = returning
        work.wait()
        if error is not None:
            return
        sl, d = self.steps[i].send, dk.shape[-1]
        idx = (self.send_row[sl], self.send_head[sl])
        dk.index_put_(idx, got[:, :d].to(dk.dtype), accumulate=True)
        dv.index_put_(idx, got[:, d:].to(dv.dtype), accumulate=True)

    def stats(self, k: torch.Tensor, keep_fetched: bool) -> dict[str, Any]:
        """Selective's byte counts, plus ``pieces`` (exchange steps of each rank, empty ones
        included), ``max_piece_bytes`` (the largest dense piece this rank holds) and the agreed
        ``max_fetch_bytes``."""
        r = self.routing
        traffic = row_traffic(k, sum(r.send_rows), sum(r.recv_rows), keep_fetched)
        return {
            **traffic, "pieces": len(self.steps),
            "max_piece_bytes": self.max_piece_rows * r.hkv * self.kv_row,
            "max_fetch_bytes": self.max_fetch_bytes,
        }  # fmt: skip
