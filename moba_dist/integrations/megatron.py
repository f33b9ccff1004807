"""Megatron-Core adapter: MoBA as a drop-in *core attention* module.

``MoBACoreAttention`` takes the place of ``DotProductAttention`` / ``TEDotProductAttention`` in a
Megatron-Core layer spec (``SelfAttentionSubmodules(core_attention=...)``). It has their
constructor signature (``config, layer_number, attn_mask_type, attention_type,
attention_dropout, softmax_scale, cp_comm_type, pg_collection``) and their forward signature
(``query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params``), and
it takes the tensors as Megatron hands them over after context-parallel (CP) sharding:

- ``[s, b, h, d]`` ("sbhd"): ``s`` is this rank's share of every sequence. Each of the ``b``
  sequences has ``S = s * P`` tokens (``P`` = CP size) and is sharded on its own with the zigzag
  layout (Megatron's ``get_batch_on_this_cp_rank``: chunks ``r`` and ``2P-1-r`` of ``2P``).
  Column ``i`` is sequence ``i``'s shard, which is exactly
  ``moba_dist.parallel.shard(..., layout="zigzag")`` of the packed batch
  ``cu_seqlens = [0, S, 2S, ...]`` restricted to that sequence; so the adapter packs
  ``[s, b] -> [b * s]`` and calls the CP op on the global offsets. Returns ``[s, b, h * d]``.
- packed ``[t, h, d]`` ("thd", ``packed_seq_params.qkv_format == "thd"``): ``t`` local tokens,
  ``packed_seq_params.cu_seqlens_q_padded`` (else ``cu_seqlens_q``) are the *global* offsets
  of the padded sequences, each sequence zigzag-sharded (TransformerEngine's
  ``thd_get_partitioned_indices``). ``cu_seqlens_q`` holds the real lengths: tokens between a
  sequence's real end and its padded end are padding; their outputs are zero and they get no
  gradient (tail padding moves no block boundary, see ``moba_dist.parallel.pad_for_cp``).
  Returns ``[t, h * d]`` (Megatron reshapes it to ``[t, 1, h * d]``).

MoBA settings come from the constructor, else from attributes of ``config`` (Megatron's
``TransformerConfig`` is a plain dataclass; set them with ``setattr`` after building it):
``moba_chunk_size`` and ``moba_topk`` (required), ``moba_strategy`` (``"auto"``),
``moba_backend`` (``"auto"``), ``moba_layout`` (``"zigzag"``), ``moba_keep_fetched``
(``False``), ``moba_gate_precision`` (``"float32"``), ``moba_max_fetch_bytes`` (``None``).
``softmax_scale`` comes from the argument, else ``config.softmax_scale``, else ``d ** -0.5``.

Nothing here imports megatron: the enum is matched by member name, so the module also works
with stand-ins of the same shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moba_dist.ops import moba_attn_varlen
from moba_dist.parallel import comm
from moba_dist.parallel.config import CPConfig
from moba_dist.parallel.context import CPContext
from moba_dist.parallel.cp import MoBAContextParallel
from moba_dist.parallel.layouts import local_positions

__all__ = ["CAUSAL_MASK_TYPES", "MoBACoreAttention"]

#: Mask types MoBA computes. ``padding_causal`` is what TransformerEngine uses for packed
#: ("thd") input (padding lives in ``cu_seqlens``); ``causal_bottom_right`` equals ``causal``
#: for self-attention, where query and key lengths are equal.
CAUSAL_MASK_TYPES = ("causal", "padding_causal", "causal_bottom_right")

_MOBA_DEFAULTS: dict[str, Any] = {
    "moba_chunk_size": None,
    "moba_topk": None,
    "moba_strategy": "auto",
    "moba_backend": "auto",
    "moba_layout": "zigzag",
    "moba_keep_fetched": False,
    "moba_gate_precision": "float32",
}


def _mask_name(mask_type: Any) -> str:
    """``AttnMaskType.causal`` (or a stand-in enum, or the string ``"causal"``) -> ``"causal"``."""
    return mask_type if isinstance(mask_type, str) else getattr(mask_type, "name", repr(mask_type))


def _check_mask_type(mask_type: Any, where: str) -> str:
    name = _mask_name(mask_type)
    if name not in CAUSAL_MASK_TYPES:
        raise ValueError(
            f"{where} must be a causal AttnMaskType ({', '.join(CAUSAL_MASK_TYPES)}): MoBA is "
            f"causal by construction, got {name}"
        )
    return name


def _moba_setting(name: str, given: Any, config: Any) -> Any:
    """Constructor argument, else ``config.<name>``, else the default."""
    if given is not None:
        return given
    value = getattr(config, name, None)
    if value is not None:
        return value
    default = _MOBA_DEFAULTS[name]
    if default is None:
        raise ValueError(
            f"{name} must be given to MoBACoreAttention or set on the config "
            f"(config.{name} = ...), got neither"
        )
    return default


def _optional_setting(name: str, given: Any, config: Any) -> Any:
    """Constructor argument, else ``config.<name>``, else None (a setting whose default is
    None, resolved later)."""
    return given if given is not None else getattr(config, name, None)


def _check_config(config: Any, attention_type: str) -> None:
    """Reject Megatron features that change the attention function MoBA computes."""
    if attention_type != "self":
        raise ValueError(
            f"attention_type must be 'self' (MoBA routes queries over their own sequence's "
            f"keys), got {attention_type!r}"
        )
    if getattr(config, "window_size", None) is not None:
        raise ValueError(
            f"config.window_size must be None (sliding-window attention is not MoBA), "
            f"got {config.window_size!r}"
        )
    softmax_type = getattr(config, "softmax_type", "vanilla")
    if softmax_type != "vanilla":
        raise ValueError(f"config.softmax_type must be 'vanilla', got {softmax_type!r}")
    if getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False):
        raise ValueError("config.qk_clip / log_max_attention_logit are not supported by MoBA")


def _resolve_cp_group(config: Any, cp_group: Any, pg_collection: Any) -> Any:
    """The CP group: ``cp_group``, else ``pg_collection.cp``; ``None`` means no CP."""
    group = cp_group if cp_group is not None else getattr(pg_collection, "cp", None)
    cp_size = getattr(config, "context_parallel_size", 1) or 1
    if group is None:
        if cp_size > 1:
            raise ValueError(
                f"config.context_parallel_size = {cp_size} needs a CP process group: pass "
                f"pg_collection (with .cp) or cp_group, got neither"
            )
        return None
    size = comm.group_size(group)
    if cp_size > 1 and size != cp_size:
        raise ValueError(
            f"the CP group has {size} ranks but config.context_parallel_size = {cp_size}"
        )
    return group


class MoBACoreAttention(nn.Module):
    """MoBA core attention with Megatron-Core's core-attention signatures.

    Args:
        config: Megatron ``TransformerConfig`` (or any object with the attributes read here:
            ``context_parallel_size``, ``attention_dropout``, ``softmax_scale``, the optional
            ``moba_*`` settings of the module docstring).
        layer_number: 1-based layer index (kept for Megatron; MoBA does not use it).
        attn_mask_type: ``AttnMaskType`` member; causal types only (:data:`CAUSAL_MASK_TYPES`).
        attention_type: ``"self"`` only.
        attention_dropout: dropout probability (``None``: ``config.attention_dropout``). Not
            supported: a value > 0 raises in a training-mode forward (eval is fine).
        softmax_scale: ``None``: ``config.softmax_scale``, else ``head_dim ** -0.5``. Megatron's
            ``apply_query_key_layer_scaling`` is ignored: it rescales by ``layer_number`` and
            undoes it inside the softmax, so the function is unchanged.
        cp_comm_type: accepted for signature compatibility and ignored: MoBA's CP exchanges the
            selected K/V rows itself (``strategy``), not Megatron's p2p / a2a schemes.
        pg_collection: Megatron ``ProcessGroupCollection``; its ``cp`` group is used.
        cp_group: explicit CP process group (overrides ``pg_collection``). With neither, there
            is no CP (``config.context_parallel_size`` must then be 1).
        moba_chunk_size, moba_topk, strategy, backend, layout, keep_fetched, gate_precision,
        max_fetch_bytes: MoBA settings (see ``moba_dist.MoBAContextParallel``); ``None`` reads
            ``config.moba_*``.

    After a CP forward (CP size > 1), ``last_stats`` holds the communication statistics of
    ``moba_dist.MoBAContextParallel``.
    """

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        *,
        cp_group: Any = None,
        moba_chunk_size: int | None = None,
        moba_topk: int | None = None,
        strategy: str | None = None,
        backend: str | None = None,
        layout: str | None = None,
        keep_fetched: bool | None = None,
        gate_precision: str | None = None,
        max_fetch_bytes: int | None = None,
    ) -> None:
        super().__init__()
        _check_config(config, attention_type)
        self.config, self.layer_number = config, max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        _check_mask_type(attn_mask_type, "attn_mask_type")
        self.cp_comm_type = cp_comm_type  # ignored, see the docstring
        if attention_dropout is None:
            attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.attention_dropout = float(attention_dropout or 0.0)
        if softmax_scale is None:
            softmax_scale = getattr(config, "softmax_scale", None)
        self.cp_group = _resolve_cp_group(config, cp_group, pg_collection)
        self.cp_size = 1 if self.cp_group is None else comm.group_size(self.cp_group)
        # CPConfig validates every setting once, with messages naming it.
        cp_config = CPConfig(
            moba_chunk_size=_moba_setting("moba_chunk_size", moba_chunk_size, config),
            moba_topk=_moba_setting("moba_topk", moba_topk, config),
            softmax_scale=softmax_scale,
            backend=_moba_setting("moba_backend", backend, config),
            layout=_moba_setting("moba_layout", layout, config),
            strategy=_moba_setting("moba_strategy", strategy, config),
            keep_fetched=bool(_moba_setting("moba_keep_fetched", keep_fetched, config)),
            gate_precision=_moba_setting("moba_gate_precision", gate_precision, config),
            max_fetch_bytes=_optional_setting("moba_max_fetch_bytes", max_fetch_bytes, config),
        )  # fmt: skip
        self.attn = MoBAContextParallel.from_config(cp_config, process_group=self.cp_group)
        self._context_key: tuple | None = None
        self._context: CPContext | None = None

    @property
    def last_stats(self) -> dict[str, Any]:
        """Statistics of the last CP forward (empty without CP)."""
        return self.attn.last_stats

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """MoBA over this rank's shard.

        Args:
            query: ``[s, b, Hq, d]``, or ``[t, Hq, d]`` with ``packed_seq_params``.
            key, value: ``[s, b, Hkv, d]`` / ``[t, Hkv, d]``, ``Hq % Hkv == 0`` (GQA, K/V are
                never repeated).
            attention_mask: ignored, as TransformerEngine ignores it for causal masks: the
                mask is causal (plus MoBA's block selection) and padding is in ``cu_seqlens``.
            attn_mask_type: ``None`` (the constructor's) or a causal ``AttnMaskType``.
            attention_bias: must be ``None``.
            packed_seq_params: Megatron ``PackedSeqParams`` with ``qkv_format="thd"`` and the
                global ``cu_seqlens_q`` (and ``cu_seqlens_q_padded``) for packed input.

        Returns:
            ``[s, b, Hq * d]`` or ``[t, Hq * d]`` in the input dtype.
        """
        self._check_call(attn_mask_type, attention_bias)
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, packed_seq_params)
        if query.dim() != 4:
            raise ValueError(
                "query must be 4-D [s, b, h, d] (or 3-D [t, h, d] with packed_seq_params), got "
                f"shape {tuple(query.shape)}"
            )
        return self._forward_sbhd(query, key, value)

    def _check_call(self, attn_mask_type: Any, attention_bias: torch.Tensor | None) -> None:
        if attn_mask_type is not None:
            _check_mask_type(attn_mask_type, "attn_mask_type")
        if attention_bias is not None:
            raise ValueError("attention_bias must be None: MoBA has no additive attention bias")
        if self.training and self.attention_dropout > 0:
            raise ValueError(
                f"attention dropout is not supported by MoBA, got attention_dropout = "
                f"{self.attention_dropout} in training mode; set config.attention_dropout = 0.0"
            )

    def _forward_sbhd(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> torch.Tensor:
        """``[s, b, h, d]`` -> packed ``[b * s, h, d]`` (sequence-major) -> ``[s, b, h * d]``."""
        self._check_sbhd(query, key, value)
        s, b = query.shape[:2]
        seqlen = s * self.cp_size
        cu = torch.arange(0, (b + 1) * seqlen, seqlen, dtype=torch.int32, device=query.device)
        q, k, v = (x.transpose(0, 1).reshape(b * s, *x.shape[2:]) for x in (query, key, value))
        batch = self._sbhd_context(cu, s, b) if self.cp_size > 1 else cu
        out = self._attend(q, k, v, batch, seqlen)
        return out.reshape(b, s, -1).transpose(0, 1).contiguous()

    def _sbhd_context(self, cu: torch.Tensor, s: int, b: int) -> CPContext:
        """The offsets of ``[s, b]`` input depend on (s, b) only, and so does everything in their
        CPContext: built once per shape, not per call (every CP rank sees the same shapes, so
        every rank builds it, a collective, at the same call)."""
        key = (s, b, cu.device)
        if self._context_key != key:
            self._context = CPContext.build(
                cu, moba_chunk_size=self.attn.config.moba_chunk_size,
                process_group=self.cp_group, layout=self.attn.config.layout,
            )  # fmt: skip
            self._context_key = key
        return self._context

    def _check_sbhd(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        for name, x in (("key", key), ("value", value)):
            if x.dim() != 4 or x.shape[:2] != query.shape[:2]:
                raise ValueError(
                    f"{name} must be [s, b, Hkv, d] with the query's s and b = "
                    f"{tuple(query.shape[:2])}, got shape {tuple(x.shape)}"
                )
        s, b = query.shape[:2]
        if self.cp_size == 1:
            return
        if self.attn.config.layout == "zigzag" and s % 2 != 0:
            raise ValueError(
                f"the zigzag layout gives each rank two equal chunks of every sequence, so the "
                f"local sequence length s must be even, got s = {s}"
            )
        if self.attn.config.layout == "contiguous" and b > 1:
            # Packed-contiguous gives rank r a slice of the whole [b * S] stream, not a slice
            # of every sequence, so it cannot describe b > 1 columns of [s, b].
            raise ValueError(
                f"layout='contiguous' shards the packed batch, not each sequence: [s, b, h, d] "
                f"input needs b = 1 there (or layout='zigzag'), got b = {b}"
            )

    def _forward_packed(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: Any
    ) -> torch.Tensor:
        """Packed ``[t, h, d]`` with the global (padded) offsets of ``params`` -> ``[t, h * d]``."""
        fmt = getattr(params, "qkv_format", None)
        if fmt not in (None, "thd"):
            raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got {fmt!r}")
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.dim() != 3:
                raise ValueError(
                    f"{name} must be 3-D [t, h, d] with packed_seq_params, got shape "
                    f"{tuple(x.shape)}"
                )
        cu, real = _packed_offsets(params)
        out = self._attend(query, key, value, cu, int((cu[1:] - cu[:-1]).max()))
        if real is not None:
            out = out * self._real_token_mask(cu, real, out)
        return out.reshape(out.shape[0], -1)

    def _real_token_mask(
        self, cu: torch.Tensor, real: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``[t, 1, 1]`` mask: 1 where this rank's token is a real (not padding) token."""
        rank = 0 if self.cp_group is None else comm.group_rank_and_size(self.cp_group)[0]
        layout = self.attn.config.layout if self.cp_size > 1 else "contiguous"
        pos = local_positions(cu.cpu(), rank=rank, world_size=self.cp_size, layout=layout)
        seq = torch.searchsorted(cu.cpu().long(), pos, right=True) - 1
        lens = (real[1:] - real[:-1]).cpu().long()
        keep = (pos - cu.cpu().long()[seq]) < lens[seq]
        return keep.to(device=out.device, dtype=out.dtype)[:, None, None]

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        cu: torch.Tensor | CPContext, max_len: int,
    ) -> torch.Tensor:  # fmt: skip
        """Packed local ``[T_local, H, d]`` with global offsets ``cu`` (or their context) ->
        ``[T_local, Hq, d]``."""
        if self.cp_size > 1:
            return self.attn(q, k, v, cu)
        c = self.attn.config
        return moba_attn_varlen(
            q, k, v, cu, max_len, moba_chunk_size=c.moba_chunk_size, moba_topk=c.moba_topk,
            softmax_scale=c.softmax_scale, backend=c.backend, gate_precision=c.gate_precision,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"layer_number={self.layer_number}, cp_size={self.cp_size}, {self.attn.extra_repr()}"


def _packed_offsets(params: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(global offsets of the padded sequences, real offsets or None when unpadded)``."""
    cu_q = getattr(params, "cu_seqlens_q", None)
    padded = getattr(params, "cu_seqlens_q_padded", None)
    if cu_q is None:
        raise ValueError("packed_seq_params.cu_seqlens_q must be set for packed [t, h, d] input")
    _check_self_attention(params, cu_q, padded)
    for name, x in (("cu_seqlens_q", cu_q), ("cu_seqlens_q_padded", padded)):
        if x is not None and x.dtype != torch.int32:
            raise TypeError(f"packed_seq_params.{name} must be int32, got {x.dtype}")
    if padded is None or torch.equal(padded, cu_q):
        return cu_q, None
    fits = padded.shape == cu_q.shape and bool(
        ((cu_q[1:] - cu_q[:-1]) <= (padded[1:] - padded[:-1])).all()
    )
    if not fits:
        raise ValueError(
            "packed_seq_params.cu_seqlens_q_padded must describe the same sequences as "
            f"cu_seqlens_q, each at least as long, got {padded.tolist()} vs {cu_q.tolist()}"
        )
    return padded, cu_q


def _check_self_attention(params: Any, cu_q: torch.Tensor, padded: torch.Tensor | None) -> None:
    """Key offsets, when given, must equal the query offsets (self-attention)."""
    pairs = (
        ("cu_seqlens_kv", getattr(params, "cu_seqlens_kv", None), cu_q),
        ("cu_seqlens_kv_padded", getattr(params, "cu_seqlens_kv_padded", None), padded),
    )
    for name, kv, q in pairs:
        if kv is not None and (q is None or kv.shape != q.shape or not torch.equal(kv, q)):
            raise ValueError(
                f"packed_seq_params.{name} must equal its _q twin (self-attention), got "
                f"{kv.tolist()} vs {None if q is None else q.tolist()}"
            )
