"""Single-device MoBA kernels on packed ``[T, H, D]`` tensors. Never imports torch.distributed."""

from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.dispatch import resolve_backend, routed_bwd, routed_fwd
from moba_dist.kernels.gate import block_centroids, select_blocks
from moba_dist.kernels.reference import RoutedKeys

__all__ = [
    "BlockLayout",
    "RoutedKeys",
    "block_centroids",
    "resolve_backend",
    "routed_bwd",
    "routed_fwd",
    "select_blocks",
]
