"""The single-device MoBA op: ``torch.library`` custom ops with fake (meta) kernels and
registered autograd, and the public ``moba_attn_varlen`` / ``moba_attn_func``. The function
computed is ``docs/semantics.md``, restated in the docstrings below, which are the contract.

Layers: launchers (``kernels.dispatch`` / ``kernels.varlen``) -> the custom ops
``moba_dist::varlen_fwd`` / ``moba_dist::varlen_bwd`` (opaque to ``torch.compile``, so a compiled
caller keeps one graph) with ``register_autograd`` -> the documented public functions.
Host work per call: the forward and the backward each read ``cu_seqlens`` once (one
device-to-host copy) and build the block layout on the host from it.
"""

from typing import Optional

import torch
from einops import rearrange

from moba_dist.checks import (
    check_attention_inputs,
    check_batched_layout,
    check_cu_seqlens,
    check_cu_seqlens_meta,
    check_max_seqlen,
    check_max_seqlen_type,
)
from moba_dist.config import MoBAConfig
from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.dispatch import resolve_backend, routed_backward, routed_forward
from moba_dist.kernels.gate import block_centroids, select_blocks
from moba_dist.kernels.plan_types import RoutedKeys, RoutedProblem
from moba_dist.kernels.varlen import varlen_bwd, varlen_fwd

__all__ = ["moba_attn_func", "moba_attn_varlen", "moba_route"]

Tensor = torch.Tensor


def moba_route(
    q: Tensor, k: Tensor, layout: BlockLayout, topk: int, gate_precision: str = "float32"
) -> Tensor:
    """Gate of the single-device op: routing ``sel [T, Hq, K]`` int32 (see ``kernels.gate``;
    ``gate_precision`` as in :class:`~moba_dist.config.MoBAConfig`)."""
    centroids = block_centroids(k, layout)
    tok = layout.token_block
    return select_blocks(
        q, centroids, tok, layout.block_seq_first[tok], topk, precision=gate_precision
    )


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """Host -> device without a stream sync (pinned, non-blocking) on CUDA."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _layout(cu_seqlens: Tensor, total: int, max_seqlen: int, block_size: int) -> BlockLayout:
    """Validate the offsets' values (one device-to-host read) and build the block layout on the
    host; only the small per-block tables travel, ``token_block`` is searched on the device."""
    cu = check_cu_seqlens(cu_seqlens, total, cu_seqlens.device)
    check_max_seqlen(max_seqlen, cu)
    host = BlockLayout.build(torch.tensor(cu, dtype=torch.int64), block_size)
    device = cu_seqlens.device
    starts = _to_device(host.block_starts, device)
    pos = torch.arange(total, device=device)
    return BlockLayout(
        block_starts=starts,
        block_seq_first=_to_device(host.block_seq_first, device),
        token_block=torch.searchsorted(starts[1:], pos, right=True),
        block_size=block_size,
    )


def _problem(layout: BlockLayout, sel: Tensor, scale: float) -> RoutedProblem:
    """Routed problem of the single-device case: q and k are the same packed tokens, so block
    j's rows are exactly the block's token range."""
    pos = torch.arange(layout.num_tokens, device=sel.device)
    keys = RoutedKeys(block_rows=layout.block_starts, k_pos=pos)
    return RoutedProblem(pos, keys, sel, scale, max_block_rows=layout.block_size)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("moba_dist::varlen_fwd", mutates_args=())
def _fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, chunk: int,
    topk: int, scale: float, backend: str, gate_precision: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``out [T, Hq, D]``, ``lse [Hq, T]``, ``sel [T, Hq, K]`` int32 (saved for backward)."""
    t, hq, _ = q.shape
    name = resolve_backend(backend, q)
    layout = _layout(cu_seqlens, t, max_seqlen, chunk)
    if t == 0:
        sel = torch.empty(0, hq, topk, dtype=torch.int32, device=q.device)
        return q.new_empty(q.shape), q.new_empty((hq, 0), dtype=_lse_dtype(q)), sel
    sel = moba_route(q, k, layout, topk, gate_precision)
    if name == "varlen":
        out, lse = varlen_fwd(q, k, v, layout, sel, scale)
    else:
        out, lse = routed_forward(name, q, k, v, _problem(layout, sel, scale))
    return out, lse, sel


