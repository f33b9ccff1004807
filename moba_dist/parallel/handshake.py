"""How CP ranks agree on configuration and shapes, or all raise.

Each rank validates its own inputs and describes its call by a fingerprint: a validity flag plus
every quantity that must match (:data:`FIELDS`). Once per batch, :meth:`CPContext.build` runs
:func:`agree_or_raise`, one all-gather of fingerprints. Per layer with a context, the fingerprint
rides on the need-table all-gather the plan makes anyway (``plan.route``) and
:func:`check_rows` compares it after the plan's one host read. A rank whose inputs are bad still
takes part, so the others learn about it and raise too instead of hanging in the next collective.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import torch

from moba_dist.config import BACKENDS, GATE_PRECISIONS
from moba_dist.parallel.comm import all_gather_rows, comm_device
from moba_dist.parallel.config import STRATEGIES, CPConfig
from moba_dist.parallel.layouts import LAYOUTS

__all__ = ["CONTEXT_FIELDS", "FIELDS", "agree_or_raise", "check_rows", "cu_hash", "fingerprint"]

FIELDS = (
    "valid", "world_size", "moba_chunk_size", "moba_topk", "layout", "strategy", "backend",
    "keep_fetched", "T", "nseq", "cu_seqlens_hash", "T_local", "Hq", "Hkv", "head_dim", "dtype",
    "softmax_scale", "gate_precision",
)  # fmt: skip

#: What the ranks agree on once per batch, in :meth:`CPContext.build`.
CONTEXT_FIELDS = (
    "valid", "world_size", "moba_chunk_size", "layout", "T", "nseq", "cu_seqlens_hash",
)  # fmt: skip

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cu_hash(cu: torch.Tensor) -> int:
    # Position-weighted sum modulo a large prime: equal offsets always agree; a differing offset
    # changes it except with negligible probability.
    w = torch.arange(1, cu.numel() + 1, dtype=torch.int64)
    return int((cu.to("cpu", torch.int64) * w).sum() % 2305843009213693951)


def fingerprint(
    q: torch.Tensor, k: torch.Tensor, ctx_row: tuple[int, int, int], world_size: int, cfg: CPConfig
) -> list[int]:
    """Integers describing this rank's call, in :data:`FIELDS` order; ``ctx_row`` is the
    context's ``[T, nseq, cu_seqlens_hash]`` (hashed once per batch, not per layer)."""
    scale_bits = struct.unpack("<q", struct.pack("<d", float(cfg.softmax_scale or 0.0)))[0]
    return [
        1, world_size, cfg.moba_chunk_size, cfg.moba_topk, LAYOUTS.index(cfg.layout),
        STRATEGIES.index(cfg.strategy), BACKENDS.index(cfg.backend), int(cfg.keep_fetched),
        *ctx_row, q.shape[0], q.shape[1], k.shape[1], q.shape[2], _DTYPES.index(q.dtype),
        scale_bits, GATE_PRECISIONS.index(cfg.gate_precision),
    ]  # fmt: skip


def check_rows(
    table: list[list[int]], fields: tuple[str, ...], rank: int, error: Exception | None
) -> None:
    """Raise on every rank unless every rank's fingerprint row of ``table`` is valid and equal;
    a rank whose own validation failed (``error``) raises that error."""
    if error is not None:
        raise error
    bad_ranks = [r for r, t in enumerate(table) if t[0] == 0]
    if bad_ranks:
        raise ValueError(
            f"MoBA CP: rank(s) {bad_ranks} of the process group got invalid inputs (see their "
            f"error); rank {rank} stops too instead of waiting for them"
        )
    diffs = [
        f"{name}: " + ", ".join(f"rank {r}={t[i]}" for r, t in enumerate(table))
        for i, name in enumerate(fields)
        if len({t[i] for t in table}) > 1
    ]
    if diffs:
        raise ValueError(
            "MoBA CP: ranks disagree on the configuration or shapes (every rank must pass the "
            "same cu_seqlens, chunk size, topk, layout, strategy, heads, dtype and an equal "
            "shard): " + "; ".join(diffs)
        )


def agree_or_raise(
    validate: Callable[[], list[int]], group: Any, rank: int, fields: tuple[str, ...] = FIELDS
) -> None:
    """Run ``validate`` (returns this rank's fingerprint in ``fields`` order or raises),
    all-gather the fingerprints, compare (:func:`check_rows`)."""
    error: Exception | None = None
    try:
        row = validate()
    except (TypeError, ValueError) as exc:
        error, row = exc, [0] * len(fields)
    table = all_gather_rows(torch.tensor(row, dtype=torch.int64, device=comm_device(group)), group)
    check_rows(table.cpu().tolist(), fields, rank, error)
