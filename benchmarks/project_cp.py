"""Projected per-layer time and bytes per rank of context-parallel MoBA, 128K-10M tokens.

    python benchmarks/project_cp.py project --tokens 1048576 --world 64 --alpha 1
    python benchmarks/project_cp.py sweep [--routing OUT/routing.pt]   # results/projection_sweep.*

Bytes: ``cp_model.py`` (the library's accounting, expected over a Zipf routing model of
concentration alpha). Time of one layer on rank r (then the slowest rank):

    MoBA fwd = plan + gate + max(fetch, a_r * attn_f) + (1 - a_r) * attn_f
    MoBA bwd = max(refetch, a_r * attn_b) + (1 - a_r) * attn_b + grad_return
    ring fwd = c + (P-1) * max(hop_kv, c);  ring bwd = c_b + (P-1) * max(hop_kv + hop_dkv, c_b)
               + hop_dkv  (dense CP: P steps of causal attention c, c_b against one rank's KV)

a_r = locally held share of attended keys. Collective: max(intra / bw_nvlink, inter / bw_net)
over each rank's bytes + latency. Kernels: useful FLOPs / throughput from the benchmark tool's
``results/<gpu>/<date>/rows.json`` (``python -m benchmarks.moba_bench local``; older flat
``results/<gpu>*.json`` tables as a fallback), else constants, labelled ASSUMED. Assumptions:
docs/scale_model.md.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cp_model as cm

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("selective", "allgather", "dense-ring")
AUTO_ALLGATHER_FRACTION = 0.5  # moba_dist.parallel.plan: auto all-gathers above this union
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


@dataclass(frozen=True)
class Links:
    """Per-GPU GB/s (1e9 B/s, one direction), GPUs per node, us per collective or ring hop."""

    nvlink: float
    net: float
    node: int
    lat_us: float

    def bw(self, world: int) -> float:
        """Bottleneck of a ring over ``world`` ranks, bytes per ms."""
        return (self.net if world > self.node else self.nvlink) * 1e6


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
            labels[kind] = f"measured, {len(p)} points, {', '.join(Path(f).name for f in files)}"
        else:
            curves[kind] = (np.zeros(1), np.log([consts[kind]]))
            labels[kind] = f"ASSUMED {consts[kind]:g} TFLOP/s (not measured)"
    return Compute(curves, labels)


@dataclass(frozen=True)
class Case:
    """Model shape, tokens (one sequence), ranks, MoBA, routing alpha, payload bytes/element."""

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

    def padded(self) -> Case:
        """Tokens rounded up to what the layout needs (as pad_for_cp would)."""
        m = 2 * self.world if self.layout == "zigzag" else self.world
        return replace(self, tokens=-(-self.tokens // m) * m)


def collective_ms(mat: np.ndarray, links: Links) -> float:
    """ms of an all-to-all of ``mat [P, P]`` bytes (r receives ``mat[r, o]`` from o)."""
    node = np.arange(mat.shape[0]) // links.node
    same, per = node[:, None] == node[None, :], []
    for axis in (1, 0):  # received, sent
        intra, inter = (np.where(m, mat, 0.0).sum(axis) for m in (same, ~same))
        per.append(np.maximum(intra / (links.nvlink * 1e6), inter / (links.net * 1e6)))
    return float(np.maximum(*per).max()) + links.lat_us / 1e3


def traffic(case: Case, cache: dict):
    """Geometry, routing probabilities ``p [N, N]`` (cached by N, K, alpha), rows ``[P, P]``."""
    geom = cm.build_geometry([case.tokens], case.block, case.world, case.layout)
    key = (geom.num_blocks, case.topk, case.alpha)
    if key not in cache:
        cache[key] = cm.route_probs(cm.index_rank(geom), geom.seq_first, case.topk, case.alpha)
    u = cm.model_union(cache[key], geom, case.hq // case.hkv)
    return geom, cache[key], cm.rows_matrix(geom, u[None]) * case.hkv


def moba_ms(case, links, comp, keys, share, fetch, ret, n_coll) -> tuple:
    """Forward and backward ms ``[P]`` of the CP op (one layer), and their parts."""
    flops = 4.0 * case.d * case.hq * keys["moba"]
    f = comp.ms("moba_fwd", flops)
    b = np.maximum(comp.ms("moba_fwdbwd", 3.5 * flops) - f, 0.0)
    gate = comp.ms("gate", 2.0 * case.d * case.hq * keys["gate"])
    cent = case.tokens / case.block * case.hkv * case.d * 4.0  # float32 centroid sums
    plan = n_coll * links.lat_us / 1e3 + 2.0 * cent / links.bw(case.world)
    fwd = plan + gate + np.maximum(fetch, share * f) + (1.0 - share) * f
    bwd = np.maximum(fetch, share * b) + (1.0 - share) * b + ret
    return fwd, bwd, dict(gate=gate, attention=f + b, exposed_comm=fwd + bwd - gate - f - b)


def ring_ms(case: Case, links: Links, comp: Compute, keys) -> tuple:
    """Ring attention (ring-flash-attn style; float32 dK/dV): fwd, bwd ms ``[P]`` and parts."""
    world, tl = case.world, case.tokens // case.world
    step = 4.0 * case.d * case.hq * keys["dense"] / world  # FLOPs per step
    c = comp.ms("dense_fwd", step)
    cb = np.maximum(comp.ms("dense_fwdbwd", 3.5 * step) - c, 0.0)
    if world == 1:
        return c, cb, dict(attention=c + cb, exposed_comm=0.0 * c)
    lat = links.lat_us / 1e3
    hop = tl * case.hkv * 2 * case.d * case.elem / links.bw(world) + lat
    hop_g = tl * case.hkv * 2 * case.d * max(4, case.elem) / links.bw(world) + lat
    fwd = c + (world - 1) * np.maximum(hop, c)
    bwd = cb + (world - 1) * np.maximum(hop + hop_g, cb) + hop_g
    return fwd, bwd, dict(attention=world * (c + cb), exposed_comm=fwd + bwd - world * (c + cb))


def project(case: Case, links: Links, comp: Compute, cache: dict | None = None) -> dict:
    """Per-layer projection of the three strategies for ``case`` (tokens padded as needed)."""
    case = case.padded()
    geom, p, rows = traffic(case, {} if cache is None else cache)
    keys, share = cm.rank_keys(geom, case.topk), cm.local_key_share(geom, p, case.topk)
    by = cm.strategy_bytes(rows, case.tokens, case.hkv, case.d, case.elem)
    row, grow = 2 * case.d * case.elem, 2 * case.d * max(4, case.elem)
    full = (1.0 - np.eye(case.world)) * (case.tokens // case.world) * case.hkv  # [P, P] rows
    times = {
        "selective": moba_ms(case, links, comp, keys, share, collective_ms(rows * row, links),
                             collective_ms(rows.T * grow, links), 6),
        "allgather": moba_ms(case, links, comp, keys, share, collective_ms(full * row, links),
                             collective_ms(full * grow, links), 4),
        "dense-ring": ring_ms(case, links, comp, keys),
    }  # fmt: skip
    # Remote K/V rows held at once: a ring holds two chunks (the one in use, the one arriving).
    kv = dict(selective=rows.sum(1).max(), allgather=full.sum(1).max())
    kv["dense-ring"] = 2.0 * full[0, -1]
    union = rows.sum(1) / max((case.tokens - case.tokens // case.world) * case.hkv, 1)
    out = dict(case=asdict(case), union_fraction_max=float(union.max()),
               union_fraction_mean=float(union.mean()), strategies={})  # fmt: skip
    for name, (fwd, bwd, parts) in times.items():
        s = dict(fwd_ms=float(fwd.max()), bwd_ms=float(bwd.max()),
                 parts_ms={k: float(v.max()) for k, v in parts.items()},
                 step_s=case.layers * float(fwd.max() + bwd.max()) / 1e3,
                 remote_kv_gib=float(kv[name] * row / 2**30))  # fmt: skip
        by_name = by.get(name, by["allgather"])  # a ring moves what the all-gather moves
        out["strategies"][name] = s | {f"{k}_mib_max": v.max() / 2**20 for k, v in by_name.items()}
    out["winner"] = min(STRATEGIES, key=lambda n: out["strategies"][n]["step_s"])
    out["auto"] = "allgather" if union.max() > AUTO_ALLGATHER_FRACTION else "selective"
    return out


def format_projection(res: dict, links: Links, comp: Compute) -> str:
    """Human-readable table of one projection (times per layer, bytes max over ranks)."""
    c, st, win = res["case"], res["strategies"], res["winner"]
    vs = ", ".join(f"x{st[n]['step_s'] / st[win]['step_s']:.2f} vs {n}" for n in st if n != win)
    return "\n".join([
        f"T={c['tokens']:,} on P={c['world']} GPUs ({links.node} per node), Hq={c['hq']} "
        f"Hkv={c['hkv']} D={c['d']} x{c['layers']} layers, B={c['block']} K={c['topk']}, "
        f"{c['layout']}, {c['elem']} B/elem, routing alpha={c['alpha']:g}",
        f"links: NVLink {links.nvlink:g} GB/s, network {links.net:g} GB/s per GPU, "
        f"{links.lat_us:g} us per collective",
        *(f"compute {k}: {v}" for k, v in comp.labels.items()),
        "strategy     fwd ms  bwd ms  step s(attn)  fwd recv MiB  bwd recv MiB  remote KV GiB",
        *(f"{n:10s} {s['fwd_ms']:8.1f} {s['bwd_ms']:7.1f} {s['step_s']:13.2f} "
          f"{s['fwd_recv_mib_max']:13.1f} {s['bwd_recv_mib_max']:13.1f} "
          f"{s['remote_kv_gib']:14.2f}" for n, s in st.items()),
        f"union fraction max {res['union_fraction_max']:.3f}, mean "
        f"{res['union_fraction_mean']:.3f}; strategy='auto' takes {res['auto']}",
        f"winner: {win} ({vs})"])  # fmt: skip


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


def sweep(args, shape: dict, links: Links, comp: Compute, marks: list[float]) -> list[dict]:
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


def sweep_markdown(rows: list[dict], marks: list[float], show=(1 << 20, 10_000_000)) -> str:
    """Per (T in ``show``, P, alpha): union fraction, attention step time per strategy, and the
    faster MoBA strategy's gate / attention / exposed-communication ms per layer."""
    lines = ["| T | P | alpha | union max | selective s | allgather s | dense-ring s | winner | "
             "MoBA gate / attn / comm ms |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in (r for r in rows if r["case"]["T"] in show):
        c, s = r["case"], {k: f"{v['step_s']:.1f}" for k, v in r["strategies"].items()}
        moba = min(("selective", "allgather"), key=lambda n: r["strategies"][n]["step_s"])
        parts = " / ".join(f"{v:.0f}" for v in r["strategies"][moba]["parts_ms"].values())
        cells = [f"{c['T']:,}", c["world"], f"{c['alpha']:.3g}", f"{r['union_fraction_max']:.3f}",
                 *s.values(), r["winner"], parts]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if marks:
        lines.append(f"\nrouting alpha: median {np.median(marks):.2f} over {len(marks)} "
                     f"fits (layer, heads), range {min(marks):.2f}-{max(marks):.2f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def _curve(rows: list[dict], x, y, **want) -> tuple[list, list]:
    """Points (x(row), y(row)) sorted by x, of the rows whose case matches ``want``."""
    pts = sorted((x(r), y(r)) for r in rows if all(r["case"][k] == v for k, v in want.items()))
    return [a for a, _ in pts], [b for _, b in pts]


def _step(name: str):
    """Row -> attention step time of strategy ``name`` (``moba``: the faster MoBA one)."""
    names = ("selective", "allgather") if name == "moba" else (name,)
    return lambda r: min(r["strategies"][n]["step_s"] for n in names)


def plot_sweep(rows: list[dict], path: Path, marks: list[float], focus: int) -> bool:
    """Step time vs T (MoBA at the lowest and highest alpha vs dense ring), union fraction vs
    T, and step time vs alpha at 1M/10M tokens on ``focus`` GPUs with the routing's alpha."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    worlds, alphas = (sorted({r["case"][k] for r in rows}) for k in ("world", "alpha"))
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, w in enumerate(worlds):
        col, ls, lo = f"C{i}", ["-", "--", ":", "-."][i % 4], alphas[0]
        x = lambda r: r["case"]["T"]  # noqa: E731
        ax[0].loglog(*_curve(rows, x, _step("dense-ring"), world=w, alpha=lo), "-", color=col,
                     label=f"dense ring, P={w}")  # fmt: skip
        for a, style in ((lo, "--"), (alphas[-1], ":")):
            ax[0].loglog(*_curve(rows, x, _step("moba"), world=w, alpha=a), style, color=col,
                         label=f"MoBA, P={w}, alpha={a:g}")  # fmt: skip
        for j, a in enumerate(alphas):
            pts = _curve(rows, x, lambda r: r["union_fraction_max"], world=w, alpha=a)
            ax[1].semilogx(*pts, ls, color=f"C{j}", label=f"alpha={a:.2g}" if i == 0 else None)
    _alpha_panel(ax[2], rows, marks, focus, alphas)
    ax[0].set(xlabel="tokens", ylabel="attention step time, s (fwd+bwd, all layers)",
              title="MoBA CP (faster strategy) vs dense ring CP")  # fmt: skip
    ax[1].set(xlabel="tokens", ylabel="union fraction (max over ranks)",
              title=f"line style: P = {', '.join(map(str, worlds))}")  # fmt: skip
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _alpha_panel(ax, rows: list[dict], marks: list[float], focus: int, alphas: list) -> None:
    top = max([0.0, *(a for a in alphas if math.isfinite(a))]) + 1.0  # where inf is drawn
    x_of = {a: a if math.isfinite(a) else top for a in alphas}
    for t, col in ((1 << 20, "C0"), (10_000_000, "C3")):
        for name, style in (("selective", "-o"), ("allgather", "--"), ("dense-ring", ":")):
            pts = _curve(rows, lambda r: x_of[r["case"]["alpha"]], _step(name), T=t, world=focus)
            ax.semilogy(*pts, style, color=col, label=f"{name}, T={t:,}")
    if marks:
        label = f"trained routing alpha (fits {min(marks):.2f}-{max(marks):.2f})"
        ax.axvline(min(float(np.median(marks)), top), color="k", label=label)
    grid = [a for a in alphas if not marks or a != float(np.median(marks))]  # the mark: a line
    ax.set_xticks([x_of[a] for a in grid], [f"{a:g}" for a in grid])
    ax.set(xlabel="routing concentration alpha", ylabel="step time, s", title=f"P={focus}")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and MoBA (defaults: the main case, Llama-3-8B-like)")
    for name, val in (("hq", 32), ("hkv", 8), ("head-dim", 128), ("layers", 32),
                      ("block", 4096), ("topk", 12), ("elem-bytes", 2)):  # fmt: skip
        g.add_argument(f"--{name}", type=_num(), default=val, metavar="N")
    g.add_argument("--layout", choices=cm.LAYOUTS, default="zigzag")
    h = common.add_argument_group("hardware (defaults: the --gpu preset, see PRESETS)")
    h.add_argument("--gpu", choices=sorted(PRESETS), default="h100")
    for name in ("nvlink-gbs", "net-gbs", "latency-us", "gate-tflops"):
        h.add_argument(f"--{name}", type=_num(float))
    h.add_argument("--gpus-per-node", type=_num())
    for name in ("moba", "dense"):
        h.add_argument(f"--{name}-tflops", type=_num(float, 2), metavar="FWD,FWDBWD",
                       help="useful TFLOP/s where the table has no points (assumed)")  # fmt: skip
    h.add_argument("--table", help="a rows.json of the benchmark tool (default: the newest "
                   "results/<gpu preset>*/*/rows.json)")
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
    return ap


def _setup(ap: argparse.ArgumentParser, a) -> tuple[dict, Links, Compute]:
    """Validate the arguments; model shape, links and compute of the run."""
    if a.hq % a.hkv:
        ap.error(f"--hq {a.hq} must be a multiple of --hkv {a.hkv}")
    if a.table and not Path(a.table).is_file():
        ap.error(f"--table {a.table}: no such file")
    if getattr(a, "routing", None) and not a.routing.is_file():
        ap.error(f"--routing {a.routing}: no such file (examples/train_cp.py writes it)")
    pre = PRESETS[a.gpu]
    links = Links(a.nvlink_gbs or pre["nvlink"], a.net_gbs or pre["net"],
                  a.gpus_per_node or pre["node"], a.latency_us or pre["lat_us"])  # fmt: skip
    over = dict(moba=a.moba_tflops, dense=a.dense_tflops, gate=a.gate_tflops)
    shape = dict(hq=a.hq, hkv=a.hkv, d=a.head_dim, layers=a.layers, block=a.block,
                 topk=a.topk, layout=a.layout, elem=a.elem_bytes)  # fmt: skip
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
    marks = cm.routing_alphas(str(a.routing), a.heads_per_group) if a.routing else []
    rows = sweep(a, shape, links, comp, marks)
    meta = {"links": asdict(links), "compute": comp.labels, "routing_alphas": marks}
    a.out_prefix.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}))
    a.out_prefix.with_suffix(".md").write_text(md := sweep_markdown(rows, marks))
    plot_sweep(rows, a.out_prefix.with_suffix(".png"), marks, a.focus_world)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
