"""One cost model of context-parallel MoBA: bytes per rank per link class, exposed time and
memory of every strategy, from the quantities the ranks exchange.

A strategy's traffic is a list of phases, each a ``[P, P]`` float64 byte matrix ``M`` (rank r
receives ``M[r, o]`` from rank o; the diagonal is local and free). The byte counts are the
library's own accounting, the numbers ``MoBAContextParallel.last_stats`` reports and gloo moves
(the tests check both to the byte):

- ``selective``: ``rows [P, P]``, the (row, KV head) pairs r fetches from o (exchanged in the
  plan); K and V side by side, ``2 D`` elements a row; the backward fetches them again (unless
  ``keep_fetched``) and returns dK/dV in float32 (float64 stays float64).
- ``allgather``: every remote row, ``(P - 1) T_local Hkv`` each way; the same backward.
- ``streamed``: the selective rows, fetched and returned in pieces of at most half of
  ``max_fetch_bytes`` (one piece in use, one in flight).
- ``heads``: q, k, v to head shards, out back; backward dout in, dq, dk, dv back, in the
  input dtype (:func:`heads_traffic`, the bytes of ``moba_dist.parallel.heads``).
- ``hybrid``: ``heads`` inside sub-groups of ``S`` consecutive ranks (a node), a sequence
  strategy across sub-groups among the ranks holding the same heads (:func:`hybrid_traffic`,
  :func:`add_heads`): bytes across nodes fall by about ``S``.
- dense baselines: ring attention over full K/V (:func:`ring_cost`), alone or under the same
  hybrid split (USP).

Time of one layer on the slowest rank, given per-rank kernel milliseconds (:class:`Kernels`):
a collective takes ``max(intra / nvlink, inter / net)`` over each rank's received and sent
bytes plus a latency; a fetch overlaps the attention of locally held keys (share ``a``), so
``fwd = plan + gate + max(fetch, a f) + (1 - a) f``; streamed pieces overlap the remote part
too. Head exchanges overlap nothing. Memory: bytes one layer call holds at once beyond its own
inputs: fetched K/V (peak), or the head-shard tensors the op saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "AUTO_CANDIDATES",
    "PIECE_BWD_US",
    "PIECE_FWD_US",
    "STRATEGIES",
    "Cost",
    "Kernels",
    "Links",
    "Shape",
    "Traffic",
    "add_heads",
    "allgather_traffic",
    "auto_choice",
    "auto_costs",
    "choose",
    "head_spans",
    "heads_cost",
    "heads_traffic",
    "hybrid_traffic",
    "ring_cost",
    "rows_from_union",
    "selective_traffic",
    "send_ratio",
    "sequence_cost",
]

STRATEGIES = ("allgather", "selective", "streamed", "heads", "hybrid")
#: Fixed cost of one streamed piece, forward and backward (a routed kernel call, the LSE merge,
#: the launch of the next exchange): ASSUMED, not measured; it matters when pieces are many.
PIECE_FWD_US, PIECE_BWD_US = 50.0, 100.0
_F64 = torch.float64


def _positive(name: str, value, kind=int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


@dataclass(frozen=True)
class Shape:
    """One CP attention call: global tokens, ranks, heads, head dim, payload bytes per element
    (``elem``), MoBA block size (for the centroid all-reduce)."""

    tokens: int
    world: int
    hq: int
    hkv: int
    head_dim: int
    elem: int = 2
    block: int = 4096

    def __post_init__(self) -> None:
        for name in ("tokens", "world", "hq", "hkv", "head_dim", "elem", "block"):
            _positive(name, getattr(self, name))
        if self.tokens % self.world or self.hq % self.hkv:
            raise ValueError(
                f"need tokens % world == 0 and hq % hkv == 0, got tokens={self.tokens}, "
                f"world={self.world}, hq={self.hq}, hkv={self.hkv}"
            )

    @property
    def t_local(self) -> int:
        return self.tokens // self.world

    @property
    def grad_elem(self) -> int:
        """dK/dV return of the sequence strategies: float32 (float64 stays float64)."""
        return max(4, self.elem)


@dataclass(frozen=True)
class Links:
    """Per-GPU GB/s (1e9 B/s, one direction) within a node (NVLink) and across nodes (NIC),
    GPUs per node, microseconds per collective or ring hop."""

    nvlink_gbs: float = 360.0
    net_gbs: float = 40.0
    gpus_per_node: int = 8
    latency_us: float = 30.0

    def __post_init__(self) -> None:
        for name in ("nvlink_gbs", "net_gbs", "latency_us"):
            _positive(name, float(getattr(self, name)), float)
        _positive("gpus_per_node", self.gpus_per_node)

    def by_class(self, mat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-rank bytes ``[P]``: ``intra_recv``, ``inter_recv``, ``intra_sent``,
        ``inter_sent`` of the byte matrix ``mat [P, P]``."""
        node = torch.arange(mat.shape[0]) // self.gpus_per_node
        same = node[:, None] == node[None, :]
        off = mat * (1 - torch.eye(mat.shape[0], dtype=_F64))
        intra, inter = torch.where(same, off, 0.0), torch.where(same, 0.0, off)
        return dict(intra_recv=intra.sum(1), inter_recv=inter.sum(1), intra_sent=intra.sum(0),
                    inter_sent=inter.sum(0))  # fmt: skip

    def collective_ms(self, mat: torch.Tensor, sequential: bool = False) -> float:
        """ms of an all-to-all moving ``mat [P, P]`` bytes: the slowest rank and direction.
        NVLink and the NIC work in parallel, unless ``sequential`` (ring-ordered steps, one
        peer at a time: a rank's intra- and inter-node bytes then add up)."""
        return max(self.direction_ms(mat, way, sequential) for way in ("recv", "sent"))

    def direction_ms(self, mat: torch.Tensor, way: str, sequential: bool = False) -> float:
        """:meth:`collective_ms` counting one side only, ``way`` = ``"recv"`` or ``"sent"``:
        which side bounds the exchange (a hot owner's sends, or a rank's receives)."""
        c = self.by_class(mat)
        join = torch.add if sequential else torch.maximum
        t = join(c[f"intra_{way}"] / self.nvlink_gbs, c[f"inter_{way}"] / self.net_gbs)
        return float(t.max()) / 1e6 + self.latency_us / 1e3

    def ring_bw(self, world: int, stride: int = 1) -> float:
        """Bytes per ms of a ring hop over ``world`` ranks ``stride`` apart (the NIC once the
        ring spans nodes)."""
        spans = world > 1 and world * stride > self.gpus_per_node
        return (self.net_gbs if spans else self.nvlink_gbs) * 1e6


