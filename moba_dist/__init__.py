"""moba_dist: MoBA (Mixture of Block Attention) with context parallelism."""

from moba_dist.config import MoBAConfig
from moba_dist.ops import moba_attn_func, moba_attn_varlen
from moba_dist.parallel.cp import MoBAContextParallel

__version__ = "0.1.0"

__all__ = [
    "MoBAConfig",
    "MoBAContextParallel",
    "__version__",
    "moba_attn_func",
    "moba_attn_varlen",
]
