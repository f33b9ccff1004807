"""Input validation shared by the public ops: every bad input fails here, never in a kernel.

Each message names the argument, what was expected and what was given.
"""

from __future__ import annotations

import itertools

import torch

__all__ = [
    "check_attention_inputs",
    "check_batched_layout",
    "check_cu_seqlens",
    "check_cu_seqlens_meta",
    "check_max_seqlen",
    "check_max_seqlen_type",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, x: object, ndim: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    return x


def check_attention_inputs(
    q: object, k: object, v: object, layout: str = "[T, H, D]"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check q/k/v ranks, shapes, GQA head ratio, dtypes and devices.

    ``layout`` is ``"[T, H, D]"`` (packed) or ``"[B, S, H, D]"`` (batched); all dims but the
    head count must agree between q and k/v, and k and v must match exactly.
    """
    ndim = layout.count(",") + 1
    q = _check_tensor("q", q, ndim, layout)
    k = _check_tensor("k", k, ndim, layout)
    v = _check_tensor("v", v, ndim, layout)
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[:-2] != k.shape[:-2]:
        dims = layout[1:-1].rsplit(",", 2)[0]
        raise ValueError(
            f"q and k must agree on [{dims}], got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head_dim of q ({q.shape[-1]}) and k/v ({k.shape[-1]}) must match")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hq == 0 or hkv == 0 or q.shape[-1] == 0:
        raise ValueError(
            f"heads and head_dim must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if hq % hkv != 0:
        raise ValueError(
            f"query heads must be a multiple of KV heads (GQA), got Hq={hq}, Hkv={hkv}"
        )
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    return q, k, v


def check_batched_layout(
    q: object, k: object, v: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`check_attention_inputs` for ``[B, S, H, D]``, first catching what reveals a
    ``[B, H, S, D]`` (SDPA-layout) input: q and k agreeing on dim 2 but not on dim 1 is exactly
    what equal sequence lengths with different head counts look like in that layout."""
    if all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k)):
        qs, ks = q.shape, k.shape  # type: ignore[union-attr]
        if qs[0] == ks[0] and qs[1] != ks[1] and qs[2] == ks[2] and qs[1] % ks[1] == 0:
            raise ValueError(
                "moba_attn_func takes [B, S, H, D] (sequence before heads); q "
                f"{tuple(qs)} and k {tuple(ks)} differ on dim 1 only, which looks like "
                "[B, H, S, D]: pass q.transpose(1, 2) etc., or use moba_attn_varlen"
            )
    return check_attention_inputs(q, k, v, "[B, S, H, D]")


def check_cu_seqlens_meta(cu_seqlens: object, device: torch.device) -> torch.Tensor:
    """The checks of ``cu_seqlens`` that need no device read: type, int32, 1-D with >= 2
    entries, on q's device (the values are checked by :func:`check_cu_seqlens`)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (as flash-attn expects), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D [nseq + 1] with nseq >= 1, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on q's device {device}, got {cu_seqlens.device}")
    return cu_seqlens


def check_cu_seqlens(cu_seqlens: object, total: int, device: torch.device) -> list[int]:
    """Check ``cu_seqlens`` (1-D int32, 0 = cu[0] <= ... <= cu[-1] = T; a repeated offset is an
    empty sequence); return it as host ints (one device-to-host read)."""
    cu = check_cu_seqlens_meta(cu_seqlens, device).tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    bad = next((i for i in range(1, len(cu)) if cu[i] < cu[i - 1]), None)
    if bad is not None:
        raise ValueError(
            "cu_seqlens must be non-decreasing (repeated offsets, empty sequences, are allowed), "
            f"got cu_seqlens[{bad - 1}] = {cu[bad - 1]} > cu_seqlens[{bad}] = {cu[bad]}"
        )
    if cu[-1] != total:
        raise ValueError(
            f"cu_seqlens must end at the number of tokens T = {total}, "
            f"got cu_seqlens[-1] = {cu[-1]}"
        )
    return cu


def check_max_seqlen_type(max_seqlen: object) -> int:
    """``max_seqlen`` must be an int (its bound is checked against the offsets later)."""
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(
            f"max_seqlen must be an int, got {type(max_seqlen).__name__} {max_seqlen!r}"
        )
    return max_seqlen


def check_max_seqlen(max_seqlen: object, cu: list[int]) -> int:
    """``max_seqlen`` must be an int >= the longest sequence of ``cu``."""
    longest = max(b - a for a, b in itertools.pairwise(cu))
    check_max_seqlen_type(max_seqlen)
    if max_seqlen < longest:  # type: ignore[operator]
        raise ValueError(
            f"max_seqlen must be >= the longest sequence ({longest}), got {max_seqlen}"
        )
    return max_seqlen  # type: ignore[return-value]
