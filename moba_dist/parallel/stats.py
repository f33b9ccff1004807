"""Statistics of one CP call, recorded when the forward plans it (not inside the backward).

Every quantity is known once the plan exists: the backward re-fetches the forward's rows (unless
``keep_fetched``) and returns one gradient row per fetched row, so its traffic is fixed by the
same counts. All values are host ints from the plan: recording them costs no synchronization.
"""

from __future__ import annotations

from typing import Any

import torch

from moba_dist.kernels.blocks import BlockLayout

__all__ = ["call_stats", "moba_density"]


def moba_density(blocks: BlockLayout, cu_seqlens: torch.Tensor, topk: int) -> float:
    """Useful keys over dense causal keys for the whole packed batch (docs/semantics.md);
    empty sequences count for nothing."""
    sizes = (blocks.block_starts[1:] - blocks.block_starts[:-1]).double()
    index_in_seq = torch.arange(blocks.num_blocks, device=sizes.device) - blocks.block_seq_first
    past = torch.clamp(index_in_seq, max=topk - 1).double() * blocks.block_size
    useful = (sizes * (sizes + 1) / 2 + past * sizes).sum()
    n = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return float(useful / (n * (n + 1) / 2).sum().clamp_min(1))


def _rows(plan: Any, t_local: int, hkv: int) -> tuple[int, int]:
    """(rows this rank sends, rows it receives) in the forward; a row is one (token, KV head)."""
    if plan.strategy == "allgather":
        n = (plan.world - 1) * t_local * hkv
        return n, n
    return sum(plan.send_counts), sum(plan.recv_counts)


def call_stats(plan: Any, k: torch.Tensor, density: float, keep_fetched: bool) -> dict[str, Any]:
    """The statistics dict of one call (keys documented on ``MoBAContextParallel``)."""
    t_local, hkv, d = k.shape
    kv_row = 2 * d * k.element_size()  # K and V side by side
    # Gradients travel in the kernels' accumulation dtype: float64 for float64, else float32.
    grad_row = 2 * d * (8 if k.dtype == torch.float64 else 4)
    sent, recv = _rows(plan, t_local, hkv)
    refetch_sent, refetch_recv = (0, 0) if keep_fetched else (sent * kv_row, recv * kv_row)
    return {
        "strategy": plan.strategy, "bytes_sent": sent * kv_row, "bytes_received": recv * kv_row,
        "allgather_bytes_received": (plan.world - 1) * t_local * hkv * kv_row,
        "union_fraction": plan.union_fraction, "union_fraction_max": plan.union_fraction_max,
        "density": density, "world_size": plan.world,
        # Backward: the re-fetch, then each fetched row's dK/dV back to its owner.
        "bwd_bytes_sent": refetch_sent + recv * grad_row,
        "bwd_bytes_received": refetch_recv + sent * grad_row,
    }  # fmt: skip
