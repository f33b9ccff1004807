"""Head-parallel context-parallel MoBA (``strategy="heads"``, DeepSpeed-Ulysses style).

One all-to-all per tensor turns the sequence shards ``[T_local, H, D]`` into head shards
``[T, H / P, D]``: every rank then holds the whole packed batch for ``Hq / P`` query heads and
runs the single-device op on it (routing, blocks and sequences exactly as without CP), and one
all-to-all turns the output back into sequence shards. No K/V row is fetched by routing: the
bytes depend only on the shapes, ``(P - 1) / P`` of every q, k, v and out shard, whatever the
gate picks.

KV heads: rank r's query heads ``[r Hq/P, (r+1) Hq/P)`` read KV heads ``h // (Hq / Hkv)``. When
P divides Hkv those are disjoint slices of Hkv / P heads; otherwise a KV head read by query heads
of several ranks is sent to each of them (replicated), and the backward sums its gradients from
those ranks, in float32 and a fixed rank order (repeatable).

Needs ``Hq % P == 0``. The exchanges run through ``moba_dist.parallel.comm`` (staged through
the host for CUDA tensors on gloo).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from moba_dist.checks import check_attention_inputs
from moba_dist.config import BACKENDS, GATE_PRECISIONS, MoBAConfig
from moba_dist.ops import moba_attn_varlen
from moba_dist.parallel import comm
from moba_dist.parallel.handshake import agree_or_raise, cu_hash
from moba_dist.parallel.layouts import LAYOUTS, check_layout, local_positions

__all__ = [
    "HEADS_FIELDS",
    "Heads",
    "HeadsPlan",
    "heads_bytes",
    "moba_heads_attn_varlen",
    "moba_hybrid_attn_varlen",
    "plan_heads",
]

#: What the ranks agree on before the first exchange (one all-gather of ints).
HEADS_FIELDS = (
    "valid", "world_size", "moba_chunk_size", "moba_topk", "layout", "backend", "T", "nseq",
    "cu_seqlens_hash", "T_local", "Hq", "Hkv", "head_dim", "dtype", "softmax_scale",
    "gate_precision",
)  # fmt: skip
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Span = tuple[int, int]  # heads [start, stop)


@dataclass(frozen=True, eq=False)
class HeadsPlan:
    """Who holds which heads, and where the received rows go.

    Attributes:
        group, rank, world, t_local: the exchange group (the CP group; for ``hybrid`` the
            sub-group), this rank in it, its size, tokens per sequence shard.
        q_heads: per rank, its query heads ``[start, stop)`` (disjoint, Hq / P each).
        kv_heads: per rank, the KV heads its query heads read (overlapping when P does not
            divide Hkv: those heads are replicated).
        kv_index: local KV head of each local query head when the op's own GQA mapping
            (``i // (nq / nkv)``) does not give it, else None.
        order: ``[n]`` stream row of every held token in ascending position (the received
            stream is source-rank major, each source in its shard order); ``back`` its inverse.
            Both None when the stream is already ascending (contiguous layout).
        max_seqlen: longest sequence of the batch.
    """

    group: Any
    rank: int
    world: int
    t_local: int
    q_heads: tuple[Span, ...]
    kv_heads: tuple[Span, ...]
    kv_index: torch.Tensor | None
    order: torch.Tensor | None
    back: torch.Tensor | None
    max_seqlen: int

    @property
    def kv_replicated(self) -> bool:
        """True when some KV head is sent to more than one rank."""
        return sum(b - a for a, b in self.kv_heads) > self.kv_heads[-1][1]


def _spans(hq: int, hkv: int, world: int) -> tuple[tuple[Span, ...], tuple[Span, ...]]:
    nq, group = hq // world, hq // hkv
    q = tuple((r * nq, (r + 1) * nq) for r in range(world))
    kv = tuple((a // group, (b - 1) // group + 1) for a, b in q)
    return q, kv


def plan_heads(
    cu_seqlens: torch.Tensor, hq: int, hkv: int, group: Any, layout: str, device: torch.device,
    outer_rank: int = 0, outer_world: int = 1,
) -> HeadsPlan:  # fmt: skip
    """The head split and stream order for ``Hq`` query and ``Hkv`` KV heads over ``group``
    (no collective; inputs already validated: ``Hq % P == 0``, ``cu_seqlens`` fits ``layout``).

    Member j of ``group`` holds the sequence shard of rank ``outer_rank * P + j`` of
    ``outer_world * P`` ranks (``hybrid``: ``group`` is one of ``outer_world`` sub-groups)."""
    rank, world = comm.group_rank_and_size(group)
    q, kv = _spans(hq, hkv, world)
    (a, b), (g0, g1) = q[rank], kv[rank]
    want = (torch.arange(a, b) // (hq // hkv)) - g0
    fits = (b - a) % (g1 - g0) == 0 and bool(
        (want == torch.arange(b - a) // ((b - a) // (g1 - g0))).all()
    )
    cu = cu_seqlens.cpu()
    total = world * outer_world
    pos = torch.cat([
        local_positions(cu, rank=outer_rank * world + j, world_size=total, layout=layout)
        for j in range(world)
    ])  # fmt: skip
    order = back = None
    if not bool((pos[1:] > pos[:-1]).all()):
        order = torch.argsort(pos)
        back = torch.argsort(order)
        order, back = order.to(device), back.to(device)
    return HeadsPlan(
        group=group, rank=rank, world=world, t_local=int(cu[-1]) // total, q_heads=q,
        kv_heads=kv, kv_index=None if fits else want.to(device), order=order, back=back,
        max_seqlen=int((cu[1:] - cu[:-1]).max()),
    )  # fmt: skip


def _to_heads(x: torch.Tensor, plan: HeadsPlan, spans: tuple[Span, ...]) -> torch.Tensor:
    """Sequence shard ``[T_local, H, ...]`` -> this rank's heads of the group's tokens
    ``[P T_local, n, ...]`` in ascending position."""
    tail, tl = x.shape[2:], plan.t_local
    row = math.prod(tail)
    send = torch.cat([x[:, a:b].reshape(-1, row) for a, b in spans])
    a, b = spans[plan.rank]
    n = b - a
    recv = comm.all_to_all_variable(
        send, [tl * (e - s) for s, e in spans], [tl * n] * plan.world, plan.group
    )
    stream = recv.view(plan.world * tl, n, *tail)
    return stream if plan.order is None else stream[plan.order]


def _to_seq(xh: torch.Tensor, plan: HeadsPlan, spans: tuple[Span, ...]) -> torch.Tensor:
    """Head shard ``[P T_local, n, ...]`` -> this rank's tokens of every head ``[T_local, H,
    ...]``; heads held by several ranks (replicated KV) are summed in float32, in rank order."""
    tail, tl = xh.shape[2:], plan.t_local
    stream = xh if plan.back is None else xh[plan.back]
    row = math.prod(tail)
    a, b = spans[plan.rank]
    sizes = [tl * (e - s) for s, e in spans]
    recv = comm.all_to_all_variable(
        stream.reshape(-1, row), [tl * (b - a)] * plan.world, sizes, plan.group
    )
    parts = [p.view(tl, e - s, *tail) for p, (s, e) in zip(recv.split(sizes), spans, strict=True)]
    if all(spans[r][1] == spans[r + 1][0] for r in range(plan.world - 1)):
        return torch.cat(parts, dim=1)  # a partition: every head from exactly one rank
    acc_dtype = torch.float64 if xh.dtype == torch.float64 else torch.float32
    acc = xh.new_zeros((tl, spans[-1][1], *tail), dtype=acc_dtype)
    for p, (s, e) in zip(parts, spans, strict=True):
        acc[:, s:e] += p.to(acc_dtype)
    return acc.to(xh.dtype)


class _SeqToHeads(torch.autograd.Function):
    """Sequence shards -> head shards; the backward returns (and sums) the gradients."""

    @staticmethod
    def forward(ctx, x, plan: HeadsPlan, spans: tuple[Span, ...]):
        ctx.plan, ctx.spans = plan, spans
        return _to_heads(x, plan, spans)

    @staticmethod
    def backward(ctx, grad):
        return _to_seq(grad.contiguous(), ctx.plan, ctx.spans), None, None


class _HeadsToSeq(torch.autograd.Function):
    """Head shards -> sequence shards (disjoint heads); the backward is the forward exchange."""

    @staticmethod
    def forward(ctx, xh, plan: HeadsPlan, spans: tuple[Span, ...]):
        ctx.plan, ctx.spans = plan, spans
        return _to_seq(xh, plan, spans)

    @staticmethod
    def backward(ctx, grad):
        return _to_heads(grad.contiguous(), ctx.plan, ctx.spans), None, None


def heads_bytes(plan: HeadsPlan, head_dim: int, elem: int, grad_elem: int) -> dict[str, int]:
    """Payload bytes this rank sends and receives to and from other ranks (self-copies are not
    traffic), forward (q, k, v in, out back) and backward (dout in, dq, dk, dv back)."""
    me = plan.rank
    size = [b - a for a, b in plan.q_heads], [b - a for a, b in plan.kv_heads]
    others = [r for r in range(plan.world) if r != me]
    row = plan.t_local * head_dim
    q_out = sum(size[0][r] for r in others) * row  # my tokens of other ranks' query heads
    q_in = len(others) * size[0][me] * row  # other ranks' tokens of my query heads
    kv_out = 2 * sum(size[1][r] for r in others) * row
    kv_in = 2 * len(others) * size[1][me] * row
    return {
        "bytes_sent": (q_out + kv_out) * elem + q_in * elem,
        "bytes_received": (q_in + kv_in) * elem + q_out * elem,
        "bwd_bytes_sent": q_out * elem + (q_in + kv_in) * grad_elem,
        "bwd_bytes_received": q_in * elem + (q_out + kv_out) * grad_elem,
    }


def _fingerprint(q, k, cu, world: int, cfg: dict) -> list[int]:
    scale = struct.unpack("<q", struct.pack("<d", float(cfg["softmax_scale"] or 0.0)))[0]
    return [
        1, world, cfg["moba_chunk_size"], cfg["moba_topk"], LAYOUTS.index(cfg["layout"]),
        BACKENDS.index(cfg["backend"]), int(cu[-1]), cu.numel() - 1, cu_hash(cu), q.shape[0],
        q.shape[1], k.shape[1], q.shape[2], _DTYPES.index(q.dtype), scale,
        GATE_PRECISIONS.index(cfg["gate_precision"]),
    ]  # fmt: skip


def _validate(q, k, v, cu_seqlens, world: int, heads_world: int, cfg: dict) -> list[int]:
    """This rank's checks (raise with the argument, expected and given); its fingerprint.
    ``world`` ranks shard the sequence, ``heads_world`` of them split the heads."""
    q, k, v = check_attention_inputs(q, k, v, "[T_local, H, D]")
    MoBAConfig(cfg["moba_chunk_size"], cfg["moba_topk"], cfg["softmax_scale"], cfg["backend"],
               cfg["gate_precision"])  # fmt: skip
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
        got = getattr(cu_seqlens, "dtype", type(cu_seqlens).__name__)
        raise TypeError(f"cu_seqlens must be an int32 tensor (the global offsets), got {got}")
    cu = cu_seqlens.cpu()
    check_layout(cu, world_size=world, layout=cfg["layout"])
    if q.shape[1] % heads_world:
        raise ValueError(
            f"strategy='{cfg['name']}' needs the query heads divisible by the ranks that split "
            f"them: Hq={q.shape[1]} over {heads_world} ranks; use a group size dividing Hq or "
            "another strategy"
        )
    if q.shape[0] * world != int(cu[-1]):
        raise ValueError(
            f"q/k/v must be this rank's shard of {int(cu[-1])} tokens over {world} ranks "
            f"({int(cu[-1]) // world} tokens, as moba_dist.parallel.shard returns), got "
            f"{q.shape[0]}"
        )
    return _fingerprint(q, k, cu, world, cfg)


@torch.compiler.disable
def moba_heads_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    moba_chunk_size: int,
    moba_topk: int,
    process_group: Any = None,
    layout: str = "contiguous",
    softmax_scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    stats: dict | None = None,
    gate_precision: str = "float32",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel MoBA by head parallelism: ``moba_attn_varlen`` on the unsharded batch.

    Args:
        q: ``[T_local, Hq, D]`` this rank's shard (``moba_dist.parallel.shard``); ``k, v``:
            ``[T_local, Hkv, D]``; ``Hq`` must be a multiple of the group size.
        cu_seqlens: the global packed offsets, int32 ``[nseq + 1]``, identical on every rank.
        moba_chunk_size, moba_topk, softmax_scale, backend, gate_precision: as in
            ``moba_attn_varlen`` (the local op's, run on the whole batch for ``Hq / P`` heads).
        process_group: the CP group (``None``: the default group).
        layout: ``"contiguous"`` or ``"zigzag"``, the split of ``q, k, v``.
        return_lse: also return ``lse [Hq, T_local]`` float32 (not differentiable; one more
            exchange).
        stats: optional dict filled with ``strategy``, ``world_size`` and this rank's payload
            bytes (``bytes_sent``, ``bytes_received``, ``bwd_bytes_sent``,
            ``bwd_bytes_received``: see :func:`heads_bytes`; gradients travel in k's dtype).

    Returns:
        ``out [T_local, Hq, D]`` in q's dtype (and lse); autograd for the local q, k, v.

    Raises:
        ValueError/TypeError on every rank when any rank's inputs are invalid (``Hq % P != 0``
        included) or the ranks disagree (checked by the first collective: no rank hangs).
    """
    group = comm.resolve_group(process_group)
    rank, world = comm.group_rank_and_size(group)
    cfg = dict(moba_chunk_size=moba_chunk_size, moba_topk=moba_topk, layout=layout,
               softmax_scale=softmax_scale, backend=backend, gate_precision=gate_precision,
               name="heads")  # fmt: skip
    check = lambda: _validate(q, k, v, cu_seqlens, world, world, cfg)  # noqa: E731
    agree_or_raise(check, group, rank, HEADS_FIELDS)
    plan = plan_heads(cu_seqlens, q.shape[1], k.shape[1], group, layout, q.device)
    qh = _SeqToHeads.apply(q.contiguous(), plan, plan.q_heads)
    kh = _SeqToHeads.apply(k.contiguous(), plan, plan.kv_heads)
    vh = _SeqToHeads.apply(v.contiguous(), plan, plan.kv_heads)
    if plan.kv_index is not None:  # local query heads straddle KV groups: one KV head each
        kh, vh = kh.index_select(1, plan.kv_index), vh.index_select(1, plan.kv_index)
    out_h, lse_h = moba_attn_varlen(
        qh, kh, vh, cu_seqlens.to(q.device), plan.max_seqlen, moba_chunk_size=moba_chunk_size,
        moba_topk=moba_topk, softmax_scale=softmax_scale, return_lse=True, backend=backend,
        gate_precision=gate_precision,
    )  # fmt: skip
    out = _HeadsToSeq.apply(out_h, plan, plan.q_heads)
    if stats is not None:
        stats.update(strategy="heads", world_size=world, kv_replicated=plan.kv_replicated)
        stats.update(heads_bytes(plan, q.shape[2], k.element_size(), k.element_size()))
    if not return_lse:
        return out
    return out, _lse_to_seq(lse_h, plan)


