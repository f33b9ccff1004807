"""Statistics of one CP call, recorded when the forward plans it (not inside the backward) and
turned into a dict only when read.

Every quantity is known once the plan exists: the backward re-fetches the forward's rows (unless
``keep_fetched``) and returns one gradient row per fetched row, so its traffic is fixed by the
same counts. The strategy's traffic and the union fractions are host ints of the plan, and
``auto``'s predicted costs are host objects built from them; only the batch density needs the
device, and it is computed when the statistics are first read (once per context and top-k).
The cost summaries are also made only when read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moba_dist.kernels.blocks import BlockLayout

__all__ = ["CallStats", "kv_row_bytes", "moba_density", "row_traffic"]


def moba_density(blocks: BlockLayout, cu_seqlens: torch.Tensor, topk: int) -> float:
    """Useful keys over dense causal keys for the whole packed batch (docs/semantics.md);
    empty sequences count for nothing."""
    sizes = (blocks.block_starts[1:] - blocks.block_starts[:-1]).double()
    index_in_seq = torch.arange(blocks.num_blocks, device=sizes.device) - blocks.block_seq_first
    past = torch.clamp(index_in_seq, max=topk - 1).double() * blocks.block_size
    useful = (sizes * (sizes + 1) / 2 + past * sizes).sum()
    n = (cu_seqlens[1:] - cu_seqlens[:-1]).double()
    return float(useful / (n * (n + 1) / 2).sum().clamp_min(1))


@dataclass(frozen=True)
class CallStats:
    """What one call records (host values and the context); :meth:`as_dict` is what
    ``MoBAContextParallel.last_stats`` shows (keys documented there and in docs/design.md)."""

    strategy: str
    traffic: dict[str, int]
    union_fraction: float | None  # None for a strategy without routing (heads)
    union_fraction_max: float | None
    allgather_bytes_received: int
    world_size: int
    context: Any
    moba_topk: int
    auto_costs: dict[str, Any] | None = None  # cost_model.Cost per candidate, strategy="auto"

    def as_dict(self) -> dict[str, Any]:
        costs = self.auto_costs
        return {
            "strategy": self.strategy, **self.traffic,
            "allgather_bytes_received": self.allgather_bytes_received,
            "union_fraction": self.union_fraction, "union_fraction_max": self.union_fraction_max,
            "density": self.context.density(self.moba_topk), "world_size": self.world_size,
            "auto_costs": None if costs is None else {n: c.summary() for n, c in costs.items()},
        }  # fmt: skip


def kv_row_bytes(k: torch.Tensor) -> tuple[int, int]:
    """Bytes of one (token, KV head) row of K and V side by side, and of its float gradient
    (the kernels' accumulation dtype: float64 for float64, else float32)."""
    d = k.shape[-1]
    return 2 * d * k.element_size(), 2 * d * (8 if k.dtype == torch.float64 else 4)


def row_traffic(k: torch.Tensor, sent: int, received: int, keep_fetched: bool) -> dict[str, int]:
    """Byte counts of a strategy that moves ``sent`` / ``received`` K/V rows in the forward,
    fetches them again in the backward (unless ``keep_fetched``) and returns one gradient row
    per fetched row."""
    kv_row, grad_row = kv_row_bytes(k)
    again = 0 if keep_fetched else 1
    return {
        "bytes_sent": sent * kv_row, "bytes_received": received * kv_row,
        "bwd_bytes_sent": again * sent * kv_row + received * grad_row,
        "bwd_bytes_received": again * received * kv_row + sent * grad_row,
    }  # fmt: skip
