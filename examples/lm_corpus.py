"""A real-text corpus on every machine without a download: the running Python's standard library.

``build_stdlib_corpus()`` walks the standard-library directory of this interpreter, keeps the
``.py`` files that pass a fixed filter (no installed packages, no test suites, no generated or
vendored trees; see ``EXCLUDED_DIRS``), sorts them by relative path and concatenates them as
bytes. Every ``HELD_OUT_EVERY``-th file (in that order) goes to the held-out split, so held-out
text comes from files the model never trained on, not from other windows of the same file.

The held-out files alternate between two halves, again whole files: ``valid`` (the 1st, 3rd, ...
held-out file) picks hyperparameters such as the learning rate, and ``test`` (the 2nd, 4th, ...)
gives the number reported, so a pick cannot flatter the reported loss. ``heldout`` is every
held-out file (both halves), what train_cp.py evaluates on.

The corpus depends on the Python version, so ``Corpus.info`` records the version, the file
counts and the sha256 of every split; two runs with the same hashes trained on the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass

import torch

__all__ = ["EXCLUDED_DIRS", "HELD_OUT_EVERY", "Corpus", "build_corpus", "build_stdlib_corpus",
           "file_corpus", "list_files"]  # fmt: skip

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3",
     "ensurepip", "config-3", "turtledemo"}
)  # fmt: skip
"""Directory names skipped anywhere in the tree: installed packages (differ per machine), test
suites (huge, repetitive data files), vendored wheels and demos."""
HELD_OUT_EVERY = 20
SEPARATOR = b"\n\n"  # between files, so no window joins two files mid-line


@dataclass(frozen=True)
class Corpus:
    """Byte tokens (int64 in [0, 256)) of the splits and their record. ``heldout`` is ``valid``
    and ``test`` together: no byte of it is in ``train``."""

    train: torch.Tensor
    heldout: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    info: dict


def list_files(root: str) -> list[str]:
    """Relative paths of the ``.py`` files under ``root`` that pass the filter, sorted."""
    if not os.path.isdir(root):
        raise ValueError(f"root must be a directory, got {root!r}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _excluded(d)]
        rel = os.path.relpath(dirpath, root)
        found += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")]
    return sorted(found)


def _excluded(dirname: str) -> bool:
    return dirname in EXCLUDED_DIRS or dirname.startswith("config-")


def _tokens(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()


def _record(splits: dict[str, bytes]) -> dict:
    """Size and sha256 of each split."""
    out = {f"{name}_bytes": len(blob) for name, blob in splits.items()}
    out.update({f"sha256_{k}": hashlib.sha256(v).hexdigest() for k, v in splits.items()})
    return out


def build_corpus(root: str, held_out_every: int = HELD_OUT_EVERY) -> Corpus:
    """The filtered ``.py`` files under ``root``; file ``i`` (sorted order) is held out when
    ``i % held_out_every == held_out_every - 1``, and the ``j``-th held-out file is in ``valid``
    when ``j`` is even, else in ``test``."""
    if held_out_every < 2:
        raise ValueError(f"held_out_every must be >= 2, got {held_out_every}")
    files = list_files(root)
    if len(files) < 2 * held_out_every:
        raise ValueError(f"{root!r} holds {len(files)} usable .py files, need >= "
                         f"2 * held_out_every={2 * held_out_every}")  # fmt: skip
    train: list[bytes] = []
    held: list[bytes] = []
    for i, rel in enumerate(files):
        with open(os.path.join(root, rel), "rb") as f:
            (held if i % held_out_every == held_out_every - 1 else train).append(f.read())
    splits = {"train": SEPARATOR.join(train), "heldout": SEPARATOR.join(held),
              "valid": SEPARATOR.join(held[0::2]), "test": SEPARATOR.join(held[1::2])}  # fmt: skip
    info = {
        "source": root, "python_version": platform.python_version(), "files": len(files),
        "train_files": len(train), "heldout_files": len(held), "valid_files": len(held[0::2]),
        "test_files": len(held[1::2]), "held_out_every": held_out_every, **_record(splits),
    }  # fmt: skip
    return Corpus(**{k: _tokens(v) for k, v in splits.items()}, info=info)


def build_stdlib_corpus() -> Corpus:
    """:func:`build_corpus` over this interpreter's standard-library directory."""
    return build_corpus(sysconfig.get_paths()["stdlib"])


def file_corpus(path: str, heldout_share: float = 0.05) -> Corpus:
    """One text file: the last ``heldout_share`` of its bytes is held out (a contiguous tail, so
    no held-out window overlaps a training window); the tail's first half is ``valid``, its
    second half ``test``."""
    if not 0.0 < heldout_share < 1.0:
        raise ValueError(f"heldout_share must be in (0, 1), got {heldout_share}")
    with open(path, "rb") as f:
        blob = f.read()
    cut = int(len(blob) * (1.0 - heldout_share))
    mid = (cut + len(blob)) // 2
    splits = {"train": blob[:cut], "heldout": blob[cut:], "valid": blob[cut:mid],
              "test": blob[mid:]}  # fmt: skip
    info = {"source": os.path.abspath(path), "sha256": hashlib.sha256(blob).hexdigest(),
            **_record(splits)}  # fmt: skip
    return Corpus(**{k: _tokens(v) for k, v in splits.items()}, info=info)
