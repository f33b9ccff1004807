"""FlashAttention-2 varlen forward/backward, whichever implementation this machine has.

Order of preference: the ``flash-attn`` package (untested here: it cannot be built on our
machines), then PyTorch's built-in FA2 kernels ``aten._flash_attention_forward/backward`` (checked
on an H100 with torch 2.11: varlen lse is ``[H, total_q]`` float32, fewer KV heads than query heads
work forward and backward, empty query segments are allowed, causal masks align bottom-right).
Both are raw launchers without autograd; the MoBA autograd functions call them.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["flash_available", "flash_varlen_bwd", "flash_varlen_fwd"]


@functools.cache
def _flash_attn_module():
    try:
        from flash_attn import flash_attn_interface
    except ImportError:
        return None
    return flash_attn_interface


def flash_available(device: torch.device) -> bool:
    """True when an FA2 varlen kernel can run on ``device`` (CUDA, sm80+)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if _flash_attn_module() is not None:
        return True
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8 and hasattr(torch.ops.aten, "_flash_attention_forward")


def flash_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]``, int32 offsets -> ``out [Tq, Hq, D]``,
    ``lse [Hq, Tq]`` float32."""
    fa = _flash_attn_module()
    if fa is not None:
        res = fa._flash_attn_varlen_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, softmax_scale, causal=causal
        )
        return res[0], res[1]
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=softmax_scale
    )
    return out, lse


def flash_varlen_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``dq, dk, dv`` (inputs' dtype) given the final ``out`` and ``lse [Hq, Tq]``."""
    fa = _flash_attn_module()
    if fa is not None:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fa._flash_attn_varlen_backward(
            dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, 0.0, softmax_scale,
            causal, (-1, -1), 0.0, None, False, None,
        )  # fmt: skip
        return dq, dk, dv
    # Dropout is off, so the RNG state arguments are never read: empty tensors suffice.
    no_rng = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, no_rng, no_rng,
        scale=softmax_scale,
    )  # fmt: skip
    return dq, dk, dv
