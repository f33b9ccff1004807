"""The per-batch context of context-parallel MoBA, shared by every layer of one batch.

Everything that depends only on ``cu_seqlens`` and the split (block layout, ownership of every
token, this rank's positions, the local and all-gather key sets) is computed once by
:meth:`CPContext.build`, together with the one handshake in which the ranks agree on the batch.
Layers then pass the context instead of ``cu_seqlens`` and skip all of that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moba_dist.config import check_positive_int
from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.plan_types import RoutedKeys
from moba_dist.parallel import comm
from moba_dist.parallel.handshake import CONTEXT_FIELDS, agree_or_raise, cu_hash
from moba_dist.parallel.layouts import LAYOUTS, check_layout
from moba_dist.parallel.plan import Ownership, build_ownership
from moba_dist.parallel.requests import keys_from_positions
from moba_dist.parallel.stats import moba_density

__all__ = ["CPContext"]


def _check_cu(cu_seqlens: object) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = getattr(cu_seqlens, "dtype", type(cu_seqlens).__name__)
        raise TypeError(
            f"cu_seqlens must be an int32 tensor (the global packed offsets), got {got}"
        )
    return cu_seqlens


# eq=False: tensor fields make a field-wise == ambiguous; contexts compare by identity.
@dataclass(frozen=True, eq=False)
class CPContext:
    """What every CP layer of one batch shares. Build it with :meth:`build`, once per batch.

    Attributes:
        group, rank, world: the CP process group, this process's rank in it and its size.
        layout, moba_chunk_size: the split and block size the context was built for; a layer
            configured otherwise refuses the context.
        cu_seqlens: the global offsets (int32) on the device of the input ``cu_seqlens``.
        blocks: block layout of the packed batch; own: ownership of every token.
        local_keys: routed-key description of this rank's own K/V rows.
        remote_pos: global positions held by other ranks, ascending (the all-gather key set).
        local_block: global block id of every local token.
        row: ``[T, nseq, cu_seqlens_hash]``, the batch part of every layer's fingerprint.
    """

    group: Any
    rank: int
    world: int
    layout: str
    moba_chunk_size: int
    cu_seqlens: torch.Tensor
    blocks: BlockLayout
    own: Ownership
    local_keys: RoutedKeys
    remote_pos: torch.Tensor
    local_block: torch.Tensor
    row: tuple[int, int, int]
    _densities: dict[int, float] = field(default_factory=dict, repr=False)

    def density(self, moba_topk: int) -> float:
        """MoBA density of the batch for ``moba_topk`` (computed once per value: one sync)."""
        if moba_topk not in self._densities:
            self._densities[moba_topk] = moba_density(self.blocks, self.cu_seqlens, moba_topk)
        return self._densities[moba_topk]

    @property
    def num_tokens(self) -> int:
        """Global token count ``T``."""
        return self.row[0]

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @classmethod
    def build(
        cls,
        cu_seqlens: torch.Tensor,
        *,
        moba_chunk_size: int,
        process_group: Any = None,
        layout: str = "contiguous",
    ) -> CPContext:
        """Check ``cu_seqlens`` for ``layout``, agree with every rank of ``process_group`` on
        the batch (one all-gather; a rank with bad input makes all raise), and precompute.

        Raises:
            TypeError/ValueError on every rank when any rank's batch is invalid or the ranks
            disagree on cu_seqlens, chunk size or layout.
        """
        group = comm.resolve_group(process_group)
        rank, world = comm.group_rank_and_size(group)
        found: dict[str, Any] = {}

        def validate() -> list[int]:
            cu = _check_cu(cu_seqlens)
            check_positive_int("moba_chunk_size", moba_chunk_size)
            if layout not in LAYOUTS:
                raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
            cpu = cu.cpu()
            check_layout(cpu, world_size=world, layout=layout)
            found["row"] = (int(cpu[-1]), cpu.numel() - 1, cu_hash(cpu))
            return [1, world, moba_chunk_size, LAYOUTS.index(layout), *found["row"]]

        agree_or_raise(validate, group, rank, CONTEXT_FIELDS)
        cu = cu_seqlens
        blocks = BlockLayout.build(cu, moba_chunk_size)
        own = build_ownership(cu, rank, world, layout, cu.device)
        return cls(
            group=group, rank=rank, world=world, layout=layout,
            moba_chunk_size=moba_chunk_size, cu_seqlens=cu, blocks=blocks, own=own,
            local_keys=keys_from_positions(own.positions, blocks),
            remote_pos=(own.owner != rank).nonzero().squeeze(1),
            local_block=blocks.token_block[own.positions], row=found["row"],
        )  # fmt: skip

    def check_matches(self, *, process_group: Any, layout: str, moba_chunk_size: int) -> None:
        """Raise unless this context was built for this group, layout and chunk size."""
        group = comm.resolve_group(process_group)
        if group is not self.group:
            raise ValueError(
                "the CPContext was built for another process group than the layer's "
                "process_group; build it with CPContext.build(..., process_group=<the layer's>)"
            )
        if layout != self.layout:
            raise ValueError(
                f"the CPContext was built for layout={self.layout!r}, the layer uses "
                f"layout={layout!r}"
            )
        if moba_chunk_size != self.moba_chunk_size:
            raise ValueError(
                f"the CPContext was built for moba_chunk_size={self.moba_chunk_size}, the layer "
                f"uses moba_chunk_size={moba_chunk_size}"
            )
