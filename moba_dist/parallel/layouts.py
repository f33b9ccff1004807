"""How a packed token stream is split over context-parallel (CP) ranks.

Packed layout: tokens ``[T, ...]`` along a dimension ``dim``, sequence boundaries in
``cu_seqlens`` (integer, 1-D ``[nseq + 1]``, ``0 = cu[0] <= cu[1] <= ... <= cu[-1] = T``;
a repeated offset is an empty sequence).

Layouts (``P`` = world size):

- ``"contiguous"``: the packed stream is cut into ``P`` equal parts; rank ``r`` holds tokens
  ``[r*T/P, (r+1)*T/P)``. Needs ``T % P == 0``.
- ``"zigzag"`` (Megatron / TransformerEngine convention): every sequence is cut into ``2P`` equal
  chunks and rank ``r`` holds chunks ``r`` and ``2P-1-r`` of every sequence, in stream order
  (sequence 0 chunk r, sequence 0 chunk 2P-1-r, sequence 1 chunk r, ...). Needs every sequence
  length to be a multiple of ``2P``.

In both layouts every rank holds ``T/P`` tokens and its global positions are ascending.
Everything here is a pure function of ``cu_seqlens``; no process group is involved, so any rank
can compute any other rank's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LAYOUTS",
    "CPPadding",
    "check_layout",
    "local_positions",
    "pad_for_cp",
    "shard",
    "unshard",
]

LAYOUTS = ("contiguous", "zigzag")
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_cu_seqlens(cu_seqlens: torch.Tensor) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _INT_DTYPES:
        raise TypeError(f"cu_seqlens must have an integer dtype (int32), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "cu_seqlens must be 1-D [nseq + 1] with at least one sequence, "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {int(cu_seqlens[0])}")
    # A repeated offset is an empty sequence (padding-free collators emit them); it holds no
    # token and no block, so every layout and the CP op simply skip it.
    bad = torch.nonzero(cu_seqlens[1:] < cu_seqlens[:-1])
    if bad.numel() > 0:
        i = int(bad[0, 0])
        raise ValueError(
            "cu_seqlens must be non-decreasing (a repeated offset is an empty sequence), got "
            f"cu_seqlens[{i}] = {int(cu_seqlens[i])} > cu_seqlens[{i + 1}] = "
            f"{int(cu_seqlens[i + 1])}"
        )


def _check_world(world_size: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")


def _check_rank(rank: int, world_size: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")


def check_layout(cu_seqlens: torch.Tensor, *, world_size: int, layout: str) -> None:
    """Raise if the packed batch ``cu_seqlens [nseq + 1]`` cannot be split with ``layout``.

    ``"contiguous"`` needs ``T % world_size == 0``; ``"zigzag"`` needs every sequence length to be
    a multiple of ``2 * world_size``. :func:`pad_for_cp` plans padding that satisfies either.
    """
    _check_world(world_size, layout)
    _check_cu_seqlens(cu_seqlens)
    hint = f"pad with pad_for_cp(cu_seqlens, world_size={world_size}, layout={layout!r})"
    if layout == "contiguous":
        total = int(cu_seqlens[-1])
        if total % world_size != 0:
            raise ValueError(
                f"layout='contiguous' needs the total token count cu_seqlens[-1] to be a multiple "
                f"of world_size={world_size}, got {total}; {hint}"
            )
        return
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    bad = torch.nonzero(lens % (2 * world_size))
    if bad.numel() > 0:
        i = int(bad[0, 0])
        raise ValueError(
            f"layout='zigzag' needs every sequence length to be a multiple of "
            f"2 * world_size = {2 * world_size}, got sequence {i} of length {int(lens[i])} "
            f"({bad.numel()} of {lens.numel()} sequences break it); {hint}"
        )


def _segment_positions(
    starts: torch.Tensor, lengths: torch.Tensor, total: int | None = None
) -> torch.Tensor:
    """Concatenate the ranges ``[starts[i], starts[i] + lengths[i])`` -> LongTensor [sum(lengths)].

    Vectorised: token j of the output belongs to segment s(j) and equals
    ``j + (starts[s] - offset[s])``, where ``offset`` is the exclusive cumsum of ``lengths``.
    ``total``: ``sum(lengths)`` when the caller knows it on the host (saves a device sync).
    """
    starts, lengths = starts.long(), lengths.long()
    if total is None:
        total = int(lengths.sum())
    offsets = torch.cumsum(lengths, 0) - lengths
    shift = torch.repeat_interleave(starts - offsets, lengths, output_size=total)
    return torch.arange(total, device=starts.device) + shift


def _positions(cu_seqlens: torch.Tensor, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """Unchecked :func:`local_positions`."""
    if layout == "contiguous":
        n_local = int(cu_seqlens[-1]) // world_size
        return torch.arange(rank * n_local, (rank + 1) * n_local, device=cu_seqlens.device)
    seq_starts = cu_seqlens[:-1].long()
    chunk = (cu_seqlens[1:] - cu_seqlens[:-1]).long() // (2 * world_size)
    # Interleave (chunk r, chunk 2P-1-r) per sequence: that is stream order, hence ascending.
    starts = torch.stack(
        [seq_starts + rank * chunk, seq_starts + (2 * world_size - 1 - rank) * chunk], dim=1
    ).reshape(-1)
    return _segment_positions(starts, chunk.repeat_interleave(2))


def local_positions(
    cu_seqlens: torch.Tensor, *, rank: int, world_size: int, layout: str = "contiguous"
) -> torch.Tensor:
    """Global token indices held by ``rank``: LongTensor ``[T / world_size]``, ascending.

    The order is the order in which :func:`shard` returns the tokens. Lives on ``cu_seqlens``'
    device.
    """
    check_layout(cu_seqlens, world_size=world_size, layout=layout)
    _check_rank(rank, world_size)
    return _positions(cu_seqlens, rank, world_size, layout)


def _check_dim(x: torch.Tensor, dim: int, name: str) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [{-x.dim()}, {x.dim()}) for {name}, got dim={dim}")
    return dim % x.dim()


def shard(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    rank: int,
    world_size: int,
    layout: str = "contiguous",
    dim: int = 0,
) -> torch.Tensor:
    """This rank's tokens of the packed stream ``x [..., T, ...]`` (T along ``dim``).

    Returns ``[..., T / world_size, ...]``; a view (narrow) for ``"contiguous"``, a copy for
    ``"zigzag"``.
    """
    check_layout(cu_seqlens, world_size=world_size, layout=layout)
    _check_rank(rank, world_size)
    dim = _check_dim(x, dim, "x")
    total = int(cu_seqlens[-1])
    if x.shape[dim] != total:
        raise ValueError(
            f"x.shape[{dim}] must equal the token count cu_seqlens[-1] = {total}, "
            f"got x of shape {tuple(x.shape)}"
        )
    if layout == "contiguous":
        n_local = total // world_size
        return x.narrow(dim, rank * n_local, n_local)
    return x.index_select(dim, _positions(cu_seqlens, rank, world_size, layout).to(x.device))


def unshard(
    parts: Sequence[torch.Tensor],
    cu_seqlens: torch.Tensor,
    *,
    layout: str = "contiguous",
    dim: int = 0,
) -> torch.Tensor:
    """Inverse of :func:`shard`: ``parts[r]`` is rank r's shard ``[..., T / P, ...]`` with
    ``P = len(parts)``; returns the packed stream ``[..., T, ...]``. Differentiable.
    """
    if len(parts) == 0:
        raise ValueError("parts must hold one shard per rank, got an empty sequence")
    world_size = len(parts)
    check_layout(cu_seqlens, world_size=world_size, layout=layout)
    dim = _check_dim(parts[0], dim, "parts[0]")
    n_local = int(cu_seqlens[-1]) // world_size
    for r, part in enumerate(parts):
        if part.dim() != parts[0].dim() or part.shape[dim] != n_local:
            raise ValueError(
                f"parts[{r}] must have {n_local} tokens (cu_seqlens[-1] / world_size = "
                f"{int(cu_seqlens[-1])} / {world_size}) along dim {dim}, got shape "
                f"{tuple(part.shape)}"
            )
    stream = torch.cat(list(parts), dim=dim)
    if layout == "contiguous":
        return stream
    # stream[i] holds global token perm[i]; gathering with the inverse permutation restores order.
    perm = torch.cat([_positions(cu_seqlens, r, world_size, layout) for r in range(world_size)])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return stream.index_select(dim, inverse.to(stream.device))


# eq=False: tensor fields make a field-wise == ambiguous; plans compare by identity.
@dataclass(frozen=True, eq=False)
class CPPadding:
    """Padding plan from :func:`pad_for_cp`.

    Attributes:
        cu_seqlens: padded boundaries, int32 ``[nseq_padded + 1]``, on the input's device.
        real_index: LongTensor ``[num_real_tokens]``, ascending: where the real tokens sit
            inside the padded stream.
        num_real_tokens: ``T_real``, the token count before padding.
        num_padded_tokens: ``T_padded``, the token count of the padded stream (real + padding).
        world_size, layout: the split this plan was made for (used by :meth:`local_real_index`).
    """

    cu_seqlens: torch.Tensor
    real_index: torch.Tensor
    num_real_tokens: int
    num_padded_tokens: int
    world_size: int
    layout: str

    @property
    def num_padding(self) -> int:
        """Number of padding tokens added (``num_padded_tokens - num_real_tokens``)."""
        return self.num_padded_tokens - self.num_real_tokens

    def pad(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Real tokens ``[..., T_real, ...]`` -> padded stream ``[..., T_padded, ...]``.

        Padding positions are zeros; gradients reach ``x`` only from the real positions.
        """
        dim = _check_dim(x, dim, "x")
        if x.shape[dim] != self.num_real_tokens:
            raise ValueError(
                f"x.shape[{dim}] must equal num_real_tokens = {self.num_real_tokens}, "
                f"got x of shape {tuple(x.shape)}"
            )
        if self.num_padding == 0:
            return x
        shape = list(x.shape)
        shape[dim] = self.num_padded_tokens
        # Out-of-place index_copy: autograd sends grad_out[real_index] to x, nothing else.
        return x.new_zeros(shape).index_copy(dim, self.real_index.to(x.device), x)

    def unpad(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Padded stream ``[..., T_padded, ...]`` -> real tokens ``[..., T_real, ...]``."""
        dim = _check_dim(x, dim, "x")
        if x.shape[dim] != self.num_padded_tokens:
            raise ValueError(
                f"x.shape[{dim}] must equal num_padded_tokens = {self.num_padded_tokens}, "
                f"got x of shape {tuple(x.shape)}"
            )
        return x.index_select(dim, self.real_index.to(x.device))

    def local_real_index(self, rank: int) -> torch.Tensor:
        """Positions inside ``rank``'s shard of the padded stream that hold real tokens.

        LongTensor ``[n]``, ascending, so ``y_local.index_select(0, plan.local_real_index(rank))``
        drops the padding from a rank's output ``y_local [T_padded / world_size, ...]``.
        """
        _check_rank(rank, self.world_size)
        is_real = torch.zeros(
            self.num_padded_tokens, dtype=torch.bool, device=self.real_index.device
        )
        is_real[self.real_index] = True
        held = _positions(self.cu_seqlens, rank, self.world_size, self.layout)
        return torch.nonzero(is_real[held.to(is_real.device)]).squeeze(1)


def pad_for_cp(
    cu_seqlens: torch.Tensor, *, world_size: int, layout: str = "contiguous"
) -> CPPadding:
    """Plan the padding that makes ``cu_seqlens [nseq + 1]`` satisfy ``layout`` for ``world_size``.

    - ``"contiguous"``: append one dummy sequence of ``(-T) % world_size`` tokens at the end
      (none if ``T`` already divides). Real sequences keep their lengths and start offsets.
    - ``"zigzag"``: extend every sequence whose length is not a multiple of ``2 * world_size``
      at its end, up to the next multiple.

    Why tail padding is exact for MoBA: blocks start at each sequence's first token, so tokens
    appended after a sequence's last real token move no block boundary of the real tokens. Real
    queries never attend to later tokens (causal), so they never see the padded keys. Padded keys
    can join only the sequence's last block, whose centroid is consulted only by queries in later
    blocks, and those are all padding. Padded outputs are dropped (:meth:`CPPadding.unpad`), so
    they send no gradient back into real tokens.
    """
    _check_world(world_size, layout)
    _check_cu_seqlens(cu_seqlens)
    device = cu_seqlens.device
    cu = cu_seqlens.long()
    total = int(cu[-1])
    if layout == "contiguous":
        extra = (-total) % world_size
        padded = torch.cat([cu, cu[-1:] + extra]) if extra else cu
        real_index = torch.arange(total, device=device)
    else:
        lens = cu[1:] - cu[:-1]
        mult = 2 * world_size
        padded_lens = (lens + mult - 1) // mult * mult
        padded = torch.cat([cu[:1], torch.cumsum(padded_lens, 0)])
        real_index = _segment_positions(padded[:-1], lens)
    return CPPadding(
        cu_seqlens=padded.to(torch.int32),
        real_index=real_index,
        num_real_tokens=total,
        num_padded_tokens=int(padded[-1]),
        world_size=world_size,
        layout=layout,
    )
