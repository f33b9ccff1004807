"""CPConfig: the frozen, validated configuration of one context-parallel MoBA layer."""

from __future__ import annotations

from dataclasses import dataclass

from moba_dist.config import MoBAConfig, check_positive_int
from moba_dist.parallel.layouts import LAYOUTS

__all__ = ["STRATEGIES", "CPConfig"]

#: The one list of CP strategy names: ``"auto"`` (selective or allgather, per call) plus one
#: name per strategy object of ``moba_dist.parallel.strategies`` (``STRATEGY_TYPES`` and
#: ``WHOLE_CALL_TYPES`` there must hold exactly the others). New names go last: the per-layer
#: fingerprint carries a strategy's index.
STRATEGIES = ("auto", "selective", "allgather", "heads", "streamed")


@dataclass(frozen=True)
class CPConfig:
    """Everything that configures a context-parallel MoBA layer except its process group.

    ``moba_chunk_size``, ``moba_topk``, ``softmax_scale`` and ``backend`` mean what they mean in
    ``MoBAConfig``; ``layout`` is the sharding (``moba_dist.parallel.LAYOUTS``), ``strategy``
    one of :data:`STRATEGIES`, ``keep_fetched`` keeps fetched K/V for the backward instead of
    fetching it again; ``gate_precision`` as in ``MoBAConfig`` (every rank must use the same:
    it is part of the per-layer fingerprint); ``max_fetch_bytes`` bounds the fetched K/V that
    ``strategy="streamed"`` holds at once (None: ``streamed.default_max_fetch_bytes``, a share
    of free memory on CUDA, 1 GiB on CPU; ranks take the smallest). Validated once, here;
    ``dataclasses.replace`` validates the copy again.
    """

    moba_chunk_size: int
    moba_topk: int
    softmax_scale: float | None = None
    backend: str = "auto"
    layout: str = "contiguous"
    strategy: str = "auto"
    keep_fetched: bool = False
    gate_precision: str = "float32"
    max_fetch_bytes: int | None = None

    def __post_init__(self) -> None:
        # The fields one layer shares with MoBAConfig are validated there, with its messages.
        MoBAConfig(
            moba_chunk_size=self.moba_chunk_size, moba_topk=self.moba_topk,
            softmax_scale=self.softmax_scale, backend=self.backend,
            gate_precision=self.gate_precision,
        )  # fmt: skip
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not isinstance(self.keep_fetched, bool):
            raise TypeError(
                f"keep_fetched must be a bool, got {type(self.keep_fetched).__name__} "
                f"{self.keep_fetched!r}"
            )
        if self.max_fetch_bytes is not None:
            check_positive_int("max_fetch_bytes", self.max_fetch_bytes)
        if self.keep_fetched and self.strategy == "streamed":
            raise ValueError(
                "keep_fetched=True keeps every fetched row for the backward, which "
                "strategy='streamed' exists to avoid; use keep_fetched=False with it"
            )

    def scale_for(self, head_dim: int) -> float:
        """The softmax scale to use for ``head_dim``."""
        return self.softmax_scale if self.softmax_scale is not None else head_dim**-0.5
