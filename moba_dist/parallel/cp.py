"""Context-parallel MoBA: the autograd function, ``moba_cp_attn_varlen`` and
``MoBAContextParallel``.

Per call (design.md): centroids -> routing -> needs (the layer's fingerprint rides along) ->
strategy plan -> launch the K/V transfer -> attend to local keys while it flies -> attend to
fetched keys -> LSE merge. The backward reuses the routing, keeps dQ local, fetches the rows
again (or reuses them with ``keep_fetched=True``) and returns dK/dV of fetched rows to their
owners in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moba_dist.checks import check_attention_inputs
from moba_dist.kernels.dispatch import resolve_backend, routed_backward, routed_forward
from moba_dist.kernels.plan_types import RoutedKeys, RoutedProblem
from moba_dist.parallel import comm
from moba_dist.parallel.config import CPConfig
from moba_dist.parallel.context import CPContext, check_batch
from moba_dist.parallel.handshake import FIELDS, agree_or_raise, fingerprint
from moba_dist.parallel.plan import Routing, route
from moba_dist.parallel.stats import CallStats, kv_row_bytes
from moba_dist.parallel.strategies import WHOLE_CALL_TYPES, Strategy, choose_strategy
from moba_dist.parallel.streamed import Streamed

__all__ = ["MoBAContextParallel", "moba_cp_attn_varlen"]


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


@dataclass(frozen=True)
class _Call:
    """What forward and backward of one call share besides tensors."""

    routing: Routing
    strategy: Strategy | Streamed
    scale: float
    backend: str
    keep_fetched: bool
    block: int  # moba_chunk_size: bounds every block's rows in any key set (no backward sync)

    def problem(self, keys: RoutedKeys) -> RoutedProblem:
        r = self.routing
        return RoutedProblem(r.ctx.own.positions, keys, r.sel, self.scale, self.block)


class MoBACPFunction(torch.autograd.Function):
    """Autograd of one CP call; the plan (routing, strategy) is built outside and reused."""

    @staticmethod
    def forward(ctx, q, k, v, call: _Call):
        if isinstance(call.strategy, Streamed):  # pieces attended as they arrive
            out, lse = call.strategy.forward(call, q, k, v, merge_lse)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.call = call
            ctx.mark_non_differentiable(lse)
            return out, lse
        fetch = call.strategy.forward_exchange(k, v)  # step 4: in flight during the local part
        local = call.problem(call.routing.ctx.local_keys)
        o1, l1 = routed_forward(call.backend, q, k, v, local)
        fetched = fetch()
        if fetched.keys.k_pos.numel() == 0:
            # Nothing fetched (a host-known count, no sync): the local part is the result; the
            # exchange itself still ran, on every rank.
            out, lse = o1, l1
        else:
            prob = call.problem(fetched.keys)
            o2, l2 = routed_forward(call.backend, q, fetched.k, fetched.v, prob)
            out, lse = merge_lse(o1, l1, o2, l2)
        saved = (fetched.k, fetched.v) if call.keep_fetched else ()
        ctx.save_for_backward(q, k, v, out, lse, *saved)
        ctx.call = call
        ctx.fetched_keys = fetched.keys if call.keep_fetched else None
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # step 5
        q, k, v, out, lse, *saved = ctx.saved_tensors
        call: _Call = ctx.call
        dout = dout.contiguous()
        if isinstance(call.strategy, Streamed):
            dq, dk, dv = call.strategy.backward(call, dout, q, k, v, out, lse)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None
        fetch = None if call.keep_fetched else call.strategy.forward_exchange(k, v)
        local = call.problem(call.routing.ctx.local_keys)
        dq, dk, dv = routed_backward(call.backend, dout, q, k, v, out, lse, local)
        if fetch is not None:
            fetched = fetch()
            fk, fv, fkeys = fetched.k, fetched.v, fetched.keys
        else:
            fk, fv, fkeys = saved[0], saved[1], ctx.fetched_keys
        if fkeys.k_pos.numel() == 0:  # no fetched keys: no dQ part to add (host-known)
            dk_f, dv_f = fk.to(dk.dtype), fv.to(dk.dtype)
        else:
            prob = call.problem(fkeys)
            dq2, dk_f, dv_f = routed_backward(call.backend, dout, q, fk, fv, out, lse, prob)
            dq = dq + dq2
        call.strategy.backward_exchange(dk_f.to(dk.dtype), dv_f.to(dk.dtype), dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _check_layer(q, k, v, cfg: CPConfig, group, num_tokens: int, world: int, device) -> None:
    """Local checks of one rank's layer inputs against its batch."""
    q, k, v = check_attention_inputs(q, k, v, "[T_local, H, D]")
    expect = num_tokens // world
    if q.shape[0] != expect:
        raise ValueError(
            f"q/k/v must be this rank's shard of {num_tokens} tokens over {world} ranks "
            f"({expect} tokens, as moba_dist.parallel.shard returns), got {q.shape[0]}"
        )
    if q.device != device:
        raise ValueError(
            f"q must be on the device of the CPContext's cu_seqlens ({device}), got {q.device}"
        )
    resolve_backend(cfg.backend, q, routed=True)


