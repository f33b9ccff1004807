"""Labelled PNGs of a run folder (title, axes with units, legend saying what each mark is)."""

from __future__ import annotations

from pathlib import Path

from .dense import YARDSTICK

__all__ = ["plot_all"]

DENSE = "dense = faster of cuDNN SDPA / FA2, same run"


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt, fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def _bars(ax, names: list[str], series: dict[str, list], width: float = 0.8) -> None:
    n = max(len(series), 1)
    for i, (label, vals) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width / n for j in range(len(names))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width / n, label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)


def _op_plots(plt, rows: list[dict], folder: Path) -> list[str]:
    moba = [
        r
        for r in rows
        if r["job"] == "local"
        and r.get("kind") == "op"
        and not r["backend"].startswith("dense")
        and r["backend"] != YARDSTICK
        and "error" not in r
    ]
    if not moba:
        return []
    names = [r["case"] for r in moba]
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    _bars(
        ax[0],
        names,
        {
            "forward": [r.get("speedup_fwd") for r in moba],
            "forward+backward": [r.get("speedup_fwdbwd") for r in moba],
        },
    )
    ax[0].axhline(1.0, color="k", lw=0.8, label="dense (1x)")
    ax[0].set(ylabel="speedup over dense (x)", title=f"MoBA op vs dense causal ({DENSE})")
    dense = {
        r["case"]: r
        for r in rows
        if r["job"] == "local"
        and r.get("kind") == "op"
        and r["backend"].startswith("dense")
        and "error" not in r
    }
    dense_tf = [
        max(
            (
                x.get("tflops_fwdbwd") or 0
                for x in rows
                if x["job"] == "local" and x["case"] == c and x["backend"].startswith("dense")
            ),
            default=0,
        )
        for c in names
    ]
    _bars(
        ax[1],
        names,
        {
            "MoBA fwd": [r.get("tflops_fwd") for r in moba],
            "MoBA fwd+bwd": [r.get("tflops_fwdbwd") for r in moba],
            "best dense fwd+bwd": dense_tf if dense else [None] * len(names),
        },
    )
    ax[1].set(
        ylabel="useful TFLOP/s (fwd+bwd = 3.5x fwd FLOPs)",
        title="Useful throughput (MoBA credited with its density)",
    )
    for a in ax:
        a.set_xlabel("case (heads, tokens, block, topk: see table.md)")
        a.legend(fontsize=8)
    return [_save(plt, fig, folder, "op.png")]


def _layer_plot(plt, rows: list[dict], folder: Path) -> list[str]:
    lay = [
        r
        for r in rows
        if r["job"] == "local" and r.get("kind") == "layer" and r.get("tokens_per_s")
    ]
    if not lay:
        return []
    cases = sorted(
        {r["case"] for r in lay}, key=lambda c: next(r["T"] for r in lay if r["case"] == c)
    )
    backends = sorted({r["backend"] for r in lay})

    def pick(c, b):
        return next(
            (r["tokens_per_s"] / 1e3 for r in lay if r["case"] == c and r["backend"] == b),
            None,
        )

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _bars(ax, cases, {f"attention: {b}": [pick(c, b) for c in cases] for b in backends})
    ax.set(
        xlabel="layer case (dim 4096, 32/8 heads, SwiGLU 14336)",
        ylabel="training throughput, thousand tokens/s (fwd+bwd)",
        title="One transformer layer step: MoBA vs dense attention",
    )
    ax.legend(fontsize=8)
    return [_save(plt, fig, folder, "layer.png")]


def _decode_plot(plt, rows: list[dict], folder: Path) -> list[str]:
    dec = [r for r in rows if r["job"] == "decode" and r.get("step_ms") and r.get("T")]
    if not dec:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, dict[int, float]] = {}
    for r in dec:  # dense rows repeat per MoBA config: one curve per dense backend
        dense = r["backend"].startswith("dense")
        name = (
            r["backend"]
            if dense
            else f"{r['backend']} (block {r.get('block')}, topk {r.get('topk')})"
        )
        curves.setdefault(name, {})[r["T"]] = r["step_ms"]
    for name, pts in sorted(curves.items()):
        xs = sorted(pts)
        ax.loglog(xs, [pts[x] for x in xs], "o-", label=name)
    ax.set(
        xlabel="KV cache length, tokens",
        ylabel="decode step latency, ms (batch 1)",
        title="One decode step: MoBA sparse vs dense SDPA (32/8 heads, D 128)",
    )
    ax.legend(fontsize=7)
    return [_save(plt, fig, folder, "decode.png")]


def plot_all(rows: list[dict], folder: Path) -> list[str]:
    """Write every plot the rows support; returns the file names (none without matplotlib)."""
    plt = _plt()
    if plt is None:
        print("matplotlib is not installed: no plots")
        return []
    return [
        *_op_plots(plt, rows, folder),
        *_layer_plot(plt, rows, folder),
        *_decode_plot(plt, rows, folder),
    ]
