"""The cases of every job: today's single-sequence op cases, FlashMoBA's configuration, and the
cases users run (packed documents, a transformer layer step, decode steps)."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["CASES", "QUICK_CASES", "Case", "packed_lengths", "select_cases"]

K, M = 1024, 1 << 20


def packed_lengths(total: int, docs: int, seed: int = 0) -> tuple[int, ...]:
    """``docs`` random document lengths (>= 1) summing to ``total``: uniform random cut points."""
    if not 1 <= docs <= total:
        raise ValueError(f"docs must be in [1, total={total}], got {docs}")
    cuts = sorted(random.Random(seed).sample(range(1, total), docs - 1))
    return tuple(b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True))


@dataclass(frozen=True)
class Case:
    """One measured configuration. ``kind``: ``op`` (the attention op alone, fwd and fwd+bwd),
    ``layer`` (projections + attention + MLP of one transformer layer, model width ``dim``) or
    ``decode`` (one query token against a cache of ``lens[0]`` tokens)."""

    name: str
    lens: tuple[int, ...]
    hq: int
    hkv: int
    d: int
    block: int
    topk: int
    kind: str = "op"
    dense_fwd_only: bool = False
    dim: int = 0
    mlp: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("op", "layer", "decode"):
            raise ValueError(f"kind must be 'op', 'layer' or 'decode', got {self.kind!r}")
        if not self.lens or min(self.lens) < 1:
            raise ValueError(f"lens must be positive lengths, got {self.lens}")
        if self.hq % self.hkv:
            raise ValueError(f"hq={self.hq} must be a multiple of hkv={self.hkv}")
        if self.kind == "layer" and self.dim != self.hq * self.d:
            raise ValueError(f"dim must be hq * d = {self.hq * self.d}, got {self.dim}")

    @property
    def tokens(self) -> int:
        return sum(self.lens)

    @property
    def longest(self) -> int:
        return max(self.lens)


def _op(name, lens, hq, hkv, block, topk, **kw) -> Case:
    return Case(name, tuple(lens), hq, hkv, 128, block, topk, **kw)


_FULL = [
    _op("h32-32k", [32 * K], 32, 32, 512, 3),
    _op("h16-128k", [128 * K], 16, 16, 512, 3),
    _op("gqa-128k-b512", [128 * K], 32, 8, 512, 8),
    _op("h32-128k-b4096", [128 * K], 32, 32, 4096, 12),
    _op("gqa-128k-b4096", [128 * K], 32, 8, 4096, 12),
    _op("h8-1m", [M], 8, 8, 4096, 12, dense_fwd_only=True),
    # FlashMoBA (arXiv 2511.11571): H16, D128, block 128, topk 8, batch 2, causal.
    *(_op(f"fm-{s}k", [s * K] * 2, 16, 16, 128, 8) for s in (64, 128, 256, 512)),
    _op("packed64-128k", packed_lengths(128 * K, 64), 32, 8, 512, 3),
    *(
        Case(f"layer-{s}k", (s * K,), 32, 8, 128, b, t, "layer", dim=4096, mlp=14336)
        for s, b, t in ((32, 512, 3), (128, 4096, 12))
    ),
    *(
        _op(f"decode-{s}k{tag}", [s * K], 32, 8, b, t, kind="decode")
        for s in (32, 128, 512)
        for tag, b, t in (("", 4096, 12), ("-b512", 512, 8))
    ),
]
CASES = {c.name: c for c in _FULL}

# --quick: CPU smoke sizes, one case of every kind and shape family.
_QUICK = [
    Case("q-single", (256,), 4, 2, 32, 32, 3),
    Case("q-batch2", (128, 128), 4, 4, 32, 16, 3),
    Case("q-packed", packed_lengths(384, 8), 4, 2, 32, 32, 2),
    Case("q-layer", (128,), 4, 2, 16, 32, 2, "layer", dim=64, mlp=128),
    Case("q-decode", (300,), 4, 2, 32, 32, 3, "decode"),
]
QUICK_CASES = {c.name: c for c in _QUICK}

JOB_KINDS = {"local": ("op", "layer"), "accuracy": ("op",), "decode": ("decode",)}


def select_cases(job: str, names: str | None, quick: bool) -> list[Case]:
    """The cases of ``job`` (comma-separated ``names``, default all of its kinds)."""
    table = QUICK_CASES if quick else CASES
    kinds = JOB_KINDS[job]
    if not names:
        return [c for c in table.values() if c.kind in kinds]
    out = []
    for n in names.split(","):
        if n not in table:
            raise ValueError(f"--cases: unknown case {n!r}; known: {', '.join(table)}")
        if table[n].kind not in kinds:
            raise ValueError(f"--cases: {n!r} is a {table[n].kind} case, job {job!r} takes {kinds}")
        out.append(table[n])
    return out