def _layer_header(q, k, v, ctx: CPContext, cfg: CPConfig, group):
    """This rank's fingerprint for the plan's piggy-backed check, or zeros and the error."""
    try:
        ctx.check_matches(group=group, layout=cfg.layout, moba_chunk_size=cfg.moba_chunk_size)
        _check_layer(q, k, v, cfg, group, ctx.num_tokens, ctx.world, ctx.device)
        return fingerprint(q, k, ctx.row, ctx.world, cfg), None
    except (TypeError, ValueError) as exc:
        return [0] * len(FIELDS), exc


def _context_from_cu(q, k, v, cu, cfg: CPConfig, group) -> CPContext:
    """Without a context: one all-gather agrees on the batch and on the layer (shapes included,
    before any exchange is sized by them), then the context is assembled."""
    if isinstance(cu, torch.Tensor) and isinstance(q, torch.Tensor) and cu.device != q.device:
        cu = cu.to(q.device)
    rank, world = comm.group_rank_and_size(group)
    found: list[int] = []

    def validate() -> list[int]:
        found.extend(check_batch(cu, cfg.moba_chunk_size, cfg.layout, world))
        _check_layer(q, k, v, cfg, group, found[0], world, cu.device)
        return fingerprint(q, k, tuple(found), world, cfg)

    agree_or_raise(validate, group, rank, FIELDS)
    return CPContext.assemble(cu, cfg.moba_chunk_size, group, cfg.layout, tuple(found))


def cp_attention(
    q, k, v, batch: torch.Tensor | CPContext, cfg: CPConfig, process_group: Any,
    on_stats: Callable[[CallStats], None],
):  # fmt: skip
    """One CP call: ``(out, lse)``; ``on_stats`` gets its statistics before the autograd function
    runs (a checkpoint recomputation may stop inside it). Shared by the function and the
    module."""
    group = comm.resolve_group(process_group)
    if isinstance(batch, CPContext):
        ctx = batch
        header, error = _layer_header(q, k, v, ctx, cfg, group)
    else:
        ctx = _context_from_cu(q, k, v, batch, cfg, group)
        header, error = fingerprint(q, k, ctx.row, ctx.world, cfg), None
    if cfg.strategy in WHOLE_CALL_TYPES:
        return _whole_call(WHOLE_CALL_TYPES[cfg.strategy], q, k, v, ctx, cfg, group, on_stats)
    routing = route(q, k, ctx, group, cfg.moba_topk, header, error, cfg.gate_precision)
    strategy, costs = choose_strategy(  # step 6
        cfg.strategy, routing, k, cfg.max_fetch_bytes, cfg.keep_fetched
    )
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    call = _Call(
        routing, strategy, cfg.scale_for(q.shape[-1]), resolve_backend(cfg.backend, q, True),
        cfg.keep_fetched, cfg.moba_chunk_size,
    )  # fmt: skip
    fractions = routing.union_fractions
    t_local, hkv, _ = k.shape
    record = CallStats(
        strategy=strategy.name, traffic=strategy.stats(k, cfg.keep_fetched),
        union_fraction=fractions[ctx.rank], union_fraction_max=max(fractions),
        allgather_bytes_received=(ctx.world - 1) * t_local * hkv * kv_row_bytes(k)[0],
        world_size=ctx.world, context=ctx, moba_topk=cfg.moba_topk, auto_costs=costs,
    )  # fmt: skip
    on_stats(record)
    return MoBACPFunction.apply(q, k, v, call)


