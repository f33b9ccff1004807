"""Context parallelism for MoBA: sharding layouts, communication, and the CP op."""

from moba_dist.parallel.config import CPConfig
from moba_dist.parallel.context import CPContext
from moba_dist.parallel.cp import moba_cp_attn_varlen
from moba_dist.parallel.layouts import (
    LAYOUTS,
    CPPadding,
    check_layout,
    local_positions,
    pad_for_cp,
    shard,
    unshard,
)

__all__ = [
    "LAYOUTS",
    "CPConfig",
    "CPContext",
    "CPPadding",
    "check_layout",
    "local_positions",
    "moba_cp_attn_varlen",
    "pad_for_cp",
    "shard",
    "unshard",
]
