"""MoBA on FlashAttention-2 varlen kernels: the two-call algorithm of the public MoBA code.

1. Own block, causal: one varlen call whose "sequences" are the blocks.
2. Selected past blocks: for every KV head g, the (query, head) pairs of g's query heads that
   chose block j are gathered and sorted by j, so one non-causal varlen call over the head-major
   keys ``k[:, g]`` (one "sequence" per block) covers them all. Queries are gathered per KV head,
   never K/V repeated to Hq heads (native GQA).
3. Merge by log-sum-exp in float32.

Tokens are processed in block-aligned chunks sized so no intermediate tensor or kernel call passes
2^31 elements (the gathered queries number T * Hq * (K - 1): 5.9e9 at 128K tokens, 32 heads,
K = 12). The backward feeds the merged out and lse to every partial FA2 backward, which makes the
partial gradients exact shares of the full one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.flash import flash_varlen_bwd, flash_varlen_fwd

__all__ = ["varlen_bwd", "varlen_fwd"]

# Elements per chunk of gathered queries (and of any per-chunk tensor): far below 2^31.
_CHUNK_ELEMS = 1 << 28


@dataclass(frozen=True)
class _Gather:
    """Selections of one (token chunk, KV head), sorted by block: ``flat`` indexes ``q.view(T *
    Hq, D)``; ``cu_q`` int32 ``[N + 1]`` cuts them per block; ``max_q`` the largest block group."""

    flat: torch.Tensor
    cu_q: torch.Tensor
    max_q: int


def _chunks(layout: BlockLayout, hq: int, topk: int, d: int) -> list[tuple[int, int]]:
    """Block-aligned token ranges with at most ``_CHUNK_ELEMS`` gathered query elements each."""
    max_tokens = max(1, _CHUNK_ELEMS // (hq * topk * d))
    ranges, begin, prev = [], 0, 0
    for s in layout.block_starts.tolist()[1:]:
        if s - begin > max_tokens and prev > begin:
            ranges.append((begin, prev))
            begin = prev
        prev = s
    if prev > begin:
        ranges.append((begin, prev))
    return ranges


def _gather(sel: torch.Tensor, t0: int, g: int, group: int, num_blocks: int) -> _Gather | None:
    """Past-block selections of tokens ``[t0, t0 + C)`` and query heads of KV head ``g``."""
    hq, k = sel.shape[1:]
    part = sel[:, g * group : (g + 1) * group, 1:].reshape(-1).to(torch.int64)
    idx = (part >= 0).nonzero().squeeze(1)
    if idx.numel() == 0:
        return None
    blocks = part[idx]
    order = torch.sort(blocks, stable=True).indices
    idx, blocks = idx[order], blocks[order]
    t = t0 + idx // (group * (k - 1))
    h = g * group + (idx // (k - 1)) % group
    counts = torch.bincount(blocks, minlength=num_blocks)
    cu_q = torch.zeros(num_blocks + 1, dtype=torch.int32, device=sel.device)
    torch.cumsum(counts, 0, out=cu_q[1:])
    return _Gather(flat=t * hq + h, cu_q=cu_q, max_q=int(counts.max()))


def _merge(o_own, lse_own, parts):
    """LSE-merge the own-block result ``[C, Hq, D]`` / ``[Hq, C]`` with gathered partials.

    ``parts``: list of (dest flat index in ``[C * Hq]``, out ``[n, D]``, lse ``[n]``). The own part
    always holds the query itself, so its lse is finite and anchors the max.
    """
    c, hq, d = o_own.shape
    lse = lse_own.t().reshape(c * hq).float()
    if not parts:
        return o_own, lse_own
    dest = torch.cat([p[0] for p in parts])
    o_sel = torch.cat([p[1] for p in parts]).float()
    l_sel = torch.cat([p[2] for p in parts]).float()
    m = lse.scatter_reduce(0, dest, l_sel, reduce="amax")
    w_own = torch.exp(lse - m)
    w_sel = torch.exp(l_sel - m[dest])
    total = w_own.index_add(0, dest, w_sel)
    acc = (o_own.reshape(c * hq, d).float() * w_own[:, None]).index_add(
        0, dest, o_sel * w_sel[:, None]
    )
    out = (acc / total[:, None]).view(c, hq, d).to(o_own.dtype)
    return out, (m + torch.log(total)).view(c, hq).t().contiguous()


def varlen_fwd(q, k, v, layout: BlockLayout, sel, softmax_scale: float):
    """``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` (contiguous), routing ``sel [T, Hq, K]`` ->
    ``out [T, Hq, D]``, ``lse [Hq, T]`` float32."""
    t_all, hq, d = q.shape
    hkv = k.shape[1]
    group, topk, bsz = hq // hkv, sel.shape[2], layout.block_size
    out = torch.empty_like(q)
    lse = torch.empty(hq, t_all, dtype=torch.float32, device=q.device)
    k_hm, v_hm = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    cu_blocks = layout.block_starts.to(torch.int32)
    qf = q.view(t_all * hq, d)
    for t0, t1 in _chunks(layout, hq, topk, d):
        cu = _chunk_offsets(layout, t0, t1)
        o_own, l_own = flash_varlen_fwd(
            q[t0:t1], k[t0:t1], v[t0:t1], cu, cu, bsz, bsz, softmax_scale, causal=True
        )
        parts = []
        for g in range(hkv if topk > 1 else 0):
            gat = _gather(sel[t0:t1], t0, g, group, layout.num_blocks)
            if gat is None:
                continue
            o_g, l_g = flash_varlen_fwd(
                qf[gat.flat].unsqueeze(1), k_hm[g].unsqueeze(1), v_hm[g].unsqueeze(1),
                gat.cu_q, cu_blocks, gat.max_q, bsz, softmax_scale, causal=False,
            )  # fmt: skip
            parts.append((gat.flat - t0 * hq, o_g.squeeze(1), l_g.squeeze(0)))
        out[t0:t1], lse[:, t0:t1] = _merge(o_own, l_own, parts)
    return out, lse


def varlen_bwd(dout, q, k, v, out, lse, layout: BlockLayout, sel, softmax_scale: float):
    """Gradients of :func:`varlen_fwd`: ``dq [T, Hq, D]``, ``dk, dv [T, Hkv, D]`` (q's dtype)."""
    hq, d = q.shape[1:]
    hkv = k.shape[1]
    group, topk, bsz = hq // hkv, sel.shape[2], layout.block_size
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    k_hm, v_hm = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    cu_blocks = layout.block_starts.to(torch.int32)
    qf, of, dof = q.view(-1, d), out.view(-1, d), dout.view(-1, d)
    lse_f = lse.t().reshape(-1)
    for t0, t1 in _chunks(layout, hq, topk, d):
        cu = _chunk_offsets(layout, t0, t1)
        dq_c, dk_c, dv_c = flash_varlen_bwd(
            dout[t0:t1], q[t0:t1], k[t0:t1], v[t0:t1], out[t0:t1],
            lse[:, t0:t1].contiguous(), cu, cu, bsz, bsz, softmax_scale, causal=True,
        )  # fmt: skip
        dq_acc = dq_c.float().view(-1, d)
        dk[t0:t1] += dk_c.float()
        dv[t0:t1] += dv_c.float()
        for g in range(hkv if topk > 1 else 0):
            gat = _gather(sel[t0:t1], t0, g, group, layout.num_blocks)
            if gat is None:
                continue
            dq_g, dk_g, dv_g = flash_varlen_bwd(
                dof[gat.flat].unsqueeze(1), qf[gat.flat].unsqueeze(1), k_hm[g].unsqueeze(1),
                v_hm[g].unsqueeze(1), of[gat.flat].unsqueeze(1),
                lse_f[gat.flat].unsqueeze(0).contiguous(), gat.cu_q, cu_blocks, gat.max_q, bsz,
                softmax_scale, causal=False,
            )  # fmt: skip
            dq_acc.index_add_(0, gat.flat - t0 * hq, dq_g.squeeze(1).float())
            dk[:, g] += dk_g.squeeze(1).float()
            dv[:, g] += dv_g.squeeze(1).float()
        dq[t0:t1] = dq_acc.view(t1 - t0, hq, d).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _chunk_offsets(layout: BlockLayout, t0: int, t1: int) -> torch.Tensor:
    """int32 block offsets inside the token range ``[t0, t1)`` (block-aligned), relative to t0."""
    starts = layout.block_starts
    inside = starts[(starts >= t0) & (starts <= t1)]
    return (inside - t0).to(torch.int32)
