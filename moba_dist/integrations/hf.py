"""Hugging Face transformers integration: MoBA as an ``attn_implementation``.

    from moba_dist.integrations.hf import MoBACache, register_moba

    register_moba(moba_chunk_size=4096, moba_topk=12)  # registers "moba"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="moba")
    out = model.generate(**inputs, cache=MoBACache(model.config), max_new_tokens=64)

The cache keyword is ``cache=`` on transformers releases that renamed it (they warn that
``past_key_values=`` is deprecated) and ``past_key_values=`` before; both take the same object,
and :data:`CACHE_ARG` names the installed release's spelling. :class:`MoBAStaticCache` is the
same cache preallocated for a known ``max_cache_len``.

Any model whose attention goes through transformers' ``AttentionInterface`` with causal full
attention (the Llama family: Llama, Mistral without sliding window, Qwen2/3, ...) then runs MoBA:

- Prefill (query length == key length): the single-device op (:func:`moba_dist.moba_attn_varlen`,
  fast backend picked by ``backend``), GQA native: transformers' ``[B, H, S, D]`` K/V are
  transposed, never repeated. Padding is read from the 2-D attention mask: each row's real tokens
  (one contiguous run: left or right padding) are packed with ``cu_seqlens``, so blocks start at
  every row's first real token and the result equals the unpadded row exactly; padded positions
  get a zero output. Packed sequences (``position_ids`` restarting inside a row, no attention
  mask, no cache: transformers' padding-free format) become separate sequences.
- Cached decoding (query length < key length): MoBA, not dense. A new query at position t attends
  to its own block (positions ``block_start..t``) plus the top-(K-1) complete past blocks by
  ``q . centroid`` (float32, ties to the lower block), reading only those K blocks' keys: on
  CUDA three Triton launches per layer (gate, attention, merge) read them in place from the
  preallocated cache.
  Centroids come from :class:`MoBACache`, which keeps block key sums up to date as keys are
  appended; with any other dynamic cache the sums are recomputed from all keys each step (same
  result, slower, with a warning). Batched generation needs left padding.

Not supported (clear errors): attention dropout, sliding-window / chunked / non-causal
attention, logit soft-capping, attention sinks, custom 4-D masks, transformers' own static
(compileable) caches (use :class:`MoBAStaticCache`), right-padded rows followed by generated
tokens. The gate has no gradient (as in the op); the
prefill is differentiable, so training through ``model(...)`` works.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

from moba_dist.config import MoBAConfig
from moba_dist.integrations.hf_decode import block_sums, moba_decode
from moba_dist.ops import moba_attn_func, moba_attn_varlen

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

    from moba_dist.integrations.hf_cache import (
        MoBACache,
        check_full_attention_config,
        find_moba_layer,
    )
    from moba_dist.integrations.hf_static_cache import MoBAStaticCache
except ImportError as exc:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "moba_dist.integrations.hf needs transformers >= 4.56 (pip install 'moba-dist[hf]'), "
        f"got {transformers.__version__}"
    ) from exc

# 4.56 introduced the layer-based cache API (Cache(layer_class_to_replicate=...)) MoBACache
# builds on; tests/test_hf.py passed with 4.56.2, 4.57.6, 5.0.0 and 5.23.0.
if tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (4, 56):
    raise ImportError(
        "moba_dist.integrations.hf needs transformers >= 4.56 (pip install 'moba-dist[hf]'), "
        f"got {transformers.__version__}"
    )

__all__ = [
    "CACHE_ARG",
    "MoBACache",
    "MoBAMask",
    "MoBAStaticCache",
    "moba_attention_forward",
    "moba_attention_mask",
    "register_moba",
]

# The cache keyword of generate() and model forwards in the installed transformers: "cache"
# where past_key_values is deprecated (5.2x), "past_key_values" before. Both take a MoBACache.
# generate() hides its keywords in **kwargs, so a reference model's forward is read instead.
CACHE_ARG = (
    "cache"
    if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters
    else "past_key_values"
)

# Substrings transformers gives a meaning to inside attn_implementation names (flash/flex/sdpa
# dispatch, "paged|" prefixes, hub kernels "org/repo"): a MoBA name must avoid them.
_RESERVED_PARTS = ("flash", "flex", "sdpa", "paged", "|", "/")
_REGISTERED: set[str] = set()


@dataclass
class MoBAMask:
    """What MoBA needs from transformers' 2-D attention mask, computed once per forward by
    :func:`moba_attention_mask` and handed to every layer as its ``attention_mask``.

    Row b's real tokens are the key slots ``[starts[b], ends[b])`` (``starts == ends``: an empty
    row). ``packed`` means transformers detected packed sequences from ``position_ids``.
    """

    starts: list[int]
    ends: list[int]
    kv_length: int
    packed: bool = False


def _row_spans(attention_mask: torch.Tensor, kv_length: int) -> tuple[list[int], list[int]]:
    """First and one-past-last real slot of every row of a ``[Bt, kv_length]`` mask."""
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_length:
        raise ValueError(
            f"attention_mask must be 2-D [batch, {kv_length}] (one entry per cached + new "
            f"token), got shape {tuple(attention_mask.shape)}"
        )
    real = attention_mask.bool()
    count = real.sum(1)
    first = real.int().argmax(1)
    end = kv_length - real.flip(1).int().argmax(1)
    empty = count == 0
    first, end = first.masked_fill(empty, 0), end.masked_fill(empty, 0)
    starts, ends, counts = torch.stack([first, end, count]).tolist()  # one host sync per forward
    for b, (s, e, n) in enumerate(zip(starts, ends, counts, strict=True)):
        if e - s != n:
            raise ValueError(
                f"attention_mask row {b} has padding between real tokens (real slots {s}..{e - 1} "
                f"hold {n} tokens): MoBA blocks start at each sequence's first token, so only "
                "left or right padding (one contiguous run of real tokens) is supported"
            )
    return starts, ends


def moba_attention_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int = 0,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    use_vmap: bool = False,
    cache_position: torch.Tensor | None = None,
    **kwargs,
) -> MoBAMask | None:
    """transformers ``AttentionMaskInterface`` entry for MoBA: the padding layout, not a matrix.

    Recent transformers describe the queries by ``q_length`` and ``q_offset``, older ones (5.0)
    by ``cache_position`` (their positions); both are accepted. Returns None when every row is
    all real tokens (nothing to pack), else a :class:`MoBAMask`.

    Raises:
        NotImplementedError: static / sliding caches, or mask patterns other than causal (with
            padding) or transformers' packed-sequence pattern.
        ValueError: a row whose real tokens are not one contiguous run.
    """
    if cache_position is not None:
        q_length, q_offset = cache_position.shape[0], int(cache_position[0])
    if isinstance(q_offset, torch.Tensor) or kv_offset != 0 or q_offset + q_length != kv_length:
        raise NotImplementedError(
            "MoBA attention needs a dynamic cache holding exactly the past tokens (MoBACache or "
            f"DynamicCache); got q_offset={q_offset!r}, kv_offset={kv_offset!r}, "
            f"q_length={q_length}, kv_length={kv_length} (a static or sliding-window cache)"
        )
    config = kwargs.get("config")
    if config is not None:
        check_full_attention_config(config, "MoBA attention")
    packed = mask_function is not causal_mask_function
    if packed and (use_vmap or attention_mask is not None):
        # or/and overlays (image tokens, custom masks) set use_vmap; what remains is packing
        # (checked against position_ids by the attention function).
        raise NotImplementedError(
            "MoBA attention supports causal masks with padding or packed sequences only, got a "
            f"custom mask pattern {getattr(mask_function, '__name__', mask_function)!r}"
        )
    if attention_mask is None:
        full = [0] * batch_size, [kv_length] * batch_size
        return MoBAMask(*full, kv_length, packed=True) if packed else None
    starts, ends = _row_spans(attention_mask, kv_length)
    if all(s == 0 and e == kv_length for s, e in zip(starts, ends, strict=True)):
        return None
    return MoBAMask(starts, ends, kv_length)


def register_moba(
    moba_chunk_size: int, moba_topk: int, name: str = "moba", backend: str = "auto"
) -> str:
    """Register MoBA with transformers as ``attn_implementation=name``.

    Registers :func:`moba_attention_forward` (bound to this block size and top-k) in
    ``AttentionInterface`` and :func:`moba_attention_mask` in ``AttentionMaskInterface``. Then
    ``from_pretrained(..., attn_implementation=name)``, ``model.set_attn_implementation(name)`` or
    ``config._attn_implementation = name`` before building a model select it. Registering a name
    again replaces its settings (models using it pick them up on their next forward).

    Args:
        moba_chunk_size: block size B >= 1.
        moba_topk: K >= 1 blocks per query, its own block included.
        name: the implementation name; must not be a built-in one or contain
            ``flash``/``flex``/``sdpa``/``paged``/``|``/``/`` (transformers dispatches on those).
        backend: prefill kernel of :func:`moba_dist.moba_attn_varlen` (``"auto"``,
            ``"reference"``, ``"varlen"``, ``"triton"``); decoding is pure PyTorch.

    Returns:
        ``name``, ready for ``attn_implementation=``.
    """
    cfg = MoBAConfig(moba_chunk_size, moba_topk, None, backend)
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(
            f"name must be a non-empty string without surrounding spaces, got {name!r}"
        )
    bad = [part for part in _RESERVED_PARTS if part in name.lower()]
    if name == "eager" or bad:
        raise ValueError(
            f"name must not be a built-in attention name or contain {bad or ['eager']}, "
            f"got {name!r}"
        )
    if name in AttentionInterface() and name not in _REGISTERED:
        raise ValueError(f"name {name!r} is already registered by another attention implementation")

    def attention(module, query, key, value, attention_mask, **kwargs):
        return moba_attention_forward(module, query, key, value, attention_mask, moba=cfg, **kwargs)

    attention.__name__ = attention.__qualname__ = f"moba_attention_{name}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, moba_attention_mask)
    _REGISTERED.add(name)
    return name


def _check_supported(module: object, attention_mask: object, dropout: float, kwargs: dict) -> None:
    """Raise for every mode MoBA attention does not implement."""
    if isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            "MoBA attention builds its own block mask from the 2-D padding mask; custom 4-D "
            f"attention masks are not supported, got a tensor of shape "
            f"{tuple(attention_mask.shape)}"
        )
    if attention_mask is not None and not isinstance(attention_mask, MoBAMask):
        raise TypeError(
            f"attention_mask must come from moba_attention_mask (MoBAMask or None), got "
            f"{type(attention_mask).__name__}; register the mask with register_moba"
        )
    if dropout:
        raise NotImplementedError(
            f"attention dropout is not supported by MoBA attention, got dropout={dropout} (a model "
            "in training mode with config.attention_dropout > 0: set it to 0.0)"
        )
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(
            "MoBA attention is causal only, got a module with is_causal=False"
        )
    for arg in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(arg) is not None:
            raise NotImplementedError(
                f"MoBA attention does not support {arg} (sliding windows, soft-capping, attention "
                f"sinks), got {arg}={kwargs[arg]!r}"
            )


def moba_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: MoBAMask | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    moba: MoBAConfig,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function computing MoBA (see the module doc).

    Args:
        module: the calling attention module (``is_causal`` is checked).
        query: ``[Bt, Hq, nq, D]``; key, value: ``[Bt, Hkv, L, D]`` (the cache after appending
            the new tokens), ``Hq % Hkv == 0``. ``nq == L``: prefill; ``nq < L``: cached decoding
            of the last ``nq`` tokens.
        attention_mask: from :func:`moba_attention_mask`.
        dropout: must be 0. scaling: softmax scale (default ``D ** -0.5``).
        moba: block size, top-k and prefill backend.
        kwargs: ``position_ids`` (needed for packed sequences); unsupported options raise.

    Returns:
        ``(out [Bt, nq, Hq, D], None)``: no attention weights.
    """
    _check_supported(module, attention_mask, dropout, kwargs)
    if query.dim() != 4 or key.dim() != 4 or query.shape[2] > key.shape[2]:
        raise ValueError(
            "query must be [B, Hq, nq, D] and key [B, Hkv, L, D] with nq <= L, got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if query.shape[2] == key.shape[2]:
        return _prefill(
            query, key, value, attention_mask, kwargs.get("position_ids"), moba, scale
        ), None
    return _decode(query, key, value, attention_mask, moba, scale), None


def _packed_lengths(position_ids: torch.Tensor | None, bt: int, s: int) -> list[int]:
    """Sequence lengths of a packed batch: a new sequence wherever positions do not step by 1."""
    if position_ids is None:
        raise ValueError("packed sequences need position_ids passed to the attention function")
    pos = position_ids.expand(bt, s)
    restart = torch.ones(bt, s, dtype=torch.bool, device=pos.device)
    restart[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    firsts = restart.reshape(-1).nonzero().squeeze(1).tolist()
    if len(firsts) == bt:
        # transformers flags packing only when positions restart: this is another mask pattern.
        raise NotImplementedError(
            "MoBA attention supports causal masks with padding or packed sequences only, got a "
            "non-causal mask pattern without restarting position_ids"
        )
    return [b - a for a, b in zip(firsts, [*firsts[1:], bt * s], strict=True)]


def _prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: MoBAMask | None,
    position_ids: torch.Tensor | None,
    cfg: MoBAConfig,
    scale: float,
) -> torch.Tensor:
    """Prefill through the single-device op -> ``[Bt, S, Hq, D]``."""
    bt, hq, s, d = query.shape
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [Bt, S, H, D], K/V not repeated
    opts = {"moba_chunk_size": cfg.moba_chunk_size, "moba_topk": cfg.moba_topk}
    opts.update(softmax_scale=scale, backend=cfg.backend, gate_precision=cfg.gate_precision)
    layer = find_moba_layer(key)
    if layer is not None and (mask is None or not mask.packed):
        layer.moba_sums_for(key, cfg.moba_chunk_size, [0] * bt if mask is None else mask.starts)
    if mask is None:
        return moba_attn_func(q, k, v, **opts)
    q, k, v = (x.reshape(bt * s, x.shape[2], d) for x in (q, k, v))
    keep = None
    if mask.packed:
        lengths = _packed_lengths(position_ids, bt, s)
    else:
        bounds = zip(mask.starts, mask.ends, strict=True)
        spans = [(b * s + st, b * s + en) for b, (st, en) in enumerate(bounds)]
        lengths = [en - st for st, en in spans if en > st]
        keep = torch.cat([torch.arange(st, en, device=q.device) for st, en in spans])
        q, k, v = (x.index_select(0, keep) for x in (q, k, v))
    out = torch.zeros(bt * s, hq, d, dtype=query.dtype, device=query.device)
    if lengths:
        cu = torch.tensor([0, *lengths], device=q.device).cumsum(0).to(torch.int32)
        packed = moba_attn_varlen(q, k, v, cu, max(lengths), **opts)
        out = packed if keep is None else out.index_copy(0, keep, packed)
    return out.view(bt, s, hq, d)


def _decode_starts(mask: MoBAMask | None, bt: int, kv_len: int, nq: int) -> list[int]:
    """First real cache slot of every row, checking the rows can be decoded."""
    if mask is None:
        return [0] * bt
    if mask.packed:
        raise NotImplementedError(
            "packed sequences (restarting position_ids) need a cache-less forward"
        )
    if mask.kv_length != kv_len:
        raise ValueError(f"attention mask covers {mask.kv_length} key slots, the cache {kv_len}")
    for b, (s, e) in enumerate(zip(mask.starts, mask.ends, strict=True)):
        if e != kv_len:
            raise ValueError(
                f"attention_mask row {b} has padding after its tokens (right padding) before the "
                "new tokens: cached MoBA decoding would leave a gap inside the sequence. Pad on "
                "the left for batched generation (tokenizer.padding_side = 'left')"
            )
        if s > kv_len - nq:
            raise ValueError(f"attention_mask row {b} marks new (query) tokens as padding")
    return mask.starts


def _decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: MoBAMask | None,
    cfg: MoBAConfig,
    scale: float,
) -> torch.Tensor:
    """Cached MoBA decoding of the last ``nq`` slots -> ``[Bt, nq, Hq, D]``."""
    bt, _, nq, _ = query.shape
    kv_len, block = key.shape[2], cfg.moba_chunk_size
    starts = _decode_starts(mask, bt, kv_len, nq)
    layer = find_moba_layer(key)
    if layer is not None:
        sums = layer.moba_sums_for(key, block, starts)
    else:
        warnings.warn(
            "MoBA decoding without MoBACache recomputes block centroids from every cached key at "
            f"each step; pass {CACHE_ARG}=MoBACache(model.config) to generate() or forward()",
            stacklevel=2,
        )
        sums = _scan_sums(key, starts, block)
    starts_t = torch.tensor(starts, dtype=torch.int64, device=query.device)
    return moba_decode(query, key, value, sums, starts_t, block, cfg.moba_topk, scale)


def _scan_sums(key: torch.Tensor, starts: list[int], block: int) -> torch.Tensor:
    """Sums of every complete block of every row, from the keys (no MoBACache)."""
    bt, hkv, kv_len, d = key.shape
    last = [max(0, (kv_len - s) // block) for s in starts]
    rows, blocks, sums = block_sums(key, starts, block, [0] * bt, last)
    table = torch.zeros(bt, hkv, max(1, *last), d, dtype=sums.dtype, device=key.device)
    table[rows, :, blocks] = sums
    return table
