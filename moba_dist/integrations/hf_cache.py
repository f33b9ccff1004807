"""MoBACache: a transformers ``DynamicCache`` that keeps MoBA block key sums next to the keys.

Cached MoBA decoding scores every new query against the centroids of the complete past blocks.
Recomputing them would rescan the whole cache at every step; instead each :class:`MoBALayer`
keeps ``sums [Bt, Hkv, blocks, D]`` (float32, float64 for float64 keys) of every complete block
of every row and adds a block's sum once, when its last key is appended (amortised O(D) work per
token). The sums follow the cache through ``reorder_cache`` (beam search), ``batch_select_indices``,
``batch_repeat_interleave``, ``crop`` (assisted decoding) and ``reset``.

Keys and values live in preallocated buffers ``[Bt, Hkv, capacity, D]`` (capacity doubling, or
``max_cache_len`` up front): ``layer.keys`` is a view of the first L slots, so appending a token
writes one slot instead of concatenating the whole cache. Whatever replaces ``layer.keys`` by a
new tensor (``reorder_cache``, ``batch_select_indices``, ...) is re-seated into a fresh buffer on
the next append.

A layer learns the block size and each row's first real slot (left padding) from the MoBA
attention function on its first call; from then on ``update`` keeps the sums current. The
attention function finds a key tensor's layer through a weak reference the layer attaches to its
current key tensor (checked by identity), so no global state is involved.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from moba_dist.integrations.hf_decode import block_sums

__all__ = [
    "MoBACache",
    "MoBALayer",
    "check_full_attention_config",
    "find_moba_layer",
    "moba_layer_factory",
]


class MoBALayer(DynamicLayer):
    """A ``DynamicLayer`` plus the sums of its complete MoBA blocks.

    State (all ``None`` until the attention function attaches the layer):
    ``moba_block`` (B), ``moba_starts`` (first real cache slot of every row, host ints),
    ``moba_sums [Bt, Hkv, capacity, D]`` and ``moba_len`` (cache slots already accounted for).
    Block j of row b covers slots ``moba_starts[b] + j*B ..`` and is summed once it is complete.
    """

    def __init__(self, max_cache_len: int | None = None, grow: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.moba_capacity, self.moba_grow = max_cache_len, grow
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._moba_clear()

    def _moba_clear(self) -> None:
        self.moba_block: int | None = None
        self.moba_starts: list[int] | None = None
        self.moba_sums: torch.Tensor | None = None
        self.moba_len = 0

    def _moba_tag(self) -> None:
        # Lets the attention function, which only sees the key tensor, find this layer.
        if isinstance(self.keys, torch.Tensor):
            self.keys._moba_layer = weakref.ref(self)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states, value_states [Bt, Hkv, n, D]`` in place; sum every block they
        complete."""
        if self.keys is None or not getattr(self, "is_initialized", True):
            super().update(key_states[:, :, :0], value_states[:, :, :0], *args, **kwargs)
        self._append(key_states, value_states)
        keys, values = self.keys, self.values
        if self.moba_block is not None:
            self._moba_catch_up()
        self._moba_tag()
        return keys, values

    def _seated(self) -> bool:
        """True when ``keys``/``values`` are still views of the start of this layer's buffers."""
        return all(
            buf is not None and x.data_ptr() == buf.data_ptr() and x.stride() == buf.stride()
            and x.shape[:2] == buf.shape[:2]
            for x, buf in ((self.keys, self._kbuf), (self.values, self._vbuf))
        )  # fmt: skip

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        length, n = self.keys.shape[-2], key_states.shape[-2]
        if not self._seated() or length + n > self._kbuf.shape[2]:
            self._reseat(length + n, key_states, value_states)
        self._kbuf[:, :, length : length + n] = key_states
        self._vbuf[:, :, length : length + n] = value_states
        self.keys = self._kbuf[:, :, : length + n]
        self.values = self._vbuf[:, :, : length + n]

    def _reseat(self, need: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Move the cached tokens into buffers holding at least ``need`` slots."""
        cap = 0 if self._kbuf is None else self._kbuf.shape[2]
        if self.moba_capacity is not None and need > self.moba_capacity and not self.moba_grow:
            raise ValueError(
                f"the cache is full: max_cache_len={self.moba_capacity} slots, {need} needed; "
                "build the cache with a larger max_cache_len"
            )
        # Doubling keeps the copies amortised O(1) per token.
        size = max(need, 2 * cap if self._seated() else need, self.moba_capacity or 0)
        length = self.keys.shape[-2]
        bufs = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buf = new.new_empty(new.shape[0], new.shape[1], size, new.shape[3])
            buf[:, :, :length] = old
            bufs.append(buf)
        self._kbuf, self._vbuf = bufs
        self.keys, self.values = self._kbuf[:, :, :length], self._vbuf[:, :, :length]

    def moba_sums_for(self, keys: torch.Tensor, block: int, starts: list[int]) -> torch.Tensor:
        """Attach (first call) or check the layer, then return ``sums [Bt, Hkv, >=n, D]`` where n
        is the number of complete blocks of the row with the most.

        Raises:
            ValueError: ``keys`` is not this layer's key tensor, or ``block`` / ``starts`` differ
                from what the cached tokens were summed with.
        """
        if keys is not self.keys:
            raise ValueError("keys must be this cache layer's current key tensor")
        if len(starts) != keys.shape[0]:
            raise ValueError(
                f"starts must have one entry per batch row ({keys.shape[0]}), got {len(starts)}"
            )
        if self.moba_block is None:
            self.moba_block, self.moba_starts, self.moba_len = block, list(starts), 0
        elif block != self.moba_block:
            raise ValueError(
                f"moba_chunk_size changed while decoding: the cache was built with "
                f"{self.moba_block}, the attention now uses {block}; start a new MoBACache"
            )
        elif list(starts) != self.moba_starts:
            raise ValueError(
                "the attention mask moved where cached sequences start (first real token per row "
                f"was {self.moba_starts}, now {list(starts)}); the mask of cached tokens must not "
                "change between steps"
            )
        self._moba_catch_up()
        return self.moba_sums

    def _moba_catch_up(self) -> None:
        """Sum the blocks completed by cache slots ``[moba_len, L)``."""
        length, block, starts = self.get_seq_length(), self.moba_block, self.moba_starts
        if self.keys is None or self.keys.shape[0] != len(starts):
            raise ValueError(
                f"the cache holds {0 if self.keys is None else self.keys.shape[0]} rows but MoBA "
                f"block sums were started for {len(starts)}; start a new MoBACache"
            )
        # Python floor division: a negative count (still in left padding) clamps to 0 blocks.
        first = [max(0, (self.moba_len - s) // block) for s in starts]
        last = [max(0, (length - s) // block) for s in starts]
        self._moba_reserve(max(last, default=0))
        if any(hi > lo for lo, hi in zip(first, last, strict=True)):
            rows, blocks, sums = block_sums(self.keys, starts, block, first, last)
            self.moba_sums[rows, :, blocks] = sums
        self.moba_len = length

    def _moba_reserve(self, n_blocks: int) -> None:
        bt, hkv, _, d = self.keys.shape
        cap = 0 if self.moba_sums is None else self.moba_sums.shape[2]
        if not self.moba_grow and self.moba_capacity is not None:
            # Fixed storage: one table for every block the capacity can complete.
            n_blocks = max(n_blocks, self.moba_capacity // self.moba_block)
        if self.moba_sums is not None and n_blocks <= cap:
            return
        acc = torch.float64 if self.keys.dtype == torch.float64 else torch.float32
        # Doubling keeps reallocation amortised O(1) per block.
        grown = torch.zeros(
            bt, hkv, max(1, n_blocks, 2 * cap), d, dtype=acc, device=self.keys.device
        )
        if self.moba_sums is not None:
            grown[:, :, :cap] = self.moba_sums
        self.moba_sums = grown

    def crop(self, tokens_to_remove: int) -> None:
        """Drop cached tokens (transformers' ``crop`` argument); blocks cut open are re-summed
        when they complete again."""
        super().crop(tokens_to_remove)
        self.moba_len = min(self.moba_len, self.get_seq_length())
        self._moba_tag()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch (beam search): keys, values, sums and row starts alike."""
        super().reorder_cache(beam_idx)
        self._moba_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (index or bool tensor)."""
        super().batch_select_indices(indices)
        self._moba_select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times."""
        super().batch_repeat_interleave(repeats)
        if self.moba_sums is not None:
            self.moba_sums = self.moba_sums.repeat_interleave(repeats, dim=0)
            self.moba_starts = [s for s in self.moba_starts for _ in range(repeats)]
        self._moba_tag()

    def _moba_select(self, index: torch.Tensor) -> None:
        if self.moba_sums is not None:
            rows = torch.arange(len(self.moba_starts))[index.cpu()].tolist()
            self.moba_sums = self.moba_sums[index.to(self.moba_sums.device)]
            self.moba_starts = [self.moba_starts[r] for r in rows]
        self._moba_tag()

    def reset(self) -> None:
        """Empty the layer, MoBA state included."""
        super().reset()
        self._kbuf = self._vbuf = None
        self._moba_clear()

    def prefetch(self) -> None:
        super().prefetch()
        self._moba_tag()


def find_moba_layer(keys: torch.Tensor) -> MoBALayer | None:
    """The :class:`MoBALayer` whose current key tensor is ``keys`` (None for any other cache)."""
    ref = getattr(keys, "_moba_layer", None)
    layer = ref() if ref is not None else None
    return layer if layer is not None and layer.keys is keys else None


def check_full_attention_config(config: object, what: str) -> None:
    """Raise ``NotImplementedError`` unless every layer of ``config`` is causal full attention
    (no sliding window, chunked or linear layers, not bidirectional); ``what`` names the caller."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    if getattr(config, "is_causal", True) is False:
        raise NotImplementedError(f"{what} is causal only, got config.is_causal=False")
    for attr in ("sliding_window", "attention_chunk_size"):
        if getattr(config, attr, None) is not None:
            raise NotImplementedError(
                f"{what} supports full-attention layers only, got config.{attr}="
                f"{getattr(config, attr)!r}"
            )
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise NotImplementedError(
            f"{what} supports full-attention layers only, got config.layer_types {sorted(kinds)}"
        )


class MoBACache(DynamicCache):
    """KV cache for MoBA generation: ``model.generate(..., past_key_values=MoBACache(config))``.

    A ``DynamicCache`` whose layers are :class:`MoBALayer` (keys/values ``[Bt, Hkv, S, D]`` as
    usual, plus the complete blocks' key sums), so each decode step costs the gate over block
    centroids plus attention over the K selected blocks, without rescanning the cache. Supports
    greedy/sampling/beam search, assisted decoding (``crop``) and continuing from a filled cache.
    Not compileable (no static shapes); the block size is taken from the MoBA attention function
    on first use. Decoding with a plain ``DynamicCache`` gives the same results, slower.

    Args:
        config: optional model config, checked to have only full-attention layers (no sliding
            window or chunked layers).
        max_cache_len: optional slots to preallocate per layer (prompt + new tokens); the
            buffers still grow (doubling) if more are appended.
    """

    def __init__(self, config: object | None = None, max_cache_len: int | None = None) -> None:
        if config is not None:
            check_full_attention_config(config, "MoBACache")
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 1):
            raise ValueError(f"max_cache_len must be a positive int or None, got {max_cache_len!r}")
        # Skip DynamicCache's per-layer-type dispatch: every layer is a MoBALayer, made lazily.
        Cache.__init__(self, layer_class_to_replicate=moba_layer_factory(max_cache_len, grow=True))


def moba_layer_factory(max_cache_len: int | None, grow: bool):
    """A zero-argument layer maker for ``Cache(layer_class_to_replicate=...)``."""
    if max_cache_len is None and grow:
        return MoBALayer

    def make() -> MoBALayer:
        return MoBALayer(max_cache_len=max_cache_len, grow=grow)

    return make
