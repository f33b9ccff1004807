"""MoBAStaticCache: a MoBA KV cache preallocated once for a known maximum length.

    cache = MoBAStaticCache(model.config, max_cache_len=prompt_len + max_new_tokens)
    out = model.generate(**inputs, cache=cache, max_new_tokens=...)  # past_key_values= on < 5.x

Every layer allocates ``keys, values [Bt, Hkv, max_cache_len, D]`` and the block-sum table on
its first update and never reallocates: appending writes slots in place, a full cache raises.
The decode step reads the selected blocks in place (on CUDA three Triton launches per layer:
gate, attention, merge), so a token's cost grows with the cache only through the gate's one
centroid dot per block and the blocks the selection really reads.

For a CUDA-graph captured step, :func:`static_decode_inputs` hands out the full-capacity buffers
(fixed addresses and shapes) that :func:`moba_dist.integrations.hf_decode.moba_decode_step`
takes; positions are device tensors, so the same graph replays as the cache fills
(``benchmarks/decode_bench.py`` does this). transformers' own compiled generation
(``cache_implementation="static"`` with ``torch.compile``) is not supported: its static layers
track lengths through an API that differs between 5.x releases, and MoBA's padding layout is read
from the 2-D mask on the host; ``is_compileable`` is False so generate never tries.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from moba_dist.integrations.hf_cache import (
    MoBACache,
    MoBALayer,
    check_full_attention_config,
    moba_layer_factory,
)

__all__ = ["MoBAStaticCache", "static_decode_inputs"]


class MoBAStaticCache(MoBACache):
    """A :class:`MoBACache` with fixed, preallocated storage of ``max_cache_len`` slots a layer.

    Same results as :class:`MoBACache` (greedy, sampling, beam search, cropping, left padding);
    no reallocation ever, so memory is known up front.

    Args:
        config: optional model config, checked to have only full-attention layers.
        max_cache_len: slots per layer and row (prompt, left padding and new tokens).

    Raises:
        ValueError: ``max_cache_len`` is not a positive int; later, an append past it.
    """

    is_compileable = False

    def __init__(self, config: object | None = None, *, max_cache_len: int) -> None:
        if config is not None:
            check_full_attention_config(config, "MoBAStaticCache")
        if (
            not isinstance(max_cache_len, int)
            or isinstance(max_cache_len, bool)
            or max_cache_len < 1
        ):
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        # Not `max_cache_len`: some transformers releases make that a read-only Cache property.
        self.moba_max_cache_len = max_cache_len
        Cache.__init__(self, layer_class_to_replicate=moba_layer_factory(max_cache_len, False))


def static_decode_inputs(layer: MoBALayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keys, values, sums)`` at full capacity for a captured decode step of ``layer``.

    ``keys, values [Bt, Hkv, max_cache_len, D]`` and ``sums [Bt, Hkv, n_blocks, D]`` keep their
    addresses for the cache's lifetime (until a batch reorder re-seats them).

    Raises:
        ValueError: the layer has not been filled and attached to MoBA attention yet.
    """
    if layer.moba_sums is None or layer._kbuf is None:
        raise ValueError("the layer has no MoBA state yet: run the prefill through MoBA first")
    return layer._kbuf, layer._vbuf, layer.moba_sums