@dataclass(frozen=True)
class Traffic:
    """Byte matrices ``[P, P]`` of one call per phase; ``fwd_*`` phases run in the forward."""

    phases: dict[str, torch.Tensor]

    def per_rank(self, key: str) -> list[float]:
        """``bytes_sent``, ``bytes_received``, ``bwd_bytes_sent`` or ``bwd_bytes_received`` of
        every rank, as ``last_stats`` names them (remote bytes only)."""
        bwd, what = key.startswith("bwd_"), key.removeprefix("bwd_")
        if what not in ("bytes_sent", "bytes_received"):
            raise ValueError(f"key must be [bwd_]bytes_sent or [bwd_]bytes_received, got {key!r}")
        dim = 0 if what == "bytes_sent" else 1
        mats = [m for n, m in self.phases.items() if n.startswith("bwd_") == bwd]
        p = next(iter(self.phases.values())).shape[0]
        total = sum((_off(m).sum(dim) for m in mats), torch.zeros(p, dtype=_F64))
        return total.tolist()

    def by_class(self, links: Links) -> dict[str, list[float]]:
        """Per-rank bytes of the whole call (forward + backward) per link class."""
        total = sum(self.phases.values())
        return {k: v.tolist() for k, v in links.by_class(total).items()}


def _off(mat: torch.Tensor) -> torch.Tensor:
    return mat * (1 - torch.eye(mat.shape[0], dtype=_F64))


def selective_traffic(shape: Shape, rows: torch.Tensor, keep_fetched: bool = False) -> Traffic:
    """Selective fetch of ``rows [P, P]`` (row, KV head) pairs (r fetches ``rows[r, o]`` from
    o), its backward re-fetch and float32 dK/dV return."""
    rows = _off(rows.to(_F64))
    kv, grad = 2 * shape.head_dim * shape.elem, 2 * shape.head_dim * shape.grad_elem
    phases = {"fwd_fetch": rows * kv, "bwd_return": rows.t() * grad}
    if not keep_fetched:
        phases["bwd_fetch"] = rows * kv
    return Traffic(phases)


