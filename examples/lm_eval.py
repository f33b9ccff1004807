"""Held-out evaluation of a byte-level language model: bits per byte and loss by position bucket.

Tokens are bytes, so bits per byte is the mean next-token cross-entropy in nats over ln 2. The
long-range probe splits held-out targets by their position in the window: ``first_block``
(position < block: every attention variant sees the same keys there, its own block) and
``beyond_2_blocks`` (position >= 2 * block: only a model that reads earlier blocks can use
them). The unigram baseline is the cross-entropy of held-out bytes under the training split's
byte frequencies: what a model that ignores context can reach.
"""

from __future__ import annotations

import math

import torch

__all__ = ["BUCKETS", "LossSums", "bits_per_byte", "bucket_ids", "plot_buckets",
           "plot_heldout_curves", "plot_training", "unigram_bits_per_byte"]  # fmt: skip

BUCKETS = ("all", "first_block", "beyond_2_blocks")


def bits_per_byte(loss_nats_sum: float, num_bytes: int) -> float:
    """Mean cross-entropy of ``num_bytes`` byte targets, from their summed loss in nats."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be > 0, got {num_bytes}")
    return loss_nats_sum / num_bytes / math.log(2.0)


def unigram_bits_per_byte(train: torch.Tensor, heldout: torch.Tensor) -> float:
    """Held-out cross-entropy (bits/byte) under the training byte frequencies, add-one smoothed
    so a byte unseen in training costs a finite amount."""
    counts = torch.bincount(train, minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log2()
    return float(-logp[heldout].mean())


def bucket_ids(pos: torch.Tensor, block: int) -> torch.Tensor:
    """Per target: 0 = first block (pos < block), 1 = beyond 2 blocks (pos >= 2 * block),
    -1 = the block in between (counted only in "all")."""
    ids = torch.full_like(pos, -1)
    ids[pos < block] = 0
    ids[pos >= 2 * block] = 1
    return ids


class LossSums:
    """Summed loss (nats) and target count per bucket; ``sums()`` is one tensor to all-reduce."""

    def __init__(self) -> None:
        self.total = torch.zeros(2 * len(BUCKETS), dtype=torch.float64)

    def add(self, token_loss: torch.Tensor, pos: torch.Tensor, block: int) -> None:
        """``token_loss [n]`` nats of ``n`` targets at window positions ``pos [n]``."""
        loss, ids = token_loss.detach().double().cpu(), bucket_ids(pos.cpu(), block)
        for i, keep in enumerate((torch.ones_like(ids, dtype=torch.bool), ids == 0, ids == 1)):
            self.total[2 * i] += loss[keep].sum()
            self.total[2 * i + 1] += keep.sum()

    def bits_per_byte(self, total: torch.Tensor | None = None) -> dict[str, float]:
        """Bits per byte of each bucket (from ``total``, e.g. the all-reduced sums)."""
        t = self.total if total is None else total
        return {
            b: bits_per_byte(float(t[2 * i]), int(t[2 * i + 1])) if t[2 * i + 1] > 0 else math.nan
            for i, b in enumerate(BUCKETS)
        }


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install 'moba-dist[examples]')")
        return None
    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_training(results: dict, path: str, unigram: float, corpus: str) -> None:
    """train_cp.py on text: training loss and held-out bits per byte against tokens seen."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in results.items():
        h = r["history"]
        ax.plot([x["tokens"] for x in h], [x["loss"] / math.log(2) for x in h], alpha=0.4,
                label=f"{name}: training loss")  # fmt: skip
        ev = r["evals"]
        ax.plot([e["tokens"] for e in ev], [e["bpb"]["all"] for e in ev], "o-",
                label=f"{name}: held-out ({ev[-1]['bpb']['all']:.2f} bits/byte)")  # fmt: skip
    ax.axhline(unigram, color="gray", ls="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"train_cp.py: byte-level language model on {corpus}")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_heldout_curves(runs: dict, path: str, unigram: float, title: str) -> None:
    """``runs[label] = [(tokens, bits_per_byte), ...]``: held-out bits per byte vs tokens."""
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, pts in runs.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3,
                label=f"{label} ({pts[-1][1]:.3f})")  # fmt: skip
    ax.axhline(unigram, color="gray", ls="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_buckets(bpb: dict, path: str, block: int, title: str) -> None:
    """``bpb[label] = {bucket: bits/byte}``: grouped bars per position bucket."""
    plt = _pyplot()
    if plt is None:
        return
    names = ("first_block", "beyond_2_blocks")
    ticks = [f"position < {block}\n(own block only)", f"position >= {2 * block}\n(beyond 2 blocks)"]
    fig, ax = plt.subplots(figsize=(7, 5))
    width = 0.8 / max(1, len(bpb))
    for i, (label, v) in enumerate(bpb.items()):
        xs = [j + (i - (len(bpb) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [v[n] for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(names)), ticks)
    ax.set_ylabel("held-out bits per byte")
    lo, hi = (f(f(v[n] for n in names) for v in bpb.values()) for f in (min, max))
    ax.set_ylim(lo * 0.9, hi * 1.06)  # room for the value labels
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)