@_fwd_op.register_fake
def _fwd_fake(q, k, v, cu_seqlens, max_seqlen, chunk, topk, scale, backend, gate_precision):
    t, hq, _ = q.shape
    sel = q.new_empty((t, hq, topk), dtype=torch.int32)
    return q.new_empty(q.shape), q.new_empty((hq, t), dtype=_lse_dtype(q)), sel


@torch.library.custom_op("moba_dist::varlen_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor, dlse: Optional[Tensor], q:  # noqa: UP045 (schema inference)
    Tensor, k: Tensor, v: Tensor, out: Tensor,
    lse: Tensor, sel: Tensor, cu_seqlens: Tensor, max_seqlen: int, chunk: int, scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``dq, dk, dv`` in the inputs' dtype; ``dlse`` (None when lse was not used) enters the
    softmax gradient as ``delta - dlse``."""
    if q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    name = resolve_backend(backend, q)
    layout = _layout(cu_seqlens, q.shape[0], max_seqlen, chunk)
    dout = dout.contiguous()
    if name == "varlen":
        if dlse is not None:
            raise NotImplementedError(
                "backend='varlen' cannot differentiate through lse (FlashAttention-2's backward "
                "computes delta itself); use backend='triton' or 'reference', or detach lse"
            )
        dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, layout, sel, scale)
    else:
        prob = _problem(layout, sel, scale)
        dq, dk, dv = routed_backward(
            name, dout, q, k, v, out, lse, prob, grad_dtype=q.dtype, dlse=dlse
        )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_bwd_op.register_fake
def _bwd_fake(dout, dlse, q, k, v, out, lse, sel, cu_seqlens, max_seqlen, chunk, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, max_seqlen, chunk, _topk, scale, backend, _gate_precision = inputs
    out, lse, sel = output
    ctx.save_for_backward(q, k, v, out, lse, sel, cu_seqlens)
    ctx.args = (max_seqlen, chunk, scale, backend)
    # Unused outputs then reach backward as None: no gradient on lse means no dlse term.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, _dsel):
    # The routing is held fixed: no gradient flows through the gate.
    q, k, v, out, lse, sel, cu_seqlens = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, dlse, q, k, v, out, lse, sel, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("moba_dist::varlen_fwd", _backward, setup_context=_setup_context)


def moba_attn_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    *,
    moba_chunk_size: int,
    moba_topk: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    gate_precision: str = "float32",
) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA attention over packed variable-length sequences.

    Args:
        q: ``[T, Hq, D]`` queries; fp16, bf16, fp32 or fp64; any strides.
        k, v: ``[T, Hkv, D]`` keys and values, ``Hq % Hkv == 0`` (GQA/MQA: query head h reads
            KV head ``h // (Hq // Hkv)``; K/V are never repeated).
        cu_seqlens: int32 ``[nseq + 1]`` on q's device, ``0 = cu[0] <= ... <= cu[-1] = T``.
            Sequences never attend to each other; a repeated offset is an empty sequence (as
            padding-free collators emit) and contributes nothing. ``T = 0`` gives empty outputs.
        max_seqlen: int >= the longest sequence (the flash-attn convention).
        moba_chunk_size: block size B >= 1; blocks restart at each sequence's first token.
        moba_topk: K >= 1 blocks per query: its own block (token-level causal) plus the top
            K - 1 strictly-past blocks of its sequence by ``q . mean(k of block)``, scored in
            float32 or better, exact ties to the lower block. K >= the number of blocks gives
            exact causal attention; K = 1 attends to the own block only.
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return ``lse [Hq, T]`` float32 (natural log of the softmax normaliser,
            after scaling). It is differentiable on the reference and triton backends; on
            varlen a gradient reaching it raises ``NotImplementedError``.
        backend: ``"auto"`` (fastest available), ``"reference"`` (pure torch, any device),
            ``"varlen"`` (FlashAttention-2 varlen, CUDA fp16/bf16) or ``"triton"``.
        gate_precision: score precision of the CUDA gate. ``"float32"`` (default) is the
            routing contract above: float32-quality scores, so outside near-ties
            (docs/semantics.md) the selection equals a float64 gate's. Opt-ins, faster and
            less exact: ``"bf16x2"`` (two bf16 centroid pieces) and ``"bf16"`` (one bf16 dot),
            which may pick differently where the (K-1)-th and K-th best scores are closer than
            ``4e-5`` resp. ``1e-2`` times ``|q| * max|centroid|``; measured agreement in
            docs/routing.md. The gate runs exactly (ignoring it) off CUDA, for float64 and for
            head dims the fused gate does not take.

    Returns:
        ``out [T, Hq, D]`` in q's dtype (and ``lse``), differentiable in q, k, v with the routing
        held fixed. Traceable by ``torch.compile(fullgraph=True)`` (the kernels are custom ops).

    Raises:
        TypeError / ValueError naming the argument for bad shapes, dtypes, devices, offsets,
        sizes, backend or gate_precision names; ValueError when an explicit backend cannot run
        here (for a missing triton: "triton is not installed; pip install triton"). Checks of
        the offsets' values run inside the op, when it executes.
    """
    q, k, v = check_attention_inputs(q, k, v, "[T, H, D]")
    check_cu_seqlens_meta(cu_seqlens, q.device)
    check_max_seqlen_type(max_seqlen)
    cfg = MoBAConfig(moba_chunk_size, moba_topk, softmax_scale, backend, gate_precision)
    out, lse, _ = _fwd_op(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, max_seqlen,
        cfg.moba_chunk_size, cfg.moba_topk, cfg.scale_for(q.shape[-1]), cfg.backend,
        cfg.gate_precision,
    )  # fmt: skip
    return (out, lse.float()) if return_lse else out


def moba_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    moba_chunk_size: int,
    moba_topk: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    gate_precision: str = "float32",
) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA attention for a batch of equal-length sequences in the flash-attn layout
    ``[B, S, H, D]`` (sequence before heads; NOT the ``[B, H, S, D]`` of
    ``F.scaled_dot_product_attention``: transpose such tensors with ``.transpose(1, 2)``):
    ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` -> ``out [B, S, Hq, D]`` (and ``lse [B, Hq, S]``
    float32). With equal head counts a ``[B, H, S, D]`` input cannot be told apart and would
    silently attend over the wrong axis; mismatches that reveal it are reported as such.

    Exactly :func:`moba_attn_varlen` on the packed form with ``cu_seqlens = [0, S, 2S, ...]``;
    see it for the semantics, GQA rule, backends, ``gate_precision`` and errors. ``S = 0`` (or
    ``B = 0``) gives empty outputs.
    """
    q, k, v = check_batched_layout(q, k, v)
    bsz, seqlen = q.shape[:2]
    if bsz == 0:
        cu = torch.zeros(2, dtype=torch.int32, device=q.device)
    else:
        cu = torch.arange(bsz + 1, dtype=torch.int32, device=q.device) * seqlen
    out, lse = moba_attn_varlen(
        rearrange(q, "b s h d -> (b s) h d"), rearrange(k, "b s h d -> (b s) h d"),
        rearrange(v, "b s h d -> (b s) h d"), cu, seqlen, moba_chunk_size=moba_chunk_size,
        moba_topk=moba_topk, softmax_scale=softmax_scale, return_lse=True, backend=backend,
        gate_precision=gate_precision,
    )  # fmt: skip
    out = out.view(bsz, seqlen, *out.shape[1:])
    if not return_lse:
        return out
    return out, lse.view(lse.shape[0], bsz, seqlen).transpose(0, 1)
