"""Block bookkeeping for packed sequences: where each MoBA block starts and which tokens it holds.

Blocks are numbered globally over the packed stream (sequence 0's blocks first), so a block id
alone identifies (sequence, block) everywhere: in the gate, in the kernels and across CP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BlockLayout", "segment_sums"]


@dataclass(frozen=True)
class BlockLayout:
    """Blocks of a packed batch. N = total number of blocks over all sequences.

    Built once per call from ``cu_seqlens`` with :meth:`build`; every tensor is on the device of
    ``cu_seqlens`` and int64.
    """

    block_starts: torch.Tensor
    """``[N + 1]`` token offset of each block's first token; the last entry is T."""
    block_seq_first: torch.Tensor
    """``[N]`` id of the first block of the block's sequence (candidates are ids in
    ``[block_seq_first[j], j)``)."""
    token_block: torch.Tensor
    """``[T]`` block id of every token."""
    block_size: int
    """B, the nominal block length."""

    @property
    def num_blocks(self) -> int:
        return self.block_seq_first.numel()

    @property
    def num_tokens(self) -> int:
        return self.token_block.numel()

    @staticmethod
    def build(cu_seqlens: torch.Tensor, block_size: int) -> BlockLayout:
        """Cut each sequence of ``cu_seqlens`` ``[nseq + 1]`` into blocks of ``block_size``."""
        cu = cu_seqlens.to(torch.int64)
        nseq = cu.numel() - 1
        seqlens = cu[1:] - cu[:-1]
        blocks_per_seq = (seqlens + block_size - 1) // block_size
        cu_blocks = torch.zeros(nseq + 1, dtype=torch.int64, device=cu.device)
        torch.cumsum(blocks_per_seq, 0, out=cu_blocks[1:])
        seq_of_block = torch.repeat_interleave(torch.arange(nseq, device=cu.device), blocks_per_seq)
        num_blocks = seq_of_block.numel()
        index_in_seq = torch.arange(num_blocks, device=cu.device) - cu_blocks[seq_of_block]
        starts = cu[seq_of_block] + index_in_seq * block_size
        block_starts = torch.cat([starts, cu[-1:]])
        lengths = block_starts[1:] - block_starts[:-1]
        token_block = torch.repeat_interleave(torch.arange(num_blocks, device=cu.device), lengths)
        return BlockLayout(
            block_starts=block_starts,
            block_seq_first=cu_blocks[seq_of_block],
            token_block=token_block,
            block_size=block_size,
        )


def segment_sums(
    x: torch.Tensor, segment: torch.Tensor, num_segments: int, max_len: int, acc_dtype: torch.dtype
) -> torch.Tensor:
    """Sum rows of ``x [T, ...]`` per segment id in ``acc_dtype``.

    ``segment [T]`` must be non-decreasing with runs of at most ``max_len`` rows (tokens of one
    block are contiguous). Rows are gathered into a padded ``[runs, max_len, ...]`` view and summed
    in a fixed order, so the result is deterministic on every device (``index_add_`` on CUDA is
    not) and never holds more than one chunk of ``x`` in ``acc_dtype`` at once.
    """
    out = torch.zeros((num_segments, *x.shape[1:]), dtype=acc_dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    ids, counts = torch.unique_consecutive(segment, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    row_elems = max(1, x[0].numel())
    chunk = max(1, (1 << 24) // (row_elems * max_len))
    offs = torch.arange(max_len, device=x.device)
    for c0 in range(0, ids.numel(), chunk):
        st, ct = starts[c0 : c0 + chunk], counts[c0 : c0 + chunk]
        idx = st[:, None] + offs  # [runs, max_len]
        valid = offs < ct[:, None]
        rows = x[idx.clamp_max(x.shape[0] - 1)].to(acc_dtype)
        rows = rows * valid.view(*valid.shape, *([1] * (x.dim() - 1)))
        out[ids[c0 : c0 + chunk]] = rows.sum(1)
    return out
