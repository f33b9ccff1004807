"""The single-device MoBA op: autograd function and the public ``moba_attn_varlen`` /
``moba_attn_func``. The function computed is ``shared/docs/moba_semantics.md``, restated in the
docstrings below, which are the contract.
"""

from __future__ import annotations

import torch
from einops import rearrange

from moba_dist.checks import check_attention_inputs, check_cu_seqlens, check_max_seqlen
from moba_dist.config import MoBAConfig
from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.dispatch import resolve_backend, routed_bwd, routed_fwd
from moba_dist.kernels.gate import block_centroids, select_blocks
from moba_dist.kernels.reference import RoutedKeys
from moba_dist.kernels.varlen import varlen_bwd, varlen_fwd

__all__ = ["moba_attn_func", "moba_attn_varlen", "moba_route"]


def moba_route(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, topk: int) -> torch.Tensor:
    """Gate of the single-device op: routing ``sel [T, Hq, K]`` int32 (see ``kernels.gate``)."""
    centroids = block_centroids(k, layout)
    tok = layout.token_block
    return select_blocks(q, centroids, tok, layout.block_seq_first[tok], topk)


def _aligned_keys(layout: BlockLayout, device: torch.device) -> tuple[torch.Tensor, RoutedKeys]:
    """Positions and routed-key description of the single-device case: q and k are the same
    packed tokens, so block j's rows are exactly the block's token range."""
    pos = torch.arange(layout.num_tokens, device=device)
    return pos, RoutedKeys(block_rows=layout.block_starts, k_pos=pos)


class MoBAVarlenFunction(torch.autograd.Function):
    """Autograd for packed MoBA. The routing is computed once in forward and reused in backward
    (no gradient flows through the gate); the lse output is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, topk: int, scale: float, backend: str):
        sel = moba_route(q, k, layout, topk)
        if backend == "varlen":
            out, lse = varlen_fwd(q, k, v, layout, sel, scale)
        else:
            pos, keys = _aligned_keys(layout, q.device)
            out, lse = routed_fwd(backend, q, k, v, pos, keys, sel, scale)
        ctx.save_for_backward(q, k, v, out, lse, sel)
        ctx.layout, ctx.scale, ctx.backend = layout, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sel = ctx.saved_tensors
        dout = dout.contiguous()
        if ctx.backend == "varlen":
            dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, ctx.layout, sel, ctx.scale)
        else:
            pos, keys = _aligned_keys(ctx.layout, q.device)
            dq, dk, dv = routed_bwd(
                ctx.backend, dout, q, k, v, out, lse, pos, keys, sel, ctx.scale, grad_dtype=q.dtype
            )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def moba_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    moba_chunk_size: int,
    moba_topk: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention over packed variable-length sequences.

    Args:
        q: ``[T, Hq, D]`` queries; fp16, bf16, fp32 or fp64; any strides.
        k, v: ``[T, Hkv, D]`` keys and values, ``Hq % Hkv == 0`` (GQA/MQA: query head h reads
            KV head ``h // (Hq // Hkv)``; K/V are never repeated).
        cu_seqlens: int32 ``[nseq + 1]`` on q's device, ``0 = cu[0] < ... < cu[-1] = T``.
            Sequences never attend to each other.
        max_seqlen: int >= the longest sequence (the flash-attn convention).
        moba_chunk_size: block size B >= 1; blocks restart at each sequence's first token.
        moba_topk: K >= 1 blocks per query: its own block (token-level causal) plus the top
            K - 1 strictly-past blocks of its sequence by ``q . mean(k of block)``, scored in
            float32 or better, exact ties to the lower block. K >= the number of blocks gives
            exact causal attention; K = 1 attends to the own block only.
        softmax_scale: default ``D ** -0.5``.
        return_lse: also return ``lse [Hq, T]`` float32 (natural log of the softmax normaliser,
            after scaling); it is not differentiable.
        backend: ``"auto"`` (fastest available), ``"reference"`` (pure torch, any device),
            ``"varlen"`` (FlashAttention-2 varlen, CUDA fp16/bf16) or ``"triton"``.

    Returns:
        ``out [T, Hq, D]`` in q's dtype (and ``lse``), differentiable in q, k, v with the routing
        held fixed.

    Raises:
        TypeError / ValueError naming the argument for bad shapes, dtypes, devices, offsets,
        sizes or backend names; ValueError when an explicit backend cannot run here.
    """
    q, k, v = check_attention_inputs(q, k, v, "[T, H, D]")
    cu = check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    check_max_seqlen(max_seqlen, cu)
    cfg = MoBAConfig(moba_chunk_size, moba_topk, softmax_scale, backend)
    name = resolve_backend(cfg.backend, q)
    layout = BlockLayout.build(cu_seqlens, cfg.moba_chunk_size)
    out, lse = MoBAVarlenFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), layout, cfg.moba_topk,
        cfg.scale_for(q.shape[-1]), name,
    )  # fmt: skip
    return (out, lse.float()) if return_lse else out


def moba_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    moba_chunk_size: int,
    moba_topk: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """MoBA attention for a batch of equal-length sequences: ``q [B, S, Hq, D]``,
    ``k, v [B, S, Hkv, D]`` -> ``out [B, S, Hq, D]`` (and ``lse [B, Hq, S]`` float32).

    Exactly :func:`moba_attn_varlen` on the packed form with ``cu_seqlens = [0, S, 2S, ...]``;
    see it for the semantics, GQA rule, backends and errors.
    """
    q, k, v = check_attention_inputs(q, k, v, "[B, S, H, D]")
    bsz, seqlen = q.shape[:2]
    if bsz == 0 or seqlen == 0:
        raise ValueError(f"q must have B >= 1 and S >= 1, got shape {tuple(q.shape)}")
    cu = torch.arange(0, (bsz + 1) * seqlen, seqlen, dtype=torch.int32, device=q.device)
    out, lse = moba_attn_varlen(
        rearrange(q, "b s h d -> (b s) h d"), rearrange(k, "b s h d -> (b s) h d"),
        rearrange(v, "b s h d -> (b s) h d"), cu, seqlen, moba_chunk_size=moba_chunk_size,
        moba_topk=moba_topk, softmax_scale=softmax_scale, return_lse=True, backend=backend,
    )  # fmt: skip
    out = rearrange(out, "(b s) h d -> b s h d", b=bsz)
    if not return_lse:
        return out
    return out, rearrange(lse, "h (b s) -> b h s", b=bsz)
