"""The per-batch context of context-parallel MoBA, shared by every layer of one batch.

Everything that depends only on ``cu_seqlens`` and the split (block layout, ownership of every
token, every rank's positions and per-block row ranges, runs of local queries, the local and
all-gather key sets) is computed once by :meth:`CPContext.build`, together with the one handshake
in which the ranks agree on the batch. Layers then pass the context instead of ``cu_seqlens``
and skip all of that: per layer, the plan reads the host once (``plan.route``).
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
from moba_dist.parallel.requests import keys_from_positions, query_runs
from moba_dist.parallel.stats import moba_density

__all__ = ["CPContext"]


def _check_cu(cu_seqlens: object) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = getattr(cu_seqlens, "dtype", type(cu_seqlens).__name__)
        raise TypeError(
            f"cu_seqlens must be an int32 tensor (the global packed offsets), got {got}"
        )
    return cu_seqlens


def check_batch(cu_seqlens: Any, moba_chunk_size: Any, layout: Any, world: int) -> list[int]:
    """Local checks of a batch; returns its ``[T, nseq, cu_seqlens_hash]`` (one host read)."""
    cu = _check_cu(cu_seqlens)
    check_positive_int("moba_chunk_size", moba_chunk_size)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    cpu = cu.cpu()
    check_layout(cpu, world_size=world, layout=layout)
    return [int(cpu[-1]), cpu.numel() - 1, cu_hash(cpu)]


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
        block_lo, block_hi: ``[P, N]`` rank r's local rows of block j are
            ``block_lo[r, j]:block_hi[r, j]``.
        local_keys: routed-key description of this rank's own K/V rows.
        local_block: global block id of every local token; run, run_last_pos: runs of local
            queries per block (``requests.query_runs``).
        remote_pos: global positions held by other ranks, ascending; remote_block their blocks;
            remote_keys: the key set of all of them (the all-gather strategy's).
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
    block_lo: torch.Tensor
    block_hi: torch.Tensor
    local_keys: RoutedKeys
    local_block: torch.Tensor
    run: torch.Tensor
    run_last_pos: torch.Tensor
    remote_pos: torch.Tensor
    remote_block: torch.Tensor
    remote_keys: RoutedKeys
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
        found: list[int] = []

        def validate() -> list[int]:
            found.extend(check_batch(cu_seqlens, moba_chunk_size, layout, world))
            return [1, world, moba_chunk_size, LAYOUTS.index(layout), *found]

        agree_or_raise(validate, group, rank, CONTEXT_FIELDS)
        return cls.assemble(cu_seqlens, moba_chunk_size, group, layout, tuple(found))

    @classmethod
    def assemble(
        cls, cu: torch.Tensor, moba_chunk_size: int, group: Any, layout: str, row: tuple
    ) -> CPContext:
        """The context of a batch the ranks already agreed on (no collective)."""
        rank, world = comm.group_rank_and_size(group)
        blocks = BlockLayout.build(cu, moba_chunk_size)
        own = build_ownership(cu, rank, world, layout, cu.device)
        starts = blocks.block_starts.expand(world, -1).contiguous()
        bounds = torch.searchsorted(own.all_positions, starts)
        local_block = blocks.token_block[own.positions]
        run, run_last_pos = query_runs(own.positions, local_block)
        remote_pos = (own.owner != rank).nonzero().squeeze(1)
        return cls(
            group=group, rank=rank, world=world, layout=layout,
            moba_chunk_size=moba_chunk_size, cu_seqlens=cu, blocks=blocks, own=own,
            block_lo=bounds[:, :-1], block_hi=bounds[:, 1:],
            local_keys=keys_from_positions(own.positions, blocks), local_block=local_block,
            run=run, run_last_pos=run_last_pos, remote_pos=remote_pos,
            remote_block=blocks.token_block[remote_pos],
            remote_keys=keys_from_positions(remote_pos, blocks), row=row,
        )  # fmt: skip

    def check_matches(self, *, group: Any, layout: str, moba_chunk_size: int) -> None:
        """Raise unless this context was built for this group, layout and chunk size."""
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
