"""Step 5 of the CP algorithm (design.md): moving K/V rows to the ranks that selected them
(and their gradients back).

Transfers carry (row, kv head) vectors: K and V side by side as ``[n, 2D]``, each KV head fetched
once however many query heads chose it. Under the ``allgather`` strategy every remote row of
every head is moved with an equal-size all-gather instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moba_dist.kernels.plan_types import RoutedKeys
from moba_dist.parallel import comm
from moba_dist.parallel.plan import CPPlan
from moba_dist.parallel.requests import keys_from_positions

__all__ = ["Fetched", "return_grads", "start_fetch"]


@dataclass
class Fetched:
    """Remote K/V gathered into a position-sorted key set ``[U, Hkv, D]`` (zeros where a (row,
    head) was not fetched: the routing never reads those)."""

    k: torch.Tensor
    v: torch.Tensor
    keys: RoutedKeys


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


def return_grads(plan: CPPlan, dk_f, dv_f, dk, dv) -> None:
    """Send fetched-row gradients (float32) back to their owners and add them into the local
    ``dk, dv [T_local, Hkv, D]`` float32 accumulators."""
    if plan.strategy == "allgather":
        _return_allgather(plan, dk_f, dv_f, dk, dv)
        return
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


def _return_allgather(plan, dk_f, dv_f, dk, dv) -> None:
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