def _whole_call(strategy, q, k, v, ctx: CPContext, cfg: CPConfig, group, on_stats):
    """A strategy without routing (``strategies.WholeCallStrategy``) runs the call itself."""
    ctx.check_matches(group=group, layout=cfg.layout, moba_chunk_size=cfg.moba_chunk_size)
    out, lse, traffic = strategy.run(q, k, v, ctx, cfg)
    t_local, hkv, _ = k.shape
    on_stats(CallStats(
        strategy=strategy.name, traffic=traffic, union_fraction=None, union_fraction_max=None,
        allgather_bytes_received=(ctx.world - 1) * t_local * hkv * kv_row_bytes(k)[0],
        world_size=ctx.world, context=ctx, moba_topk=cfg.moba_topk,
    ))  # fmt: skip
    return out, lse


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
    gate_precision: str = "float32",
    max_fetch_bytes: int | None = None,
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
            ``"allgather"`` gathers all K/V; ``"heads"`` re-splits q, k, v by heads instead
            (``parallel/heads.py``; needs ``Hq % P == 0``); ``"streamed"`` fetches what
            ``"selective"`` does, in pieces attended as they arrive (``parallel/streamed.py``).
            ``"auto"`` picks per call among selective, allgather and streamed (not with
            ``keep_fetched``) by ``parallel.cost_model`` (the model ``benchmarks/project_cp.py``
            projects with): the least predicted communication time whose fetched K/V fits
            ``max_fetch_bytes`` (None: ``strategies.auto_fetch_limit``, a quarter of the
            device's total memory, 1 GiB on CPU), priced from the all-gathered union fractions
            with the default ``cost_model.Links`` (8 ranks per node), so every rank takes the
            same one without another collective.
        backend: local kernel, ``"auto"``, ``"reference"`` or ``"triton"``.
        keep_fetched: keep fetched K/V for the backward instead of fetching again (more memory,
            less traffic).
        return_lse: also return ``lse [Hq, T_local]`` float32 (not differentiable).
        stats: optional dict filled with this call's statistics (see ``MoBAContextParallel``).
        gate_precision: as in ``moba_attn_varlen``; every rank must pass the same.
        max_fetch_bytes: ``"streamed"``: the most fetched K/V bytes held at once, forward
            and backward (the piece attended plus the next in flight). None: a quarter of the
            free device memory on CUDA, 1 GiB on CPU (``streamed.default_max_fetch_bytes``).
            Ranks take the smallest value any of them passes. ``"auto"``: the limit above (every
            rank must pass the same value: it decides without exchanging it).

    Returns:
        ``out [T_local, Hq, D]`` in q's dtype (and lse); autograd for the local q, k, v.

    Raises:
        ValueError/TypeError on every rank when any rank's inputs are invalid or ranks disagree
        on configuration or shapes. With ``cu_seqlens`` the ranks agree before any exchange;
        with a context the check rides on the plan's need exchange, so ranks must agree on what
        sizes the exchanges before it: Hkv, head_dim, whether inputs are float64, and the batch.
    """
    cfg = CPConfig(
        moba_chunk_size, moba_topk, softmax_scale, backend, layout, strategy, bool(keep_fetched),
        gate_precision, max_fetch_bytes,
    )  # fmt: skip
    sink = (lambda record: None) if stats is None else (lambda r: stats.update(r.as_dict()))
    out, lse = cp_attention(q, k, v, cu_seqlens, cfg, process_group, sink)
    return (out, lse) if return_lse else out


class MoBAContextParallel(nn.Module):
    """MoBA attention over a sequence split across the ranks of a process group.

    ``forward(q, k, v, cu_seqlens, return_lse=False)`` takes this rank's shards ``[T_local, H,
    D]`` and the global ``cu_seqlens`` (or a :class:`CPContext` built once per batch with
    ``CPContext.build(cu_seqlens, moba_chunk_size=..., process_group=..., layout=...)`` and
    passed to every layer) and equals ``moba_attn_varlen`` on the unsharded input
    (up to near-ties of the gate), for any world size and layout. See
    :func:`moba_cp_attn_varlen` for every argument; ``config`` holds them as a :class:`CPConfig`
    (:meth:`from_config` builds the module from one).

    ``last_stats`` describes the last forward: ``strategy`` (the one taken), ``bytes_sent`` /
    ``bytes_received`` (K/V payload bytes of this rank in the forward), ``union_fraction`` (share
    of the remote (row, KV head) pairs this rank needed; ``union_fraction_max`` over ranks),
    ``density`` (MoBA keys over causal keys), ``world_size``, and the backward's
    ``bwd_bytes_sent`` / ``bwd_bytes_received`` (re-fetch plus float32 gradient return);
    ``"streamed"`` adds ``pieces`` (exchange steps per pass), ``max_piece_bytes`` (the largest
    fetched piece) and ``max_fetch_bytes`` (the agreed budget). ``auto_costs``: under
    ``strategy="auto"``, every candidate's predicted cost (``cost_model.Cost.summary()`` by
    name; the one taken is ``strategy``), else None. It is
    built when read (the density costs one device read per batch and top-k then, not per call).
    A forward recomputed by activation checkpointing fills ``last_recompute_stats`` instead.
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
        gate_precision: str = "float32",
        max_fetch_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.config = CPConfig(
            moba_chunk_size, moba_topk, softmax_scale, backend, layout, strategy,
            bool(keep_fetched), gate_precision, max_fetch_bytes,
        )  # fmt: skip
        self.process_group = process_group
        self._stats: CallStats | None = None
        self._recompute_stats: CallStats | None = None

    @classmethod
    def from_config(cls, config: CPConfig, process_group: Any = None) -> MoBAContextParallel:
        """The module configured by ``config``."""
        if not isinstance(config, CPConfig):
            raise TypeError(f"config must be a CPConfig, got {type(config).__name__}")
        return cls(process_group=process_group, **dataclasses.asdict(config))

    @property
    def layout(self) -> str:
        return self.config.layout

    @property
    def strategy(self) -> str:
        return self.config.strategy

    @property
    def keep_fetched(self) -> bool:
        return self.config.keep_fetched

    @property
    def last_stats(self) -> dict[str, Any]:
        return {} if self._stats is None else self._stats.as_dict()

    @property
    def last_recompute_stats(self) -> dict[str, Any]:
        return {} if self._recompute_stats is None else self._recompute_stats.as_dict()

    def forward(self, q, k, v, cu_seqlens: torch.Tensor | CPContext, return_lse: bool = False):
        recompute = _in_backward()

        def keep(record: CallStats) -> None:
            if recompute:
                self._recompute_stats = record
            else:
                self._stats = record

        out, lse = cp_attention(q, k, v, cu_seqlens, self.config, self.process_group, keep)
        return (out, lse) if return_lse else out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"moba_chunk_size={c.moba_chunk_size}, moba_topk={c.moba_topk}, "
            f"layout={c.layout!r}, strategy={c.strategy!r}, backend={c.backend!r}"
        )
