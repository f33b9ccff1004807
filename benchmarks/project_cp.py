"""Projected per-layer time, bytes per rank per link class and memory of context-parallel
MoBA, 128K-10M tokens, for every strategy and the dense baselines.

    python benchmarks/project_cp.py project --gpu h200 --tokens 1048576 --world 64 --alpha 1
    python benchmarks/project_cp.py sweep --gpu h200      # results/projection_sweep.*
    python benchmarks/project_cp.py sensitivity --gpu h200  # results/projection_sensitivity.md
    python benchmarks/project_cp.py hot --gpu h200        # hot blocks: per-rank send bytes

Selective rows: ``cp_model.py`` (expected over a Zipf routing model of concentration alpha).
Bytes, time and memory: ``moba_dist.parallel.cost_model`` (the library's accounting; the one
source of truth), fed per-rank kernel times: useful FLOPs / throughput from the benchmark
tool's ``results/<gpu>/<date>/rows.json`` (``python -m benchmarks.moba_bench local``; older flat
``results/<gpu>*.json`` tables as a fallback), else constants, labelled ASSUMED. Model and
assumptions: docs/scale_model.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cp_model as cm
from project_report import STRATEGIES, plot_sweep, sweep_markdown

from moba_dist.parallel import cost_model as cost

__all__ = ["STRATEGIES", "Case", "Compute", "all_costs", "hot_blocks", "load_compute", "main",
           "project"]  # fmt: skip

RESULTS = Path(__file__).resolve().parent / "results"
# Links of an 8-GPU HGX/DGX node (H100 and H200 share NVLink 4 and 400G NICs): NVLink 4 is
# 450 GB/s per direction per GPU, NCCL all-to-all reaches ~80% -> 360; one 400 Gb/s
# ConnectX-7 per GPU is 50 GB/s per direction, ~80% -> 40. Kernel throughputs (useful TFLOP/s,
# fwd / fwd+bwd; the gate as 2*D FLOPs per scored (query, head, block)) come from the first
# table pattern that matches (H200: H100 tables until an H200 run exists, same GH100 compute),
# else these constants, labelled ASSUMED: the interim H100 runs at B=4096, K=12 rounded.
_HOPPER = dict(nvlink=360.0, net=40.0, node=8, lat_us=30.0, dense=(450.0, 320.0),
               moba=(170.0, 95.0), gate=1.2)  # fmt: skip
_H100, _H200 = ("nvidia-h100*/*/rows.json", "nvidia-h100*.json"), ("nvidia-h200*/*/rows.json",
                                                                "nvidia-h200*.json")  # fmt: skip
PRESETS = {"h100": dict(_HOPPER, tables=_H100), "h200": dict(_HOPPER, tables=_H200 + _H100)}
KINDS = ("moba_fwd", "moba_fwdbwd", "dense_fwd", "dense_fwdbwd", "gate")
MOBA_BACKENDS = ("triton", "triton-raw")  # table rows of the MoBA op with the torch gate


@dataclass
class Compute:
    """Per kind (KINDS; MoBA without its gate): log-log curves of TFLOP/s over call FLOPs."""

    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: dict[str, str]

    def ms(self, kind: str, flops: np.ndarray) -> np.ndarray:
        """Milliseconds for calls of ``flops`` useful FLOPs (clamped to the table's range)."""
        tflops = np.exp(np.interp(np.log(np.maximum(flops, 1.0)), *self.curves[kind]))
        return flops / (tflops * 1e9)


def _kernel_rows(data) -> list[dict]:
    """Single-sequence op rows of a ``rows.json`` run (schema 1) or of a legacy flat table."""
    if isinstance(data, dict):
        return [r for r in data.get("rows", []) if r.get("job") == "local" and r.get("kind") == "op"
                and r.get("nseq", 1) == 1 and "T" in r]  # fmt: skip
    return [r for r in data if "T" in r]


def _table_rows(patterns, table: str | None) -> tuple[list[dict], list[str]]:
    """Kernel rows of ``table`` or of the first pattern's files (newer rows win)."""
    files = [table] if table else []
    for pat in () if table else patterns:
        files = files or sorted((f for f in glob.glob(str(RESULTS / pat)) if "_tune" not in f),
                                key=lambda f: Path(f).stat().st_mtime)  # fmt: skip
    rows: dict = {}
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
            rows.update({(r["case"], r["backend"]): r for r in _kernel_rows(data)})
        except (ValueError, TypeError, KeyError) as e:
            raise SystemExit(f"error: {f} is not a benchmark rows table ({e!r})") from None
    return list(rows.values()), files


def _table_points(rows: list[dict], d: int, block: int, backends) -> dict[str, list]:
    """(FLOPs, TFLOP/s) per kind: MoBA from the fastest listed backend per case (same D and B
    where present) minus its torch-gate time, the gate itself, dense causal (same D)."""
    rows = [r for r in rows if not r.get("error")]
    rows = [r for r in rows if r["D"] == d] or rows
    moba = [r for r in rows if r["backend"] in backends]
    moba = [r for r in moba if r["block"] == block] or moba
    pts: dict[str, list] = {}

    def add(kind, flops, ms):
        if ms and ms > 0:
            pts.setdefault(kind, []).append((flops, flops / ms / 1e9))

    for case in sorted({r["case"] for r in moba}):
        r, rs = next(r for r in moba if r["case"] == case), [r for r in moba if r["case"] == case]
        keys = cm.rank_keys(cm.build_geometry([r["T"]], r["block"], 1, "contiguous"), r["topk"])
        gate_ms = r.get("gate_ms", r.get("gate_torch_ms")) or 0.0
        f = 4.0 * r["D"] * r["Hq"] * keys["moba"][0]
        for kind, mult, key in (("moba_fwd", 1.0, "fwd_ms"), ("moba_fwdbwd", 3.5, "fwdbwd_ms")):
            best = min((x[key] for x in rs if x.get(key)), default=None)
            add(kind, mult * f, best and best - gate_ms)
        add("gate", 2.0 * r["D"] * r["Hq"] * keys["gate"][0], gate_ms)
    for r in {r["case"]: r for r in rows}.values():
        dense = 4.0 * r["D"] * r["Hq"] * r["T"] * (r["T"] + 1) / 2
        add("dense_fwd", dense, r.get("dense_fwd_ms"))
        add("dense_fwdbwd", 3.5 * dense, r.get("dense_fwdbwd_ms"))
    return pts


def load_compute(preset: dict, table, d: int, block: int, backends, over: dict) -> Compute:
    """Measured curves where the table has points, constants (labelled ASSUMED) elsewhere."""
    rows, files = _table_rows(preset["tables"], table)
    pts = _table_points(rows, d, block, backends)
    moba, dense, gate = (over.get(k) or preset[k] for k in ("moba", "dense", "gate"))
    consts = dict(zip(KINDS, (*moba, *dense, gate), strict=True))
    curves, labels = {}, {}
    for kind in KINDS:
        p = sorted(set(pts.get(kind, [])))
        if p:
            curves[kind] = (np.log([a for a, _ in p]), np.log([b for _, b in p]))
            names = ", ".join(
                str(Path(f).resolve().relative_to(RESULTS.parent.parent))
                if RESULTS in Path(f).resolve().parents
                else f
                for f in files
            )
            labels[kind] = f"measured, {len(p)} points, {names}"
        else:
            curves[kind] = (np.zeros(1), np.log([consts[kind]]))
            labels[kind] = f"ASSUMED {consts[kind]:g} TFLOP/s (not measured)"
    return Compute(curves, labels)


@dataclass(frozen=True)
class Case:
    """Model shape, tokens (one sequence), ranks, MoBA, routing alpha, payload bytes/element,
    the streamed strategy's fetch budget and the memory ``auto`` may use (GiB per rank)."""

    tokens: int
    world: int
    hq: int = 32
    hkv: int = 8
    d: int = 128  # head dim
    layers: int = 32
    block: int = 4096
    topk: int = 12
    layout: str = "zigzag"
    alpha: float = 1.0
    elem: int = 2  # payload bytes per element (bf16)
    max_fetch_gib: float = 4.0
    memory_gib: float = 16.0

    def padded(self) -> Case:
        """Tokens rounded up to what the layout needs (as pad_for_cp would)."""
        m = 2 * self.world if self.layout == "zigzag" else self.world
        return replace(self, tokens=-(-self.tokens // m) * m)

    def shape(self, world: int | None = None, hq: int | None = None, hkv: int | None = None):
        """The cost model's :class:`~moba_dist.parallel.cost_model.Shape` (optionally of a
        sub-level: fewer ranks or a head slice)."""
        return cost.Shape(self.tokens, world or self.world, hq or self.hq, hkv or self.hkv,
                          self.d, self.elem, self.block)  # fmt: skip


def traffic(case: Case, cache: dict, world: int | None = None):
    """Geometry at ``world`` ranks (default the case's), routing probabilities ``p [N, N]``
    (cached by N, K, alpha) and the selective rows ``[P, P]`` summed over KV heads."""
    geom = cm.build_geometry([case.tokens], case.block, world or case.world, case.layout)
    key = (geom.num_blocks, case.topk, case.alpha)
    if key not in cache:
        cache[key] = cm.route_probs(cm.index_rank(geom), geom.seq_first, case.topk, case.alpha)
    u = cm.model_union(cache[key], geom, case.hq // case.hkv)
    return geom, cache[key], cm.rows_matrix(geom, u[None]) * case.hkv


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def kernels(case: Case, comp: Compute, keys: dict, share, heads: float, repeat: int = 1):
    """Per-rank kernel ms of the MoBA op for ``heads`` query heads over the keys ``keys[...]``
    of each rank (``repeat``: ranks sharing one entry, the members of a hybrid sub-group)."""
    flops = 4.0 * case.d * heads * keys["moba"]
    f = comp.ms("moba_fwd", flops)
    b = np.maximum(comp.ms("moba_fwdbwd", 3.5 * flops) - f, 0.0)
    gate = comp.ms("gate", 2.0 * case.d * heads * keys["gate"])
    per = [np.repeat(np.broadcast_to(x, keys["moba"].shape), repeat) for x in (f, b, gate, share)]
    return cost.Kernels(*map(_t, per))


def dense_steps(case: Case, comp: Compute, keys: dict, heads: float, steps: int, repeat: int):
    """ms ``[P]`` of one ring step (fwd, bwd) of dense causal attention: ``1 / steps`` of a
    rank's causal keys for ``heads`` query heads."""
    flops = 4.0 * case.d * heads * keys["dense"] / steps
    f = comp.ms("dense_fwd", flops)
    b = np.maximum(comp.ms("dense_fwdbwd", 3.5 * flops) - f, 0.0)
    return _t(np.repeat(f, repeat)), _t(np.repeat(b, repeat))


def _hybrid(case: Case, links: cost.Links, comp: Compute, cache: dict) -> dict:
    """``hybrid`` (heads in a node, the cheaper MoBA sequence strategy across nodes) and dense
    ring attention under the same split; empty where the split does not apply."""
    sub = links.gpus_per_node
    if case.world <= sub or case.world % sub or case.hq % sub:
        return {}
    groups = case.world // sub
    nkv = max(cost.head_spans(case.hq, case.hkv, sub)[1])
    outer = case.shape(world=groups, hq=case.hq // sub, hkv=nkv)
    inner_shape = cost.Shape(case.tokens // groups, sub, case.hq, case.hkv, case.d, case.elem,
                             case.block)  # fmt: skip
    geom, p, rows = traffic(case, cache, groups)
    keys = cm.rank_keys(geom, case.topk)
    kern = kernels(case, comp, keys, cm.local_key_share(geom, p, case.topk), case.hq / sub, sub)
    inner = cost.heads_traffic(inner_shape)
    out, fetch = {}, case.max_fetch_gib * 2**30
    for name, tr, budget in (("selective", cost.selective_traffic(outer, _t(rows) / case.hkv * nkv),
                              None), ("allgather", cost.allgather_traffic(outer), None),
                             ("streamed", cost.selective_traffic(outer, _t(rows) / case.hkv * nkv),
                              fetch)):  # fmt: skip
        heads_p, outer_p = cost.hybrid_traffic(inner, tr, sub)
        seq = cost.sequence_cost(name, outer, outer_p, kern, links, budget, stride=sub)
        out[f"hybrid/{name}"] = cost.add_heads(seq, heads_p, links, "hybrid")
    fits = {n: c for n, c in out.items() if c.memory_bytes <= case.memory_gib * 2**30} or out
    best = min(fits, key=lambda n: fits[n].total_ms)
    step_f, step_b = dense_steps(case, comp, keys, case.hq / sub, groups, sub)
    ring = cost.ring_cost(outer, step_f, step_b, links, "dense-hybrid", stride=sub)
    ring_p = cost.hybrid_traffic(inner, cost.allgather_traffic(outer), sub)[0]
    outer_s = {n.split("/")[1]: case.layers * c.total_ms / 1e3 for n, c in out.items()}
    return {"hybrid": out[best], "hybrid_outer": best.split("/")[1], "hybrid_outer_s": outer_s,
            "dense-hybrid": cost.add_heads(ring, ring_p, links, "dense-hybrid")}  # fmt: skip


def all_costs(case: Case, links: cost.Links, comp: Compute, cache: dict) -> tuple[dict, dict]:
    """Every strategy's :class:`~moba_dist.parallel.cost_model.Cost` for ``case`` (padded),
    plus the traffic facts: union fractions and the hybrid's outer strategy."""
    geom, p, rows = traffic(case, cache)
    keys, share = cm.rank_keys(geom, case.topk), cm.local_key_share(geom, p, case.topk)
    shape, kern = case.shape(), kernels(case, comp, keys, share, case.hq)
    sel = cost.selective_traffic(shape, _t(rows))
    costs = {
        "allgather": cost.sequence_cost("allgather", shape, cost.allgather_traffic(shape), kern,
                                        links),
        "selective": cost.sequence_cost("selective", shape, sel, kern, links),
        "streamed": cost.sequence_cost("streamed", shape, sel, kern, links,
                                       case.max_fetch_gib * 2**30),
    }  # fmt: skip
    if case.hq % case.world == 0:  # the op on the whole sequence for Hq / P heads
        whole = cm.rank_keys(cm.build_geometry([case.tokens], case.block, 1, "contiguous"),
                             case.topk)  # fmt: skip
        hk = kernels(case, comp, whole, np.ones(1), case.hq / case.world, case.world)
        heads = cost.heads_traffic(shape)
        costs["heads"] = cost.heads_cost(shape, heads, hk, links)
        f, b = dense_steps(case, comp, whole, case.hq / case.world, 1, case.world)
        dense = cost.Kernels(f, b, torch.zeros_like(f))  # dense attention under the same split
        costs["dense-heads"] = cost.heads_cost(shape, heads, dense, links, "dense-heads")
    hybrid = _hybrid(case, links, comp, cache)
    costs |= {k: v for k, v in hybrid.items() if k in ("hybrid", "dense-hybrid")}
    costs["dense-ring"] = cost.ring_cost(shape, *dense_steps(case, comp, keys, case.hq,
                                                             case.world, 1), links)  # fmt: skip
    union = rows.sum(1) / max((case.tokens - case.tokens // case.world) * case.hkv, 1)
    facts = dict(union_fraction_max=float(union.max()), union_fraction_mean=float(union.mean()),
                 hybrid_outer=hybrid.get("hybrid_outer"),
                 hybrid_outer_step_s=hybrid.get("hybrid_outer_s"))  # fmt: skip
    return costs, facts


def project(case: Case, links: cost.Links, comp: Compute, cache: dict | None = None) -> dict:
    """Per-layer projection of every strategy for ``case`` (tokens padded as needed)."""
    case = case.padded()
    costs, facts = all_costs(case, links, comp, {} if cache is None else cache)
    out = dict(case=asdict(case), **facts, strategies={})
    for name, c in costs.items():
        s = c.summary() | dict(step_s=case.layers * c.total_ms / 1e3,
                               remote_kv_gib=c.remote_bytes / 2**30,
                               memory_gib=c.memory_bytes / 2**30)  # fmt: skip
        out["strategies"][name] = {k: v / 2**20 if k.endswith("_max") else v for k, v in s.items()}
    moba = {n: c for n, c in costs.items() if n in cost.STRATEGIES}
    out["auto"] = cost.choose(moba, case.memory_gib * 2**30)
    out["winner"] = min(costs, key=lambda n: costs[n].total_ms)
    return out


def hot_blocks(case: Case, links: cost.Links, cache: dict | None = None) -> dict:
    """Hot blocks (issue 15 item 4): per-rank forward send bytes of ``selective`` (an owner of
    blocks everyone selects sends them to all), their max / mean ratio, and the forward fetch's
    ms bound by the busiest sender vs by the busiest receiver, flat over ``case.world`` ranks
    and at the outer level of ``hybrid`` (one head slice across the nodes)."""
    case = case.padded()
    cache = {} if cache is None else cache
    out = {}
    levels = [("flat", case.world, case.hkv)]
    if case.world > links.gpus_per_node and case.world % links.gpus_per_node == 0:
        sub = links.gpus_per_node
        levels.append(("hybrid-outer", case.world // sub,
                       max(cost.head_spans(case.hq, case.hkv, sub)[1])))  # fmt: skip
    for name, world, hkv in levels:
        _, _, rows = traffic(case, cache, world)
        shape = case.shape(world=world, hkv=hkv)
        sel = cost.selective_traffic(shape, _t(rows) / case.hkv * hkv)
        top, mean, ratio = cost.send_ratio(sel)
        fetch = sel.phases["fwd_fetch"]
        stride = links.gpus_per_node if name == "hybrid-outer" else 1
        mat = torch.kron(fetch, torch.eye(stride, dtype=fetch.dtype))  # world-size ranks
        out[name] = dict(world=world, send_max=top, send_mean=mean, send_ratio=ratio,
                         recv_max=max(sel.per_rank("bytes_received")),
                         send_ms=links.direction_ms(mat, "sent"),
                         recv_ms=links.direction_ms(mat, "recv"))  # fmt: skip
    return out


def hot_markdown(a, shape: dict, links: cost.Links) -> str:
    """Markdown table of :func:`hot_blocks` over ``--worlds`` x ``--alphas`` at ``--tokens``."""
    head = ("| T | P | alpha | level | send max / mean | recv max / mean | send max / recv max "
            "| fetch ms, send side | fetch ms, recv side | bound by |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for w in a.worlds:
        cache: dict = {}
        for alpha in a.alphas:
            res = hot_blocks(Case(a.tokens, w, alpha=alpha, **shape), links, cache)
            for level, h in res.items():
                side = "send (hot owners)" if h["send_ms"] > h["recv_ms"] * 1.01 else "receive"
                lines.append(
                    f"| {a.tokens:,} | {w} | {alpha:g} | {level} ({h['world']}) | "
                    f"{h['send_ratio']:.2f} | {h['recv_max'] / max(h['send_mean'], 1):.2f} | "
                    f"{h['send_max'] / max(h['recv_max'], 1):.2f} | "
                    f"{h['send_ms']:.2f} | {h['recv_ms']:.2f} | {side} |"
                )
    return "\n".join(lines) + "\n"


def format_projection(res: dict, links: cost.Links, comp: Compute) -> str:
    """Human-readable table of one projection (times per layer, bytes max over ranks)."""
    c, st, auto = res["case"], res["strategies"], res["auto"]
    vs = ", ".join(f"x{st[n]['step_s'] / st[auto]['step_s']:.2f} vs {n}" for n in st if n != auto)
    return "\n".join([
        f"T={c['tokens']:,} on P={c['world']} GPUs ({links.gpus_per_node} per node), "
        f"Hq={c['hq']} Hkv={c['hkv']} D={c['d']} x{c['layers']} layers, B={c['block']} "
        f"K={c['topk']}, {c['layout']}, {c['elem']} B/elem, routing alpha={c['alpha']:g}",
        f"links: NVLink {links.nvlink_gbs:g} GB/s, network {links.net_gbs:g} GB/s per GPU, "
        f"{links.latency_us:g} us per collective; streamed budget {c['max_fetch_gib']:g} GiB, "
        f"auto memory limit {c['memory_gib']:g} GiB",
        *(f"compute {k}: {v}" for k, v in comp.labels.items()),
        "strategy       fwd ms  bwd ms exposed ms  step s  intra MiB  inter MiB  remote GiB",
        *(f"{n:12s} {s['fwd_ms']:8.1f} {s['bwd_ms']:7.1f} {s['exposed_ms']:10.1f} "
          f"{s['step_s']:7.2f} {s['intra_recv_max']:10.1f} {s['inter_recv_max']:10.1f} "
          f"{s['remote_kv_gib']:11.2f}" for n, s in st.items()),
        f"union fraction max {res['union_fraction_max']:.3f}, mean "
        f"{res['union_fraction_mean']:.3f}; hybrid across nodes: {res['hybrid_outer']} "
        f"(step s by outer strategy: {res['hybrid_outer_step_s']})",
        f"auto (cheapest within the memory limit): {auto} ({vs}); fastest: {res['winner']}",
    ])  # fmt: skip


def _num(kind=int, count: int = 1, strict: bool = True):
    """argparse type: ``count`` comma-separated numbers of ``kind`` (1: a scalar, 0: any
    number of them), each > 0 (>= 0 unless ``strict``); floats accept ``inf``."""

    def parse(text: str):
        try:
            out = [kind(x) for x in text.split(",")]
        except ValueError:
            out = []
        ok = all(x > 0 or (x == 0 and not strict) for x in out) and count in (0, len(out))
        if not out or not ok:
            want = f"{count or 'comma-separated'} {kind.__name__}(s) {'>' if strict else '>='} 0"
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return out[0] if count == 1 else out

    return parse


def sweep(args, shape: dict, links: cost.Links, comp: Compute, marks: list[float]) -> list[dict]:
    """Projections over tokens x worlds x alphas (plus the routing's median alpha)."""
    alphas = sorted(set(args.alphas) | ({float(np.median(marks))} if marks else set()))
    out, cache = [], {}
    for t in args.tokens_grid:
        for w in args.worlds:
            for a in alphas:
                out.append(project(Case(t, w, alpha=a, **shape), links, comp, cache))
                out[-1]["case"]["T"] = t  # as requested (``tokens`` is padded)
        cache.clear()
    return out


def sensitivity(a, shape: dict, links: cost.Links, comp: Compute) -> str:
    """Markdown: what ``auto`` takes and its speed-up over the dense baselines for each network
    bandwidth of ``--net-grid`` (tokens x worlds of the grid, one alpha)."""
    lines = ["| T | P | net GB/s | auto | auto s | dense-ring s | dense, same split s | x ring "
             "| x same split | auto remote GiB |", "|" + "---|" * 10]  # fmt: skip
    for t in a.tokens_grid:
        for w in a.worlds:
            for net in a.net_grid:
                r = project(Case(t, w, alpha=a.alpha, **shape), replace(links, net_gbs=net), comp)
                st, auto = r["strategies"], r["auto"]
                fair = st.get("dense-hybrid", st.get("dense-heads", st["dense-ring"]))
                name = auto + (f" ({r['hybrid_outer']})" if auto == "hybrid" else "")
                lines.append(
                    f"| {t:,} | {w} | {net:g} | {name} | {st[auto]['step_s']:.1f} | "
                    f"{st['dense-ring']['step_s']:.1f} | {fair['step_s']:.1f} | "
                    f"{st['dense-ring']['step_s'] / st[auto]['step_s']:.2f} | "
                    f"{fair['step_s'] / st[auto]['step_s']:.2f} | {st[auto]['remote_kv_gib']:.2f} |"
                )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and MoBA (defaults: the main case, Llama-3-8B-like)")
    for name, val in (("hq", 32), ("hkv", 8), ("head-dim", 128), ("layers", 32),
                      ("block", 4096), ("topk", 12), ("elem-bytes", 2)):  # fmt: skip
        g.add_argument(f"--{name}", type=_num(), default=val, metavar="N")
    g.add_argument("--layout", choices=cm.LAYOUTS, default="zigzag")
    g.add_argument("--max-fetch-gib", type=_num(float), default=4.0,
                   help="streamed: fetched K/V held at once per rank")  # fmt: skip
    g.add_argument("--memory-gib", type=_num(float), default=16.0,
                   help="auto: memory one layer call may hold per rank")  # fmt: skip
    h = common.add_argument_group("hardware (defaults: the --gpu preset, see PRESETS)")
    h.add_argument("--gpu", choices=sorted(PRESETS), default="h100")
    for name in ("nvlink-gbs", "net-gbs", "latency-us", "gate-tflops"):
        h.add_argument(f"--{name}", type=_num(float))
    h.add_argument("--gpus-per-node", type=_num())
    for name in ("moba", "dense"):
        h.add_argument(f"--{name}-tflops", type=_num(float, 2), metavar="FWD,FWDBWD",
                       help="useful TFLOP/s where the table has no points (assumed)")  # fmt: skip
    h.add_argument(
        "--table",
        help="a rows.json of the benchmark tool (default: the newest "
        "results/<gpu preset>*/*/rows.json)",
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("project", parents=[common], help="one case, all strategies")
    p.add_argument("--tokens", type=_num(), default=1 << 20)
    p.add_argument("--world", type=_num(), default=64)
    p.add_argument("--alpha", type=_num(float, strict=False), default=1.0, help="0 ... inf")
    p.add_argument("--json", type=Path, help="also write the projection here")
    s = sub.add_parser("sweep", parents=[common], help="tokens x GPUs x alpha -> md/json/png")
    grid = [1 << e for e in range(17, 24)] + [10**7]  # 128K ... 8M, 10M
    s.add_argument("--tokens-grid", type=_num(count=0), default=grid)
    s.add_argument("--worlds", type=_num(count=0), default=[8, 64, 256])
    s.add_argument("--alphas", type=_num(float, 0, False), default=[0, 0.5, 1, 1.5, 2, 3, math.inf])
    s.add_argument("--routing", type=Path, help="examples/train_cp.py's routing.pt: mark alpha")
    s.add_argument("--heads-per-group", type=_num(), default=1, help="heads pooled per fit")
    s.add_argument("--focus-world", type=_num(), default=64, help="P of the alpha panel")
    s.add_argument("--out-prefix", type=Path, default=RESULTS / "projection_sweep")
    n = sub.add_parser("sensitivity", parents=[common], help="auto vs dense over network GB/s")
    n.add_argument("--tokens-grid", type=_num(count=0), default=[1 << 20, 10**7])
    n.add_argument("--worlds", type=_num(count=0), default=[64, 256])
    n.add_argument("--net-grid", type=_num(float, 0), default=[20.0, 40.0, 80.0])
    n.add_argument("--alpha", type=_num(float, strict=False), default=1.0)
    n.add_argument("--out", type=Path, default=RESULTS / "projection_sensitivity.md")
    hb = sub.add_parser("hot", parents=[common], help="hot blocks: per-rank send bytes")
    hb.add_argument("--tokens", type=_num(), default=1 << 20)
    hb.add_argument("--worlds", type=_num(count=0), default=[8, 64, 256])
    hb.add_argument("--alphas", type=_num(float, 0, False), default=[0, 1, 2, 3, math.inf])
    hb.add_argument("--out", type=Path, help="also write the table here")
    return ap


def _setup(ap: argparse.ArgumentParser, a) -> tuple[dict, cost.Links, Compute]:
    """Validate the arguments; model shape, links and compute of the run."""
    if a.hq % a.hkv:
        ap.error(f"--hq {a.hq} must be a multiple of --hkv {a.hkv}")
    if a.table and not Path(a.table).is_file():
        ap.error(f"--table {a.table}: no such file")
    if getattr(a, "routing", None) and not a.routing.is_file():
        ap.error(f"--routing {a.routing}: no such file (examples/train_cp.py writes it)")
    pre = PRESETS[a.gpu]
    links = cost.Links(a.nvlink_gbs or pre["nvlink"], a.net_gbs or pre["net"],
                       a.gpus_per_node or pre["node"], a.latency_us or pre["lat_us"])  # fmt: skip
    over = dict(moba=a.moba_tflops, dense=a.dense_tflops, gate=a.gate_tflops)
    shape = dict(hq=a.hq, hkv=a.hkv, d=a.head_dim, layers=a.layers, block=a.block,
                 topk=a.topk, layout=a.layout, elem=a.elem_bytes, max_fetch_gib=a.max_fetch_gib,
                 memory_gib=a.memory_gib)  # fmt: skip
    comp = load_compute(pre, a.table, a.head_dim, a.block, MOBA_BACKENDS, over)
    return shape, links, comp


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    shape, links, comp = _setup(ap, a)
    if a.cmd == "project":
        res = project(Case(a.tokens, a.world, alpha=a.alpha, **shape), links, comp)
        print(format_projection(res, links, comp))
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
        return 0
    if a.cmd == "hot":
        md = hot_markdown(a, shape, links)
        if a.out:
            a.out.write_text(f"`{' '.join(sys.argv)}`\n\n" + md)
        print(md)
        return 0
    if a.cmd == "sensitivity":
        md = sensitivity(a, shape, links, comp)
        a.out.write_text(f"`{' '.join(sys.argv)}`\n\n" + md)
        print(md)
        return 0
    marks = cm.routing_alphas(str(a.routing), a.heads_per_group) if a.routing else []
    rows = sweep(a, shape, links, comp, marks)
    meta = {"links": asdict(links), "compute": comp.labels, "routing_alphas": marks}
    a.out_prefix.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}))
    md = sweep_markdown(rows, marks)
    a.out_prefix.with_suffix(".md").write_text(f"`{' '.join(sys.argv)}`\n\n" + md)
    plot_sweep(rows, a.out_prefix.with_suffix(".png"), marks, a.focus_world)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