def rows_from_union(shape: Shape, union_fractions: list[float]) -> torch.Tensor:
    """Selective rows ``[P, P]`` from the union fractions every rank already all-gathers in its
    plan (no extra collective): rank r's remote rows, ``f_r (T - T_local) Hkv``, spread evenly
    over the other ranks. Exact per receiver; the split by owner is an assumption (exact when
    unions are full)."""
    if len(union_fractions) != shape.world:
        raise ValueError(
            f"union_fractions must hold one value per rank ({shape.world}), got "
            f"{len(union_fractions)}"
        )
    remote = (shape.tokens - shape.t_local) * shape.hkv
    per = torch.tensor(union_fractions, dtype=_F64) * remote / max(shape.world - 1, 1)
    return _off(per[:, None].expand(shape.world, shape.world).clone())


def allgather_traffic(shape: Shape, keep_fetched: bool = False) -> Traffic:
    """Every remote row of every KV head, each way."""
    full = _off(torch.full((shape.world,) * 2, float(shape.t_local * shape.hkv), dtype=_F64))
    return selective_traffic(shape, full, keep_fetched)


def head_spans(hq: int, hkv: int, world: int) -> tuple[list[int], list[int]]:
    """Query heads and the KV heads they read, per rank (``moba_dist.parallel.heads``)."""
    if hq % world:
        raise ValueError(f"strategy 'heads' needs hq % world == 0, got hq={hq}, world={world}")
    nq, group = hq // world, hq // hkv
    kv = [((r + 1) * nq - 1) // group + 1 - (r * nq) // group for r in range(world)]
    return [nq] * world, kv


def heads_traffic(shape: Shape) -> Traffic:
    """The four exchanges of ``strategy="heads"`` (payload and gradients in the input dtype)."""
    nq, nkv = (torch.tensor(x, dtype=_F64) for x in head_spans(shape.hq, shape.hkv, shape.world))
    row, e = float(shape.t_local * shape.head_dim), shape.elem
    ones = _off(torch.ones(shape.world, shape.world, dtype=_F64))
    q = ones * nq[:, None] * row  # r receives o's tokens of r's query heads
    kv = ones * 2 * nkv[:, None] * row
    back = q.t()  # r receives its tokens of o's heads
    return Traffic({"fwd_in": (q + kv) * e, "fwd_out": back * e, "bwd_in": q * e,
                    "bwd_out": (back + kv.t()) * e})  # fmt: skip


def hybrid_traffic(inner: Traffic, outer: Traffic, sub: int) -> tuple[Traffic, Traffic]:
    """World-size phases of ``hybrid``: heads inside sub-groups of ``sub`` consecutive ranks
    (``inner``: one sub-group's ``[sub, sub]`` phases) and a sequence strategy among the ranks
    holding the same heads across the ``G`` sub-groups (``outer``: ``[G, G]`` phases of one
    head slice). Rank ``g * sub + i`` is member i of sub-group g."""
    g = next(iter(outer.phases.values())).shape[0]
    eye_g, eye_s = torch.eye(g, dtype=_F64), torch.eye(sub, dtype=_F64)
    heads = {n: torch.kron(eye_g, m.contiguous()) for n, m in inner.phases.items()}
    seq = {n: torch.kron(m.contiguous(), eye_s) for n, m in outer.phases.items()}
    return Traffic(heads), Traffic(seq)


@dataclass(frozen=True)
class Kernels:
    """Per-rank kernel ms ``[P]`` of one layer: attention forward and backward (without the
    gate), the gate, and the share of attended keys held locally (overlaps a fetch)."""

    fwd: torch.Tensor
    bwd: torch.Tensor
    gate: torch.Tensor
    local_share: torch.Tensor = field(default_factory=lambda: torch.ones(1, dtype=_F64))


@dataclass(frozen=True)
class Cost:
    """Predicted cost of one strategy for one layer call (slowest rank). ``memory_bytes``: what
    the call holds at once beyond its inputs (saved tensors plus remote data); ``remote_bytes``:
    the remote part of it (fetched K/V, received head-shard rows)."""

    strategy: str
    fwd_ms: float
    bwd_ms: float
    exposed_ms: float
    memory_bytes: float
    remote_bytes: float
    bytes_by_class: dict[str, list[float]]

    @property
    def total_ms(self) -> float:
        return self.fwd_ms + self.bwd_ms

    def summary(self) -> dict:
        """Scalars for ``last_stats`` / tables: ms, GiB and the max over ranks per class."""
        worst = {f"{k}_max": max(v) for k, v in self.bytes_by_class.items()}
        return dict(
            strategy=self.strategy, fwd_ms=self.fwd_ms, bwd_ms=self.bwd_ms,
            exposed_ms=self.exposed_ms, memory_bytes=self.memory_bytes,
            remote_bytes=self.remote_bytes, **worst,
        )  # fmt: skip


def _pipeline(first: torch.Tensor, comm: float, rest: torch.Tensor, pieces: int) -> torch.Tensor:
    """``first`` runs while piece 1 arrives; then ``pieces`` pieces of ``comm / pieces`` ms
    arrive while the previous piece's share of ``rest`` computes."""
    c, r = comm / pieces, rest / pieces
    return (
        torch.maximum(first, torch.full_like(first, c))
        + (pieces - 1) * torch.maximum(r, torch.full_like(r, c))
        + r
    )


def sequence_cost(
    strategy: str, shape: Shape, traffic: Traffic, kernels: Kernels, links: Links,
    max_fetch_bytes: float | None = None, stride: int = 1,
) -> Cost:  # fmt: skip
    """``selective``, ``allgather`` or (``max_fetch_bytes`` given) ``streamed``; the group's
    ranks lie ``stride`` apart (the outer level of ``hybrid``). ``streamed`` takes at least
    ``P - 1`` ring-ordered steps (``moba_dist.parallel.streamed``), each from one owner, so its
    NVLink and network bytes do not overlap each other."""
    ph = traffic.phases
    streamed = max_fetch_bytes is not None
    ms = {n: links.collective_ms(m, sequential=streamed) for n, m in ph.items()}
    fetch, ret, refetch = ms["fwd_fetch"], ms["bwd_return"], ms.get("bwd_fetch", 0.0)
    fetched = float(ph["fwd_fetch"].sum(1).max())
    pieces = 1
    if streamed:  # ring-ordered steps, owner by owner, each piece <= half the budget
        pieces = max(shape.world - 1, math.ceil(fetched / max(max_fetch_bytes / 2, 1.0)), 1)
    lat = (pieces - 1) * links.latency_us / 1e3
    blocks = math.ceil(shape.tokens / shape.block)
    cent = blocks * shape.hkv * shape.head_dim * 4.0  # float32 centroid sums, ring all-reduce
    collectives = 4 if strategy == "allgather" else 6  # handshake, centroids, stats (+ requests)
    plan = collectives * links.latency_us / 1e3 + 2.0 * cent / links.ring_bw(shape.world, stride)
    a, f, b = kernels.local_share, kernels.fwd, kernels.bwd
    if pieces > 1:  # every piece is one more routed kernel call (and LSE merge) per pass
        f, b = f + pieces * PIECE_FWD_US / 1e3, b + pieces * PIECE_BWD_US / 1e3
    fwd = plan + kernels.gate + _pipeline(a * f, fetch + lat, (1 - a) * f, pieces)
    bwd = _pipeline(a * b, refetch + ret + lat, (1 - a) * b, pieces)
    if pieces == 1:  # the return follows the fetched-key backward
        bwd = _pipeline(a * b, refetch, (1 - a) * b, 1) + ret
    held = min(fetched, max_fetch_bytes) if max_fetch_bytes is not None else fetched
    saved = shape.t_local * (2 * shape.hq + 2 * shape.hkv) * shape.head_dim * shape.elem
    fwd_ms, bwd_ms = float(fwd.max()), float(bwd.max())
    exposed = fwd_ms + bwd_ms - float((kernels.gate + f + b).max())
    return Cost(strategy, fwd_ms, bwd_ms, max(exposed, 0.0), saved + held, held,
                traffic.by_class(links))  # fmt: skip


def heads_cost(shape: Shape, traffic: Traffic, kernels: Kernels, links: Links,
               name: str = "heads") -> Cost:  # fmt: skip
    """Head exchanges around the single-device op on head shards (``kernels`` of that op)."""
    ms = {n: links.collective_ms(m) for n, m in traffic.phases.items()}
    comm_f, comm_b = ms["fwd_in"] + ms["fwd_out"], ms["bwd_in"] + ms["bwd_out"]
    fwd = float((kernels.gate + kernels.fwd).max()) + comm_f
    bwd = float(kernels.bwd.max()) + comm_b
    nq, nkv = head_spans(shape.hq, shape.hkv, shape.world)
    saved = shape.tokens * (2 * nq[0] + 2 * max(nkv)) * shape.head_dim * shape.elem
    remote = saved * (shape.world - 1) / shape.world
    return Cost(name, fwd, bwd, comm_f + comm_b, float(saved), remote, traffic.by_class(links))


def add_heads(cost: Cost, inner: Traffic, links: Links, name: str) -> Cost:
    """``cost`` of a sequence strategy across sub-groups (its traffic in world-size matrices)
    with the head exchanges ``inner`` (world size, from :func:`hybrid_traffic`) around it:
    ``hybrid`` (MoBA) or dense attention under the same split (USP)."""
    ms = {n: links.collective_ms(m) for n, m in inner.phases.items()}
    fwd, bwd = ms["fwd_in"] + ms["fwd_out"], ms["bwd_in"] + ms["bwd_out"]
    extra = links.by_class(sum(inner.phases.values()))
    both = {
        k: (torch.tensor(v, dtype=_F64) + extra[k]).tolist() for k, v in cost.bytes_by_class.items()
    }
    return Cost(name, cost.fwd_ms + fwd, cost.bwd_ms + bwd, cost.exposed_ms + fwd + bwd,
                cost.memory_bytes, cost.remote_bytes, both)  # fmt: skip


def ring_cost(shape: Shape, step_fwd: torch.Tensor, step_bwd: torch.Tensor, links: Links,
              name: str = "dense-ring", stride: int = 1) -> Cost:  # fmt: skip
    """Dense ring attention over full K/V (ring-flash-attn style, float32 dK/dV): ``P`` steps of
    ``step_fwd`` / ``step_bwd`` ms ``[P * stride]`` (causal attention against one rank's K/V);
    ring members ``stride`` apart, each receiving every hop from its predecessor."""
    p, tl = shape.world, shape.t_local
    hop_kv = tl * shape.hkv * 2 * shape.head_dim * shape.elem
    hop_grad = tl * shape.hkv * 2 * shape.head_dim * shape.grad_elem
    prev = torch.roll(torch.eye(p, dtype=_F64), -1, dims=1)  # prev[r, r - 1] = 1
    ring = torch.kron(prev * (p - 1), torch.eye(stride, dtype=_F64))  # zero for P = 1
    traffic = Traffic({"fwd_ring": ring * hop_kv, "bwd_ring": ring * (hop_kv + hop_grad)})
    if p == 1:
        fwd, bwd = float(step_fwd.max()), float(step_bwd.max())
        return Cost(name, fwd, bwd, 0.0, 0.0, 0.0, traffic.by_class(links))
    lat, bw = links.latency_us / 1e3, links.ring_bw(p, stride)
    hop, hop_g = hop_kv / bw + lat, hop_grad / bw + lat
    fwd = step_fwd + (p - 1) * torch.maximum(step_fwd, torch.full_like(step_fwd, hop))
    bwd = step_bwd + (p - 1) * torch.maximum(step_bwd, torch.full_like(step_bwd, hop + hop_g))
    bwd = bwd + hop_g
    exposed = float((fwd + bwd).max() - (p * (step_fwd + step_bwd)).max())
    saved = tl * (2 * shape.hq + 2 * shape.hkv) * shape.head_dim * shape.elem
    return Cost(name, float(fwd.max()), float(bwd.max()), max(exposed, 0.0),
                saved + 2.0 * hop_kv, 2.0 * hop_kv, traffic.by_class(links))  # fmt: skip


def choose(
    costs: dict[str, Cost], memory_limit: float | None = None, fetch_limit: float | None = None
) -> str:
    """``auto``: the cheapest strategy that fits: ``memory_bytes <= memory_limit`` and
    ``remote_bytes`` (fetched K/V held at once) ``<= fetch_limit`` (bytes; ``None``: no limit).
    When none fits, the least memory (then the least remote bytes). Ties go to the earlier name
    in ``costs``, so every rank fed the same quantities takes the same strategy."""
    if not costs:
        raise ValueError("choose needs at least one candidate cost, got none")
    mem, fetch = (math.inf if x is None else x for x in (memory_limit, fetch_limit))
    ok = [n for n, c in costs.items() if c.memory_bytes <= mem and c.remote_bytes <= fetch]
    if not ok:
        return min(costs, key=lambda n: (costs[n].memory_bytes, costs[n].remote_bytes))
    # Rounded to 1e-9 ms: hosts whose CPUs sum float64 in another order still agree (and tie).
    return min(ok, key=lambda n: round(costs[n].total_ms, 9))


#: What ``auto_costs`` can price from the union fractions alone.
AUTO_CANDIDATES = ("selective", "allgather", "streamed", "heads")


def auto_costs(
    shape: Shape, union_fractions: list[float], links: Links | None = None,
    keep_fetched: bool = False, candidates: tuple[str, ...] = ("selective", "allgather", "heads"),
    fetch_limit: float | None = None,
) -> dict[str, Cost]:  # fmt: skip
    """Every candidate's :class:`Cost` from what every rank holds after the plan's exchange
    (the all-gathered union fractions): identical on every rank, no collective. Kernel time is
    left out (zero): the candidates run the same attention FLOPs, so they differ by their
    communication, counted fully exposed. ``heads`` is skipped unless ``Hq % P == 0``;
    ``streamed`` (pieces of at most half of ``fetch_limit``) needs ``fetch_limit``."""
    links = links or Links()
    unknown = [n for n in candidates if n not in AUTO_CANDIDATES]
    if unknown:
        raise ValueError(f"candidates must be among {AUTO_CANDIDATES}, got {unknown}")
    if "streamed" in candidates and fetch_limit is None:
        raise ValueError("candidate 'streamed' needs a fetch_limit (its piece budget), got None")
    rows = rows_from_union(shape, union_fractions)
    zero = torch.zeros(shape.world, dtype=_F64)
    kernels = Kernels(zero, zero, zero, zero)
    costs: dict[str, Cost] = {}
    for name in candidates:
        if name == "heads":
            if shape.hq % shape.world == 0:
                costs[name] = heads_cost(shape, heads_traffic(shape), kernels, links)
            continue
        traffic = (allgather_traffic(shape, keep_fetched) if name == "allgather"
                   else selective_traffic(shape, rows, keep_fetched))  # fmt: skip
        budget = fetch_limit if name == "streamed" else None
        costs[name] = sequence_cost(name, shape, traffic, kernels, links, budget)
    return costs


def auto_choice(
    shape: Shape, union_fractions: list[float], links: Links | None = None,
    memory_limit: float | None = None, keep_fetched: bool = False,
    candidates: tuple[str, ...] = ("selective", "allgather", "heads"),
    fetch_limit: float | None = None,
) -> tuple[str, dict[str, dict]]:  # fmt: skip
    """``strategy="auto"``: :func:`choose` over :func:`auto_costs` (the runtime's rule, in
    ``parallel.strategies.choose_strategy``). Returns the name taken and every candidate's
    :meth:`Cost.summary` (what ``last_stats`` reports)."""
    costs = auto_costs(shape, union_fractions, links, keep_fetched, candidates, fetch_limit)
    taken = choose(costs, memory_limit, fetch_limit)
    return taken, {n: c.summary() for n, c in costs.items()}


def send_ratio(traffic: Traffic, key: str = "bytes_sent") -> tuple[float, float, float]:
    """Hot blocks: ``(max, mean, max / mean)`` over ranks of ``key`` (``Traffic.per_rank``); an
    owner of blocks every rank selects sends them to all ``P - 1`` others."""
    per = traffic.per_rank(key)
    top, mean = max(per), sum(per) / len(per)
    return top, mean, top / mean if mean > 0 else 1.0
