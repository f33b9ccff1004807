"""Backend choice and the routed-attention entry points every caller goes through.

``resolve_backend`` turns ``"auto"`` into the fastest backend that can run the given tensors and
raises a clear error when an explicitly requested one cannot. ``routed_forward`` /
``routed_backward`` run routed attention (see ``reference.py``) described by a
:class:`~moba_dist.kernels.plan_types.RoutedProblem` on the chosen backend; the single-device op
additionally has the aligned ``varlen`` path (``varlen.py``).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from moba_dist.kernels.flash import flash_available
from moba_dist.kernels.plan_types import (
    DEFAULT_BWD,
    DEFAULT_FWD,
    BwdConfig,
    FwdConfig,
    RoutedProblem,
)
from moba_dist.kernels.reference import reference_routed_bwd, reference_routed_fwd

__all__ = [
    "TRITON_MISSING",
    "backend_unavailable_reason",
    "resolve_backend",
    "routed_backward",
    "routed_forward",
    "triton_installed",
]

TRITON_MISSING = "triton is not installed; pip install triton"


@functools.cache
def triton_installed() -> bool:
    """True when ``import triton`` works. The probe imports triton itself: the kernel modules
    import it only lazily (they import each other), so importing them proves nothing."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def _triton_module():
    return importlib.import_module("moba_dist.kernels.triton_moba")


def backend_unavailable_reason(backend: str, q: torch.Tensor, routed: bool = False) -> str | None:
    """Why ``backend`` cannot run on tensors like ``q [.., H, D]`` (None when it can).

    ``routed=True`` asks for routed attention over an arbitrary key set (the CP op), which the
    aligned-only ``varlen`` path does not provide.
    """
    d = q.shape[-1]
    if backend == "reference":
        return None
    if backend == "varlen":
        if routed:
            return "the varlen backend serves the single-device op only (aligned q and k)"
        if not flash_available(q.device):
            return f"it needs a CUDA GPU (sm80+) with FlashAttention-2 kernels, got {q.device}"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"FlashAttention-2 takes float16/bfloat16, got {q.dtype}"
        if d % 8 != 0 or d > 256:
            return f"FlashAttention-2 takes head_dim a multiple of 8 up to 256, got {d}"
        return None
    if backend == "triton":
        if not triton_installed():
            return TRITON_MISSING
        return _triton_module().unavailable_reason(q)
    raise ValueError(f"backend must be one of auto, reference, varlen, triton; got {backend!r}")


def resolve_backend(backend: str, q: torch.Tensor, routed: bool = False) -> str:
    """Name of the backend to run: ``backend`` itself if it can run, the fastest one for
    ``"auto"``; an explicit backend that cannot run raises ``ValueError`` saying why (for a
    missing triton: "triton is not installed; pip install triton")."""
    if backend == "auto":
        # The Triton interpreter is a correctness tool, far too slow to pick on its own.
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        for name in ("triton", "varlen"):
            if name == "triton" and (interpreted or q.device.type != "cuda"):
                continue
            if backend_unavailable_reason(name, q, routed) is None:
                return name
        return "reference"
    reason = backend_unavailable_reason(backend, q, routed)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return backend


def routed_forward(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prob: RoutedProblem,
    config: FwdConfig = DEFAULT_FWD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed attention forward on ``backend`` ("reference" or "triton"): ``out [Tq, Hq, D]``
    in q's dtype, ``lse [Hq, Tq]`` float32, float64 for float64 inputs (-inf for queries without
    keys). ``config`` tunes the triton kernels only."""
    if backend == "triton":
        return _triton_module().routed_forward(q, k, v, prob, config)
    return reference_routed_fwd(q, k, v, prob)


def routed_backward(
    backend: str,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    prob: RoutedProblem,
    grad_dtype: torch.dtype | None = None,
    config: BwdConfig = DEFAULT_BWD,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed attention backward over this key set given the final ``out`` and ``lse``:
    ``dq [Tq, Hq, D]``, ``dk, dv [Tk, Hkv, D]`` in float32 (float64 for float64 inputs) unless
    ``grad_dtype`` asks for another dtype (the single-device op asks for q's dtype: at 1M tokens
    float32 gradients and their casts cost 18 GiB). CP callers keep float32 to add partials.
    ``dlse [Hq, Tq]``: gradient reaching lse, if any."""
    if backend == "triton":
        return _triton_module().routed_backward(
            dout, q, k, v, out, lse, prob, grad_dtype or torch.float32, config, dlse
        )
    grads = reference_routed_bwd(dout, q, k, v, out, lse, prob, dlse)
    return grads if grad_dtype is None else tuple(g.to(grad_dtype) for g in grads)
