"""MoBAConfig: the frozen, validated description of one MoBA attention layer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BACKENDS",
    "GATE_PRECISIONS",
    "HEAD_DIMS",
    "MoBAConfig",
    "check_gate_precision",
    "check_head_dim",
]

#: Local kernel backends behind one dispatch (see ``moba_dist.kernels.dispatch``).
BACKENDS = ("auto", "reference", "varlen", "triton")

#: Score precisions of the CUDA gate (docs/routing.md): ``"float32"`` (the default and the
#: routing contract: float32-quality scores) and the opt-ins ``"bf16x2"`` and ``"bf16"``.
GATE_PRECISIONS = ("float32", "bf16x2", "bf16")

#: Head dims the fused kernels take (Llama 128, Phi 96, Gemma 256, small models 64).
HEAD_DIMS = (64, 96, 128, 256)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int >= 1, else raise a message naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_scale(softmax_scale: object) -> float | None:
    """Validate an optional softmax scale (None means ``head_dim ** -0.5``)."""
    if softmax_scale is None:
        return None
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, int | float):
        raise TypeError(
            f"softmax_scale must be a positive float or None, got "
            f"{type(softmax_scale).__name__} {softmax_scale!r}"
        )
    if not softmax_scale > 0 or softmax_scale == float("inf"):
        raise ValueError(f"softmax_scale must be a finite float > 0, got {softmax_scale!r}")
    return float(softmax_scale)


def check_backend(backend: object) -> str:
    """Validate a backend name against :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def check_gate_precision(value: object, name: str = "gate_precision") -> str:
    """Validate a gate score precision against :data:`GATE_PRECISIONS` (``name``: the argument
    named in the message)."""
    if not isinstance(value, str) or value not in GATE_PRECISIONS:
        raise ValueError(f"{name} must be one of {GATE_PRECISIONS}, got {value!r}")
    return value


def check_head_dim(head_dim: object, what: str = "head_dim") -> int:
    """Validate a head dim against :data:`HEAD_DIMS` (``what`` names it in the message)."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim not in HEAD_DIMS:
        raise ValueError(f"{what} must be one of {HEAD_DIMS}, got {head_dim!r}")
    return head_dim


@dataclass(frozen=True)
class MoBAConfig:
    """Hyper-parameters of one MoBA attention layer (arXiv 2502.13189).

    Keyword names follow the public MoBA code (``moba_chunk_size``, ``moba_topk``) so configs
    written for it read the same here.
    """

    moba_chunk_size: int
    """Block size B in tokens. Blocks restart at every sequence start; only a sequence's last
    block may be shorter."""

    moba_topk: int
    """Blocks each query attends to, its own block included: the own block (causally) plus the
    top ``moba_topk - 1`` strictly-past blocks of its sequence by gate score. ``1`` means the own
    block only; a value >= the number of blocks gives exact causal attention."""

    softmax_scale: float | None = None
    """Scale applied to ``q . k`` before the softmax; ``None`` means ``head_dim ** -0.5``. The gate
    scores are never scaled (scaling does not change a top-k)."""

    backend: str = "auto"
    """Local kernel: ``"reference"`` (pure torch, any device), ``"varlen"`` (FlashAttention-2
    varlen kernels, CUDA), ``"triton"`` (fused kernels), or ``"auto"`` (fastest available)."""

    gate_precision: str = "float32"
    """Score precision of the CUDA gate, one of :data:`GATE_PRECISIONS`. ``"float32"`` (default)
    keeps the routing contract: outside near-ties the selection is a float64 gate's. The opt-ins
    ``"bf16x2"`` (two bf16 centroid pieces) and ``"bf16"`` (one bf16 dot) are faster and may
    change choices where the (K-1)-th and K-th best scores are closer than ``4e-5`` resp.
    ``1e-2`` times ``|q| * max|centroid|`` (measured agreement in docs/routing.md). The pure-torch
    gate (CPU, float64, head dims the fused gate does not take) always scores exactly and
    ignores it."""

    def __post_init__(self) -> None:
        check_positive_int("moba_chunk_size", self.moba_chunk_size)
        check_positive_int("moba_topk", self.moba_topk)
        check_scale(self.softmax_scale)
        check_backend(self.backend)
        check_gate_precision(self.gate_precision)

    def scale_for(self, head_dim: int) -> float:
        """The softmax scale to use for ``head_dim``."""
        return self.softmax_scale if self.softmax_scale is not None else head_dim**-0.5
