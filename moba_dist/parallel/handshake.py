"""The first collective of every CP call: ranks agree on configuration and shapes, or all raise.

Each rank validates its own inputs, then all ranks all-gather a small fingerprint (a validity
flag plus every quantity that must match). A rank whose inputs are bad still takes part, so the
others learn about it and raise too instead of hanging in the next collective.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import torch
import torch.distributed as dist

from moba_dist.config import BACKENDS
from moba_dist.parallel.comm import all_gather_rows, comm_device
from moba_dist.parallel.layouts import LAYOUTS

__all__ = ["CONTEXT_FIELDS", "FIELDS", "STRATEGIES", "agree_or_raise", "cu_hash"]

FIELDS = (
    "valid", "world_size", "moba_chunk_size", "moba_topk", "layout", "strategy", "backend",
    "keep_fetched", "T", "nseq", "cu_seqlens_hash", "T_local", "Hq", "Hkv", "head_dim", "dtype",
    "softmax_scale",
)  # fmt: skip

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The one list of CP strategy names (``cp.STRATEGIES`` re-exports it).
STRATEGIES = ("auto", "selective", "allgather")
_NAMES = {"layout": LAYOUTS, "strategy": STRATEGIES, "backend": BACKENDS}


#: What the ranks agree on once per batch, in :meth:`CPContext.build`.
CONTEXT_FIELDS = (
    "valid", "world_size", "moba_chunk_size", "layout", "T", "nseq", "cu_seqlens_hash",
)  # fmt: skip


def cu_hash(cu: torch.Tensor) -> int:
    # Position-weighted sum modulo a large prime: equal offsets always agree; a differing offset
    # changes it except with negligible probability.
    w = torch.arange(1, cu.numel() + 1, dtype=torch.int64)
    return int((cu.to("cpu", torch.int64) * w).sum() % 2305843009213693951)


def fingerprint(
    q: torch.Tensor, k: torch.Tensor, ctx_row: list[int], world_size: int, cfg: dict
) -> list[int]:
    """Integers describing this rank's call, in :data:`FIELDS` order; ``ctx_row`` is the
    context's ``[T, nseq, cu_seqlens_hash]`` (hashed once per batch, not per layer)."""
    scale_bits = struct.unpack("<q", struct.pack("<d", float(cfg["softmax_scale"] or 0.0)))[0]
    return [
        1, world_size, cfg["moba_chunk_size"], cfg["moba_topk"],
        _NAMES["layout"].index(cfg["layout"]), _NAMES["strategy"].index(cfg["strategy"]),
        _NAMES["backend"].index(cfg["backend"]), int(cfg["keep_fetched"]), *ctx_row,
        q.shape[0], q.shape[1], k.shape[1], q.shape[2],
        _DTYPES.index(q.dtype), scale_bits,
    ]  # fmt: skip


def agree_or_raise(
    validate: Callable[[], list[int]],
    group: dist.ProcessGroup,
    rank: int,
    fields: tuple[str, ...] = FIELDS,
) -> None:
    """Run ``validate`` (returns this rank's fingerprint in ``fields`` order or raises),
    exchange, compare."""
    error: Exception | None = None
    try:
        row = validate()
    except (TypeError, ValueError) as exc:
        error, row = exc, [0] * len(fields)
    table = all_gather_rows(torch.tensor(row, dtype=torch.int64, device=comm_device(group)), group)
    table = table.cpu().tolist()
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
