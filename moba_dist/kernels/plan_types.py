"""Shared types of the routed kernels: the routed problem, the entry plan, the launch configs.

This module imports nothing but torch, so the dispatcher can describe a problem and probe for
triton without importing any Triton kernel module (those import each other and triton itself).

"Routed" attention is the one primitive every backend implements (see ``reference.py``): queries
carry their global token positions, keys carry theirs, and ``sel [Tq, Hq, K]`` names the global
blocks each (query, head) attends to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "DEFAULT_BWD",
    "DEFAULT_FWD",
    "BwdConfig",
    "EntryPlan",
    "FwdConfig",
    "RoutedKeys",
    "RoutedProblem",
    "TileConfig",
]


@dataclass(frozen=True)
class RoutedKeys:
    """Where each global block's rows sit in a key set ``k [Tk, Hkv, D]``.

    ``block_rows [N + 1]`` (int64): rows of block j are ``block_rows[j]:block_rows[j + 1]`` (empty
    when the key set holds none of block j). ``k_pos [Tk]`` (int64): global token position of
    every key row, ascending.
    """

    block_rows: torch.Tensor
    k_pos: torch.Tensor


@dataclass(frozen=True)
class RoutedProblem:
    """Everything but the tensors q, k, v (and dout, out, lse) that a routed launcher needs.

    ``q_pos [Tq]``: global position of every query row; ``keys``: the key set's block rows and
    positions; ``sel [Tq, Hq, K]`` int32: the routing; ``softmax_scale``: scale of ``q . k``.
    ``max_block_rows``: an upper bound on any block's row count in this key set (the block size
    B); None lets the triton backward find it with one host sync.
    """

    q_pos: torch.Tensor
    keys: RoutedKeys
    sel: torch.Tensor
    softmax_scale: float
    max_block_rows: int | None = None

    @property
    def num_blocks(self) -> int:
        return self.keys.block_rows.numel() - 1


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of one kernel: tile sizes, warps, software-pipelining depth."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TileConfig.{name} must be an int >= 1, got {value!r}")


# The interpreter runs numpy per op: moderate tiles keep tests fast while still giving groups
# several query tiles and blocks several key tiles.
INTERPRET_TILE = TileConfig(16, 16, 1, 1)
_FALLBACK_TILE = TileConfig(64, 64, 4, 2)


def _pick(table: dict[int, TileConfig], q: torch.Tensor) -> TileConfig:
    if q.device.type == "cpu":
        return INTERPRET_TILE
    return table.get(q.shape[-1], _FALLBACK_TILE)


def _check_table(name: str, table: dict[int, TileConfig]) -> None:
    if not all(isinstance(c, TileConfig) for c in table.values()):
        raise TypeError(f"{name} must map head_dim -> TileConfig, got {table!r}")


@dataclass(frozen=True)
class FwdConfig:
    """Knobs of the triton forward, passed as an argument (never patched into a module).

    ``tiles``: launch shape per head dim (H200 defaults from ``benchmarks/kernel_sweep.py``,
    results in ``benchmarks/results/nvidia-h200/kernel_sweep/``).
    ``partial_dtype``: storage of the per-entry partial outputs (lse partials and the merge stay
    float32); None means q's dtype for 16-bit inputs (halves the partial traffic for one extra
    rounding of each partial: device-checked within the bf16 error budget, NOTES_triton.md),
    float32 for float32 inputs. ``chunk_elems``: elements of one chunk's partial buffer (2 GiB
    transient in bf16; fewer chunks mean fewer launches and host syncs: 8% faster forward at
    H32 32K than 2^28 on the H200, kernel_sweep round 4).
    """

    tiles: dict[int, TileConfig] = field(
        default_factory=lambda: {
            64: TileConfig(128, 64, 4, 3),
            96: TileConfig(128, 64, 8, 3),
            128: TileConfig(128, 128, 8, 3),
            256: TileConfig(128, 32, 8, 2),
        }
    )
    partial_dtype: torch.dtype | None = None
    chunk_elems: int = 1 << 30

    def __post_init__(self) -> None:
        _check_table("FwdConfig.tiles", self.tiles)
        if self.partial_dtype not in (None, torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(
                f"partial_dtype must be None, float16, bfloat16 or float32, "
                f"got {self.partial_dtype}"
            )
        if not isinstance(self.chunk_elems, int) or self.chunk_elems < 1:
            raise ValueError(f"chunk_elems must be an int >= 1, got {self.chunk_elems!r}")

    def tile(self, q: torch.Tensor) -> TileConfig:
        """Launch shape for ``q [T, H, D]``: the interpreter shape on CPU, else by head dim."""
        return _pick(self.tiles, q)

    def partial(self, q: torch.Tensor) -> torch.dtype:
        if self.partial_dtype is not None:
            return self.partial_dtype
        return q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32


@dataclass(frozen=True)
class BwdConfig:
    """Knobs of the triton backward. ``dkdv`` / ``dq``: launch shapes per head dim (H200
    defaults from the same sweep as ``FwdConfig``). ``slab_elems``: gathered q + dout elements of
    one dK/dV slab (2 GiB in bf16). ``chunk_elems``: float32 elements of one chunk's per-entry
    dQ partial buffer (4 GiB). Both transient; 2^30 over 2^28 saves 3-6% of the backward at
    block 4096 and 10-13% at block 512 (kernel_sweep round 4); lower them where memory is tight.
    ``dkdv_skip``: each dK/dV program skips the leading query tiles that cannot see its keys
    (bitwise the same gradients)."""

    dkdv: dict[int, TileConfig] = field(
        default_factory=lambda: {
            64: TileConfig(64, 64, 4, 3),
            96: TileConfig(64, 64, 4, 3),
            128: TileConfig(64, 64, 4, 2),
            256: TileConfig(64, 32, 4, 2),
        }
    )
    dq: dict[int, TileConfig] = field(
        default_factory=lambda: {
            64: TileConfig(128, 64, 4, 3),
            96: TileConfig(128, 64, 8, 3),
            128: TileConfig(64, 32, 4, 3),
            256: TileConfig(128, 32, 8, 2),
        }
    )
    slab_elems: int = 1 << 30
    chunk_elems: int = 1 << 30
    dkdv_skip: bool = True

    def __post_init__(self) -> None:
        _check_table("BwdConfig.dkdv", self.dkdv)
        _check_table("BwdConfig.dq", self.dq)
        for name in ("slab_elems", "chunk_elems"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BwdConfig.{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.dkdv_skip, bool):
            raise TypeError(f"BwdConfig.dkdv_skip must be a bool, got {self.dkdv_skip!r}")

    def dkdv_tile(self, q: torch.Tensor) -> TileConfig:
        return _pick(self.dkdv, q)

    def dq_tile(self, q: torch.Tensor) -> TileConfig:
        return _pick(self.dq, q)


DEFAULT_FWD = FwdConfig()
DEFAULT_BWD = BwdConfig()


@dataclass(frozen=True)
class EntryPlan:
    """Valid selections sorted by (group, entry), G = N * Hkv groups.

    ``comp [E]`` int64: sorted keys ``group * E + e`` (E = Tq * Hq * K entries; invalid slots
    carry the sentinel group G and sort last). Kernels recover ``e = comp % E``; range searches
    per token chunk run on ``comp`` directly, so no second ``[E]`` array is kept (768 MB at 1M
    tokens x 8 heads x K = 12). ``group_off [G + 1]`` int64: group g is
    ``comp[group_off[g]:group_off[g + 1]]``.
    """

    comp: torch.Tensor
    group_off: torch.Tensor
    num_groups: int
    topk: int
    hq: int
    hkv: int

    @property
    def num_entries(self) -> int:
        return self.comp.numel()