def _lse_to_seq(lse_h: torch.Tensor, plan: HeadsPlan) -> torch.Tensor:
    """``lse [n, P T_local]`` of the head shard -> ``[Hq, T_local]`` (no gradient)."""
    return _to_seq(lse_h.detach().t().contiguous(), plan, plan.q_heads).t().contiguous()


@torch.compiler.disable
def moba_hybrid_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    moba_chunk_size: int,
    moba_topk: int,
    inner_group: Any,
    outer_group: Any,
    process_group: Any = None,
    layout: str = "contiguous",
    softmax_scale: float | None = None,
    backend: str = "auto",
    outer_strategy: str = "auto",
    return_lse: bool = False,
    stats: dict | None = None,
    gate_precision: str = "float32",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hybrid context-parallel MoBA (``strategy="hybrid"``, as USP does for dense attention):
    ``heads`` inside ``inner_group`` (S ranks, e.g. the GPUs of one node) around sequence CP
    (``moba_cp_attn_varlen`` with ``outer_strategy``) across ``outer_group`` (the G ranks that
    hold the same heads). Only ``Hkv / S`` KV heads (or the replicated ones) cross the outer
    group, so bytes between nodes fall by about S.

    Rank layout: with inner rank i and outer rank g, this rank holds the sequence shard of rank
    ``g * S + i`` of ``S * G`` (``shard(x, cu, rank=g * S + i, world_size=S * G,
    layout=layout)``); the inner group's shards together form the outer layout's shard g (true
    for both layouts). ``process_group`` holds all ``S * G`` ranks (default: the default group):
    the ranks agree there first, so a bad input on any rank makes every rank raise.

    Args: as :func:`moba_heads_attn_varlen`; ``Hq % S == 0``. ``stats`` gets ``strategy``
    ("hybrid"), ``outer_strategy`` (taken), the four byte counts (inner exchanges plus the
    outer call's), and the outer call's own statistics under ``outer``.
    """
    from moba_dist.parallel.cp import moba_cp_attn_varlen  # cp may import this module

    inner, outer = comm.resolve_group(inner_group), comm.resolve_group(outer_group)
    whole = comm.resolve_group(process_group)
    (i, sub), (g, groups) = comm.group_rank_and_size(inner), comm.group_rank_and_size(outer)
    cfg = dict(moba_chunk_size=moba_chunk_size, moba_topk=moba_topk, layout=layout,
               softmax_scale=softmax_scale, backend=backend, gate_precision=gate_precision,
               name="hybrid")  # fmt: skip

    me = comm.group_rank_and_size(whole)[0]

    def check() -> list[int]:
        if comm.group_size(whole) != sub * groups or me != g * sub + i:
            raise ValueError(
                f"inner_group (rank {i} of {sub}) and outer_group (rank {g} of {groups}) must "
                f"split process_group as rank = outer rank * {sub} + inner rank (inner groups "
                f"of consecutive ranks), got rank {me} of {comm.group_size(whole)}"
            )
        return _validate(q, k, v, cu_seqlens, sub * groups, sub, cfg)

    agree_or_raise(check, whole, me, HEADS_FIELDS)
    plan = plan_heads(cu_seqlens, q.shape[1], k.shape[1], inner, layout, q.device, g, groups)
    qh = _SeqToHeads.apply(q.contiguous(), plan, plan.q_heads)
    kh = _SeqToHeads.apply(k.contiguous(), plan, plan.kv_heads)
    vh = _SeqToHeads.apply(v.contiguous(), plan, plan.kv_heads)
    if plan.kv_index is not None:
        kh, vh = kh.index_select(1, plan.kv_index), vh.index_select(1, plan.kv_index)
    outer_stats: dict[str, Any] = {}
    out_h, lse_h = moba_cp_attn_varlen(
        qh, kh, vh, cu_seqlens.to(q.device), moba_chunk_size=moba_chunk_size,
        moba_topk=moba_topk, process_group=outer, layout=layout, softmax_scale=softmax_scale,
        strategy=outer_strategy, backend=backend, return_lse=True, stats=outer_stats,
        gate_precision=gate_precision,
    )  # fmt: skip
    out = _HeadsToSeq.apply(out_h, plan, plan.q_heads)
    if stats is not None:
        inner_bytes = heads_bytes(plan, q.shape[2], k.element_size(), k.element_size())
        stats.update(strategy="hybrid", world_size=sub * groups, sub_group_size=sub,
                     outer_strategy=outer_stats.get("strategy"), outer=outer_stats,
                     kv_replicated=plan.kv_replicated)  # fmt: skip
        stats.update({key: n + outer_stats.get(key, 0) for key, n in inner_bytes.items()})
    return (out, _lse_to_seq(lse_h, plan)) if return_lse else out


class Heads:
    """``strategy="heads"`` for the CP runtime (``moba_dist.parallel.cp``): a whole-call
    strategy. Unlike the routed strategies it needs no routing, centroids or fetch plan before
    its exchange (the local op routes on whole sequences), so the runtime calls :meth:`run`
    instead of ``route`` + ``plan``. ``run`` returns ``(out, lse, traffic)``: ``traffic`` holds
    the four byte counts of ``last_stats`` (:func:`heads_bytes`)."""

    name = "heads"

    @staticmethod
    def run(q, k, v, ctx: Any, cfg: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """One call on the batch of ``ctx`` (a ``CPContext``) with ``cfg`` (a ``CPConfig``);
        the ranks agree on the layer's shapes first (one small all-gather)."""
        stats: dict[str, Any] = {}
        out, lse = moba_heads_attn_varlen(
            q, k, v, ctx.cu_seqlens, moba_chunk_size=cfg.moba_chunk_size,
            moba_topk=cfg.moba_topk, process_group=ctx.group, layout=ctx.layout,
            softmax_scale=cfg.softmax_scale, backend=cfg.backend, return_lse=True, stats=stats,
            gate_precision=cfg.gate_precision,
        )  # fmt: skip
        keys = ("bytes_sent", "bytes_received", "bwd_bytes_sent", "bwd_bytes_received")
        return out, lse, {key: stats[key] for key in keys}
