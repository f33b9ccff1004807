"""Conventions, FLOP counts, timing and host-sync counting shared by every job.

Conventions (every number in a run folder follows them):

* **FLOPs.** Forward FLOPs of attention are ``4 * D * Hq * (scored (query, key) pairs)``; the
  forward+backward FLOPs are ``FWD_BWD_FACTOR = 3.5`` times the forward (backward = 2.5x:
  QK^T recomputed, dV, dP, dQ, dK).
* **Useful FLOPs.** MoBA is credited only with the pairs it attends (its density): per sequence
  and block c of m tokens, ``m (m + 1) / 2`` causal pairs of its own block plus
  ``min(K - 1, c) * B * m`` pairs of its K - 1 selected past blocks. Dense causal attention is
  credited with ``t (t + 1) / 2`` pairs per sequence of t tokens. Useful TFLOP/s = useful FLOPs
  over the measured time; density = MoBA pairs / dense causal pairs.
* **Dense.** The faster of cuDNN SDPA and FlashAttention-2 (``torch.nn.attention.sdpa_kernel``
  with ``SDPBackend.CUDNN_ATTENTION`` vs ``SDPBackend.FLASH_ATTENTION``), timed in the same run
  on the same inputs. Packed varlen batches have no cuDNN path here: dense is FA2 varlen.
* **Accuracy.** Relative Frobenius error ``||x - x_ref|| / ||x_ref||`` of out, dq, dk, dv, where
  ``x_ref`` is the same op computed in float32 on float32 copies of the (bf16-representable)
  inputs, so routing is identical and the error measures arithmetic only.
* **Timing.** Median of ``reps`` CUDA-event timings after warm-up, fresh random bf16 inputs.
* **Host syncs.** ``torch.cuda.set_sync_debug_mode("warn")`` warnings counted over one call.
"""

from __future__ import annotations

import re
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "FWD_BWD_FACTOR",
    "count_syncs",
    "dense_flops",
    "device_slug",
    "median_ms",
    "moba_flops",
    "peak_gib",
    "rel_err",
    "sync_sites",
]

FWD_BWD_FACTOR = 3.5


def moba_pairs(lens: Sequence[int], block: int, topk: int) -> int:
    """(query, key) pairs MoBA attends over sequences of ``lens`` tokens."""
    pairs = 0
    for t in lens:
        for c in range(-(-t // block)):
            m = min(block, t - c * block)
            pairs += m * (m + 1) // 2 + min(topk - 1, c) * block * m
    return pairs


def dense_flops(lens: Sequence[int], hq: int, d: int) -> float:
    """Forward FLOPs of dense causal attention over ``lens`` (one count per query head)."""
    return 4.0 * d * hq * sum(t * (t + 1) // 2 for t in lens)


def moba_flops(lens: Sequence[int], hq: int, d: int, block: int, topk: int) -> tuple[float, float]:
    """Useful forward FLOPs of MoBA over ``lens`` and its density against dense causal."""
    pairs = moba_pairs(lens, block, topk)
    return 4.0 * d * hq * pairs, pairs / sum(t * (t + 1) // 2 for t in lens)


def device_slug(device: torch.device) -> str:
    """Folder name of the device: ``nvidia-h200``-style for CUDA, ``cpu`` otherwise."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], reps: int, device: torch.device, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls after ``warmup`` calls (CUDA events on
    a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(reps, 1)):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak ``max_memory_allocated`` of one call after a reset (inputs already allocated)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def sync_sites(fn: Callable[[], object]) -> list[str]:
    """``file:line`` of every device-to-host synchronization one call of ``fn`` makes (CUDA):
    the warnings ``set_sync_debug_mode("warn")`` raises, one per synchronizing operation."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    hits = [w for w in seen if "synchroniz" in str(w.message)]
    return [f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in hits]


def count_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Device-to-host synchronizations of one call of ``fn`` (None off CUDA, after running it)."""
    if device.type != "cuda":
        fn()
        return None
    return len(sync_sites(fn))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against ``b``, computed in float64."""
    a64, b64 = a.detach().double(), b.detach().double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-300)).item()
