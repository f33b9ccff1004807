"""Single-device MoBA kernels on packed ``[T, H, D]`` tensors. Never imports torch.distributed."""

from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.dispatch import resolve_backend, routed_backward, routed_forward
from moba_dist.kernels.gate import block_centroids, select_blocks
from moba_dist.kernels.plan_types import BwdConfig, FwdConfig, RoutedKeys, RoutedProblem, TileConfig

__all__ = [
    "BlockLayout",
    "BwdConfig",
    "FwdConfig",
    "RoutedKeys",
    "RoutedProblem",
    "TileConfig",
    "block_centroids",
    "resolve_backend",
    "routed_backward",
    "routed_forward",
    "select_blocks",
]
