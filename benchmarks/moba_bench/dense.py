"""Dense causal baselines: cuDNN SDPA and FlashAttention-2 (SDPA's flash backend, or FA2 varlen
for packed batches), the math SDPA on CPU (--quick)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moba_dist.kernels.flash import flash_varlen_bwd, flash_varlen_fwd

__all__ = [
    "YARDSTICK",
    "dense_backends",
    "math_varlen_fns",
    "sdpa_call",
    "sdpa_fns",
    "triton_dense_fns",
    "varlen_dense_fns",
]

#: Our own dense causal Triton flash (``triton_dense.py``): timed beside the baselines, never
#: chosen as the run's dense.
YARDSTICK = "triton-dense"

_SDPA = {
    "dense-cudnn": SDPBackend.CUDNN_ATTENTION,
    "dense-fa2": SDPBackend.FLASH_ATTENTION,
    "dense-math": SDPBackend.MATH,
}


def dense_backends(device: torch.device) -> tuple[str, ...]:
    """Dense baselines timed on ``device``: the faster of them is the run's dense."""
    return ("dense-cudnn", "dense-fa2") if device.type == "cuda" else ("dense-math",)


def sdpa_call(name: str, q, k, v, causal: bool = True) -> torch.Tensor:
    """SDPA restricted to backend ``name`` on ``[B, H, S, D]`` inputs; GQA native where the
    backend takes ``enable_gqa``, else K/V heads repeated (same FLOPs, more memory traffic)."""
    gqa = q.shape[1] != k.shape[1]
    with sdpa_kernel([_SDPA[name]]):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        except RuntimeError:
            if not gqa:
                raise
            rep = q.shape[1] // k.shape[1]
            k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _batch_heads_major(b: int, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Packed ``[T, H, D]`` of ``b`` equal sequences -> contiguous ``[B, H, S, D]``."""
    return [x.view(b, -1, *x.shape[1:]).transpose(1, 2).contiguous() for x in xs]


def sdpa_fns(name: str, q, k, v, do, lens) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of dense causal SDPA on ``len(lens)`` equal sequences of
    packed ``[T, H, D]`` inputs."""
    qh, kh, vh, doh = _batch_heads_major(len(lens), q, k, v, do)
    lq, lk, lv = (x.detach().clone().requires_grad_() for x in (qh, kh, vh))

    def fwd():
        return sdpa_call(name, qh, kh, vh)

    def fwd_bwd():
        sdpa_call(name, lq, lk, lv).backward(doh)
        lq.grad = lk.grad = lv.grad = None

    return fwd, fwd_bwd


def triton_dense_fns(q, k, v, do, lens) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of the dense Triton yardstick on equal sequences."""
    from .triton_dense import dense_triton_fwd, dense_triton_fwd_bwd

    qh, kh, vh, doh = _batch_heads_major(len(lens), q, k, v, do)
    return (lambda: dense_triton_fwd(qh, kh, vh)), (lambda: dense_triton_fwd_bwd(qh, kh, vh, doh))


def varlen_dense_fns(q, k, v, do, cu: torch.Tensor, max_len: int) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of FA2 varlen causal attention over packed documents."""
    scale = q.shape[-1] ** -0.5

    def fwd():
        return flash_varlen_fwd(q, k, v, cu, cu, max_len, max_len, scale, causal=True)

    def fwd_bwd():
        out, lse = fwd()
        flash_varlen_bwd(do, q, k, v, out, lse, cu, cu, max_len, max_len, scale, causal=True)

    return fwd, fwd_bwd


def math_varlen_fns(q, k, v, do, lens) -> tuple[Callable, Callable]:
    """CPU stand-in for packed dense attention: math SDPA per document."""
    lq, lk, lv = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def run(a, b, c):
        outs, s = [], 0
        for t in lens:
            parts = (x[s : s + t].transpose(0, 1)[None] for x in (a, b, c))
            outs.append(sdpa_call("dense-math", *parts)[0].transpose(0, 1))
            s += t
        return torch.cat(outs)

    def fwd_bwd():
        run(lq, lk, lv).backward(do)
        lq.grad = lk.grad = lv.grad = None

    return (lambda: run(q, k, v)), fwd_bwd
