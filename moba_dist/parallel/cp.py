"""Context-parallel MoBA: the autograd function, ``moba_cp_attn_varlen`` and
``MoBAContextParallel``.

Per call (design.md): handshake -> global centroids -> routing -> fetch plan -> launch the K/V
transfer -> attend to local keys while it flies -> attend to fetched keys -> LSE merge. The
backward reuses the routing, keeps dQ local, fetches the rows again (or reuses them with
``keep_fetched=True``) and returns dK/dV of fetched rows to their owners in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moba_dist.checks import check_attention_inputs
from moba_dist.config import MoBAConfig
from moba_dist.kernels.dispatch import resolve_backend, routed_backward, routed_forward
from moba_dist.kernels.plan_types import RoutedProblem
from moba_dist.parallel import comm
from moba_dist.parallel.context import CPContext
from moba_dist.parallel.exchange import return_grads, start_fetch
from moba_dist.parallel.handshake import STRATEGIES, agree_or_raise, fingerprint
from moba_dist.parallel.layouts import LAYOUTS
from moba_dist.parallel.plan import CPPlan, make_plan
from moba_dist.parallel.stats import call_stats as record_stats

__all__ = ["STRATEGIES", "MoBAContextParallel", "moba_cp_attn_varlen"]


def merge_lse(o1, l1, o2, l2):
    """Combine two partial attentions over disjoint key sets (``o [T, H, D]``, ``lse [H, T]``)
    in float32. A part without keys has lse = -inf; shifting by 0 there avoids -inf - -inf."""
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    total = w1 + w2
    out = o1.to(w1.dtype) * w1.t()[..., None] + o2.to(w1.dtype) * w2.t()[..., None]
    out = out / total.clamp_min(torch.finfo(total.dtype).tiny).t()[..., None]
    lse = torch.where(total > 0, m + torch.log(total), torch.full_like(m, float("-inf")))
    return out.to(o1.dtype), lse


class MoBACPFunction(torch.autograd.Function):
    """Autograd of one CP call; the plan (routing, fetch lists) is built outside and reused."""

    @staticmethod
    def forward(ctx, q, k, v, plan: CPPlan, scale: float, backend: str, keep: bool):
        q_pos = plan.own.positions
        fetch = start_fetch(plan, k, v)
        o1, l1 = routed_forward(
            backend, q, k, v, RoutedProblem(q_pos, plan.local_keys, plan.sel, scale)
        )
        fetched = fetch()
        if fetched.keys.k_pos.numel() == 0:
            # Nothing fetched (a host-known count, no sync): the local part is the result; the
            # exchange itself still ran, on every rank.
            out, lse = o1, l1
        else:
            prob = RoutedProblem(q_pos, fetched.keys, plan.sel, scale)
            o2, l2 = routed_forward(backend, q, fetched.k, fetched.v, prob)
            out, lse = merge_lse(o1, l1, o2, l2)
        saved = (fetched.k, fetched.v) if keep else ()
        ctx.save_for_backward(q, k, v, out, lse, *saved)
        ctx.plan, ctx.scale, ctx.backend, ctx.keep = plan, scale, backend, keep
        ctx.fetched_keys = fetched.keys if keep else None
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        plan, scale, backend = ctx.plan, ctx.scale, ctx.backend
        dout = dout.contiguous()
        fetch = None if ctx.keep else start_fetch(plan, k, v)
        q_pos = plan.own.positions
        local = RoutedProblem(q_pos, plan.local_keys, plan.sel, scale)
        dq, dk, dv = routed_backward(backend, dout, q, k, v, out, lse, local)
        if fetch is not None:
            fetched = fetch()
            fk, fv, fkeys = fetched.k, fetched.v, fetched.keys
        else:
            fk, fv, fkeys = saved[0], saved[1], ctx.fetched_keys
        if fkeys.k_pos.numel() == 0:
            dq2, dk_f, dv_f = 0, fk.to(dk.dtype), fv.to(dk.dtype)
        else:
            prob = RoutedProblem(q_pos, fkeys, plan.sel, scale)
            dq2, dk_f, dv_f = routed_backward(backend, dout, q, fk, fv, out, lse, prob)
        return_grads(plan, dk_f.to(dk.dtype), dv_f.to(dk.dtype), dk, dv)
        dq = dq + dq2
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _validate(q, k, v, ctx: CPContext, cfg: dict, group) -> list[int]:
    """Local checks of one rank; returns its handshake fingerprint."""
    q, k, v = check_attention_inputs(q, k, v, "[T_local, H, D]")
    ctx.check_matches(
        process_group=group, layout=cfg["layout"], moba_chunk_size=cfg["moba_chunk_size"]
    )
    MoBAConfig(cfg["moba_chunk_size"], cfg["moba_topk"], cfg["softmax_scale"], cfg["backend"])
    if cfg["strategy"] not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {cfg['strategy']!r}")
    expect = ctx.num_tokens // ctx.world
    if q.shape[0] != expect:
        raise ValueError(
            f"q/k/v must be this rank's shard of {ctx.num_tokens} tokens over {ctx.world} ranks "
            f"({expect} tokens, as moba_dist.parallel.shard returns), got {q.shape[0]}"
        )
    if q.device != ctx.device:
        raise ValueError(
            f"q must be on the device of the CPContext's cu_seqlens ({ctx.device}), got {q.device}"
        )
    if comm.backend_name(group) == "gloo" and q.device.type != "cpu":
        raise ValueError(f"a gloo process group moves CPU tensors, got q on {q.device}")
    resolve_backend(cfg["backend"], q, routed=True)
    return fingerprint(q, k, list(ctx.row), ctx.world, cfg)


def _as_context(cu_seqlens_or_context, cfg: dict, process_group, device) -> CPContext:
    """A passed context as is; ``cu_seqlens`` builds one (a collective: every rank does it)."""
    if isinstance(cu_seqlens_or_context, CPContext):
        return cu_seqlens_or_context
    cu = cu_seqlens_or_context
    if isinstance(cu, torch.Tensor) and device is not None and cu.device != device:
        cu = cu.to(device)
    return CPContext.build(
        cu, moba_chunk_size=cfg["moba_chunk_size"], process_group=process_group,
        layout=cfg["layout"],
    )  # fmt: skip


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation-checkpoint recomputation)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


@torch.compiler.disable
def moba_cp_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | CPContext,
    *,
    moba_chunk_size: int,
    moba_topk: int,
    process_group: Any = None,
    layout: str = "contiguous",
    softmax_scale: float | None = None,
    strategy: str = "auto",
    backend: str = "auto",
    keep_fetched: bool = False,
    return_lse: bool = False,
    stats: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Context-parallel MoBA: the function of ``moba_attn_varlen`` on a sequence split over ranks.

    Args:
        q: ``[T_local, Hq, D]`` this rank's shard (``moba_dist.parallel.shard`` of the global
            packed ``[T, Hq, D]``); ``k, v``: ``[T_local, Hkv, D]``, ``Hq % Hkv == 0``.
        cu_seqlens: the *global* packed offsets, int32 ``[nseq + 1]``, identical on every rank
            (a repeated offset is an empty sequence and contributes nothing), or a
            :class:`CPContext` built once per batch from them (skips the per-batch work and
            its handshake; its group, layout and chunk size must match the call's).
        moba_chunk_size, moba_topk, softmax_scale: as in ``moba_attn_varlen``.
        process_group: the CP group (``None``: torch.distributed's default group). Ranks are
            group ranks, so CP can run on a sub-group of a larger (e.g. DP x CP) world.
        layout: ``"contiguous"`` or ``"zigzag"`` (see ``moba_dist.parallel.layouts``).
        strategy: ``"selective"`` fetches only the (block, KV head) rows local queries selected;
            ``"allgather"`` gathers all K/V; ``"auto"`` picks per call, identically on every rank,
            from the exchanged union fractions (``AUTO_ALLGATHER_FRACTION``).
        backend: local kernel, ``"auto"``, ``"reference"`` or ``"triton"``.
        keep_fetched: keep fetched K/V for the backward instead of fetching again (more memory,
            less traffic).
        return_lse: also return ``lse [Hq, T_local]`` float32 (not differentiable).
        stats: optional dict filled with this call's statistics (see ``MoBAContextParallel``).

    Returns:
        ``out [T_local, Hq, D]`` in q's dtype (and lse); autograd for the local q, k, v.

    Raises:
        ValueError/TypeError on every rank when any rank's inputs are invalid or ranks disagree
        on configuration or shapes (checked by the first collective, so no rank hangs).
    """
    group = comm.resolve_group(process_group)
    rank = comm.group_rank_and_size(group)[0]
    cfg = dict(
        moba_chunk_size=moba_chunk_size, moba_topk=moba_topk, layout=layout,
        softmax_scale=softmax_scale, strategy=strategy, backend=backend,
        keep_fetched=bool(keep_fetched),
    )  # fmt: skip
    ctx = _as_context(cu_seqlens, cfg, process_group, getattr(q, "device", None))
    agree_or_raise(lambda: _validate(q, k, v, ctx, cfg, group), group, rank)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    plan = make_plan(q, k, ctx, moba_topk, strategy)
    scale = MoBAConfig(moba_chunk_size, moba_topk, softmax_scale).scale_for(q.shape[-1])
    name = resolve_backend(backend, q, routed=True)
    call_stats: dict = {} if stats is None else stats
    call_stats.update(record_stats(plan, k, ctx.density(moba_topk), bool(keep_fetched)))
    out, lse = MoBACPFunction.apply(q, k, v, plan, scale, name, bool(keep_fetched))
    return (out, lse) if return_lse else out


