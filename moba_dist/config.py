"""MoBAConfig: the frozen, validated description of one MoBA attention layer."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKENDS", "MoBAConfig"]

#: Local kernel backends behind one dispatch (see ``moba_dist.kernels.dispatch``).
BACKENDS = ("auto", "reference", "varlen", "triton")


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

    def __post_init__(self) -> None:
        check_positive_int("moba_chunk_size", self.moba_chunk_size)
        check_positive_int("moba_topk", self.moba_topk)
        check_scale(self.softmax_scale)
        check_backend(self.backend)

    def scale_for(self, head_dim: int) -> float:
        """The softmax scale to use for ``head_dim``."""
        return self.softmax_scale if self.softmax_scale is not None else head_dim**-0.5
