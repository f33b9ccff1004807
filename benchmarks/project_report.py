"""Tables and plots of ``project_cp.py``'s projections (rows as ``project_cp.project`` returns
them): the sweep's markdown table and its three-panel figure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moba_dist.parallel import cost_model as cost

__all__ = ["STRATEGIES", "plot_sweep", "sweep_markdown"]

#: MoBA strategies (the cost model's), then the dense baselines: ring CP, head-parallel dense
#: attention (Ulysses) and ring CP under MoBA's hybrid split (heads in a node, ring across: USP).
STRATEGIES = (*cost.STRATEGIES, "dense-ring", "dense-heads", "dense-hybrid")


def sweep_markdown(rows: list[dict], marks: list[float], show=(1 << 20, 10_000_000)) -> str:
    """Per (T in ``show``, P, alpha): union fraction, attention step time (s, all layers) per
    strategy, what ``auto`` takes, its speed-up over dense ring CP and over dense attention under
    the same split (hybrid where it applies, else heads), the remote data it holds and its
    inter-node bytes per GPU (received + sent)."""
    lines = ["| T | P | alpha | union max | " + " | ".join(STRATEGIES) + " | auto | x dense-ring "
             "| x dense, same split | auto remote GiB | auto inter-node GiB |",
             "|" + "---|" * (len(STRATEGIES) + 9)]  # fmt: skip
    for r in (r for r in rows if r["case"]["T"] in show):
        c, st, auto = r["case"], r["strategies"], r["auto"]
        steps = [f"{st[n]['step_s']:.1f}" if n in st else "-" for n in STRATEGIES]
        fair = "dense-hybrid" if "dense-hybrid" in st else "dense-heads"
        vs = [f"{st[d]['step_s'] / st[auto]['step_s']:.2f}" if d in st else "-"
              for d in ("dense-ring", fair)]  # fmt: skip
        inter = (st[auto]["inter_recv_max"] + st[auto]["inter_sent_max"]) / 1024
        cells = [f"{c['T']:,}", c["world"], f"{c['alpha']:.3g}", f"{r['union_fraction_max']:.3f}",
                 *steps, auto + (f" ({r['hybrid_outer']})" if auto == "hybrid" else ""), *vs,
                 f"{st[auto]['remote_kv_gib']:.2f}", f"{inter:.2f}"]  # fmt: skip
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
    """Row -> attention step time of strategy ``name`` (``moba``: what ``auto`` takes)."""
    if name == "moba":
        return lambda r: r["strategies"][r["auto"]]["step_s"]
    return lambda r: r["strategies"].get(name, {}).get("step_s", math.nan)


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
              title="MoBA CP (what auto takes) vs dense ring CP")  # fmt: skip
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
        for name, style in (("moba", "-o"), ("dense-hybrid", "--"), ("dense-ring", ":")):
            pts = _curve(rows, lambda r: x_of[r["case"]["alpha"]], _step(name), T=t, world=focus)
            ax.semilogy(*pts, style, color=col, label=f"{name}, T={t:,}")
    if marks:
        label = f"trained routing alpha (fits {min(marks):.2f}-{max(marks):.2f})"
        ax.axvline(min(float(np.median(marks)), top), color="k", label=label)
    grid = [a for a in alphas if not marks or a != float(np.median(marks))]  # the mark: a line
    ax.set_xticks([x_of[a] for a in grid], [f"{a:g}" for a in grid])
    ax.set(xlabel="routing concentration alpha", ylabel="step time, s", title=f"P={focus}")