class MoBAContextParallel(nn.Module):
    """MoBA attention over a sequence split across the ranks of a process group.

    ``forward(q, k, v, cu_seqlens, return_lse=False)`` takes this rank's shards ``[T_local, H,
    D]`` and the global ``cu_seqlens`` (or a :class:`CPContext` built once per batch with
    ``CPContext.build(cu_seqlens, moba_chunk_size=..., process_group=..., layout=...)`` and
    passed to every layer) and equals ``moba_attn_varlen`` on the unsharded input
    (up to near-ties of the gate), for any world size and layout. See
    :func:`moba_cp_attn_varlen` for every argument.

    After each forward, ``last_stats`` holds: ``strategy`` (the one taken), ``bytes_sent`` /
    ``bytes_received`` (K/V payload bytes of this rank in the forward), ``union_fraction`` (share
    of the remote (row, KV head) pairs this rank needed; ``union_fraction_max`` over ranks),
    ``density`` (MoBA keys over causal keys), ``world_size``; after the backward also
    ``bwd_bytes_sent`` / ``bwd_bytes_received`` (re-fetch plus float32 gradient return). A
    forward recomputed by activation checkpointing writes ``last_recompute_stats`` instead.
    """

    def __init__(
        self,
        moba_chunk_size: int,
        moba_topk: int,
        process_group: Any = None,
        layout: str = "contiguous",
        softmax_scale: float | None = None,
        strategy: str = "auto",
        backend: str = "auto",
        keep_fetched: bool = False,
    ) -> None:
        super().__init__()
        self.config = MoBAConfig(moba_chunk_size, moba_topk, softmax_scale, backend)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.process_group, self.layout = process_group, layout
        self.strategy, self.keep_fetched = strategy, keep_fetched
        self.last_stats: dict[str, Any] = {}
        self.last_recompute_stats: dict[str, Any] = {}

    def forward(self, q, k, v, cu_seqlens: torch.Tensor | CPContext, return_lse: bool = False):
        stats: dict[str, Any] = {}
        if _in_backward():
            self.last_recompute_stats = stats
        else:
            self.last_stats = stats
        c = self.config
        return moba_cp_attn_varlen(
            q, k, v, cu_seqlens, moba_chunk_size=c.moba_chunk_size, moba_topk=c.moba_topk,
            process_group=self.process_group, layout=self.layout, softmax_scale=c.softmax_scale,
            strategy=self.strategy, backend=c.backend, keep_fetched=self.keep_fetched,
            return_lse=return_lse, stats=stats,
        )  # fmt: skip

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"moba_chunk_size={c.moba_chunk_size}, moba_topk={c.moba_topk}, "
            f"layout={self.layout!r}, strategy={self.strategy!r}, backend={c.backend!r}"
        )
