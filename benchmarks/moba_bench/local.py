"""Job ``local``: the single-device op against dense causal attention, per case (op and layer).

Per op case: MoBA forward and forward+backward ms, its gate's ms, host syncs of the forward and
of the backward, peak memory of one forward+backward; the same for every dense baseline; then
dense = the faster baseline, speedups and useful TFLOP/s (conventions: common.py). Per layer
case: one transformer layer's fwd+bwd with MoBA and with each dense baseline, tokens/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from moba_dist import moba_attn_varlen
from moba_dist.kernels.blocks import BlockLayout
from moba_dist.ops import moba_route

from . import dense
from .cases import Case
from .common import FWD_BWD_FACTOR, count_syncs, dense_flops, median_ms, moba_flops, peak_gib
from .layer import layer_fns

__all__ = ["Budget", "finish_rows", "profile_table", "run_local_case"]

LONG_DENSE = 512 * 1024  # dense baselines at or past this sequence length need --dense-long
MEASURE_S = 20.0  # one measurement's timed calls stop at about this many seconds (>= 1 call)


class Budget:
    """Seconds left for one case; reps shrink so that a slow call still fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def time(self, fn: Callable[[], object], reps: int, device: torch.device) -> float:
        if self.left() <= 0:
            raise TimeoutError("case time budget spent (--budget-s)")
        t0 = time.monotonic()
        fn()  # warm-up (compiles kernels) and a wall-clock estimate of one call
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        one = max(time.monotonic() - t0, 1e-6)
        reps = max(1, min(reps, int(min(self.left(), MEASURE_S) / one)))
        return median_ms(fn, reps, device, warmup=0)


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``q, dout [T, Hq, D]``, ``k, v [T, Hkv, D]`` and int32 ``cu_seqlens``."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = case.tokens
    q, k, v, do = (
        torch.randn(t, h, case.d, device=device, dtype=dtype, generator=g)
        for h in (case.hq, case.hkv, case.hkv, case.hq)
    )
    cu = torch.tensor([0, *torch.tensor(case.lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, do, cu.to(device)


def moba_fns(q, k, v, do, cu, case: Case, backend: str):
    """(forward, forward+backward, gate) of the MoBA op on packed inputs."""
    kw = dict(moba_chunk_size=case.block, moba_topk=case.topk, backend=backend)
    # Leaves share the inputs' storage: the peak counts q, k, v, dout and gradients once each.
    lq, lk, lv = (x.detach().requires_grad_() for x in (q, k, v))
    layout = BlockLayout.build(cu, case.block)

    def fwd():
        return moba_attn_varlen(q, k, v, cu, case.longest, **kw)

    def fwd_bwd():
        moba_attn_varlen(lq, lk, lv, cu, case.longest, **kw).backward(do)
        lq.grad = lk.grad = lv.grad = None

    return fwd, fwd_bwd, lambda: moba_route(q, k, layout, case.topk)


def _dense_fns(name, q, k, v, do, cu, case: Case):
    if name == dense.YARDSTICK:
        return dense.triton_dense_fns(q, k, v, do, case.lens)
    if len(set(case.lens)) == 1:
        return dense.sdpa_fns(name, q, k, v, do, case.lens)
    if name == "dense-math":
        return dense.math_varlen_fns(q, k, v, do, case.lens)
    if name == "dense-cudnn":
        raise NotImplementedError("cuDNN SDPA has no packed-varlen path here; dense is FA2 varlen")
    return dense.varlen_dense_fns(q, k, v, do, cu, case.longest)


def _measure(row: dict, fns, budget: Budget, reps: int, device, fwd_only: bool) -> None:
    """Times into ``row``; peak memory and host syncs for MoBA rows only (dense: library code)."""
    fwd, fwd_bwd = fns[:2]
    row["fwd_ms"] = budget.time(fwd, reps, device)
    if len(fns) > 2:
        row["gate_ms"] = budget.time(fns[2], reps, device)
    if fwd_only:
        return
    row["fwdbwd_ms"] = budget.time(fwd_bwd, reps, device)
    if _is_dense(row["backend"]):
        return
    row["peak_gib"] = peak_gib(fwd_bwd, device)
    syncs_f, syncs_fb = count_syncs(fwd, device), count_syncs(fwd_bwd, device)
    if syncs_f is not None:
        row["syncs_fwd"], row["syncs_bwd"] = syncs_f, syncs_fb - syncs_f


def _is_dense(name: str) -> bool:
    return name.startswith("dense") or name == dense.YARDSTICK


def _names(case: Case, backend: str, device, baselines: tuple[str, ...] | None) -> tuple[str, ...]:
    """MoBA, the dense baselines, and the Triton yardstick where its kernel applies; only the
    ``baselines`` named (all when None)."""
    names = dense.dense_backends(device)
    equal = len(set(case.lens)) == 1 and case.longest % 128 == 0
    if device.type == "cuda" and case.kind == "op" and equal and case.d in (64, 128, 256):
        names += (dense.YARDSTICK,)
    return (backend, *(n for n in names if baselines is None or n in baselines))


def _base_row(case: Case) -> dict:
    flops, density = moba_flops(case.lens, case.hq, case.d, case.block, case.topk)
    return dict(
        job="local",
        case=case.name,
        kind=case.kind,
        T=case.tokens,
        nseq=len(case.lens),
        lens=list(case.lens) if len(case.lens) <= 64 else None,
        Hq=case.hq,
        Hkv=case.hkv,
        D=case.d,
        block=case.block,
        topk=case.topk,
        density=density,
        moba_flops_fwd=flops,
        dense_flops_fwd=dense_flops(case.lens, case.hq, case.d),
    )


def run_local_case(
    case: Case,
    device,
    backend: str,
    reps: int,
    budget_s: float,
    dense_long: bool,
    log=print,
    baselines: tuple[str, ...] | None = None,
) -> list[dict]:
    """Every row of one op or layer case; a failing backend leaves an ``error`` in its row.
    ``baselines``: the dense backends (and yardstick) to time, all when None."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    budget, rows = Budget(budget_s), []
    q, k, v, do, cu = make_inputs(case, device, dtype)
    for name in _names(case, backend, device, baselines):
        row = dict(_base_row(case), backend=name)
        try:
            if _is_dense(name) and case.longest >= LONG_DENSE and not dense_long:
                raise RuntimeError(f"skipped: dense at >= {LONG_DENSE} tokens needs --dense-long")
            if case.kind == "layer":
                fns = layer_fns(case, name, device, dtype)
            elif _is_dense(name):
                fns = _dense_fns(name, q, k, v, do, cu, case)
            else:
                fns = moba_fns(q, k, v, do, cu, case, name)
            fwd_only = _is_dense(name) and case.dense_fwd_only
            _measure(row, fns, budget, reps, device, fwd_only and case.kind == "op")
        except Exception as e:  # keep the other backends' numbers (out of memory, budget)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(
            f"  {case.name} {name}: "
            + ", ".join(f"{a}={b}" for a, b in row.items() if a.endswith(("ms", "error", "gib")))
        )
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return finish_rows(rows, case)


def finish_rows(rows: list[dict], case: Case) -> list[dict]:
    """Dense columns (the faster baseline), speedups over it, useful TFLOP/s, tokens/s."""
    dense_rows = [r for r in rows if r["backend"].startswith("dense") and "error" not in r]
    for key in ("fwd_ms", "fwdbwd_ms"):
        timed = [r for r in dense_rows if r.get(key)]
        best = min(timed, key=lambda r: r[key], default=None)
        for r in rows:
            r[f"dense_{key}"] = best[key] if best else None
            r[f"dense_{key.removesuffix('_ms')}_backend"] = best["backend"] if best else None
    for r in rows:
        flops = r["dense_flops_fwd"] if _is_dense(r["backend"]) else r["moba_flops_fwd"]
        for key, mult in (("fwd", 1.0), ("fwdbwd", FWD_BWD_FACTOR)):
            ms = r.get(f"{key}_ms")
            if not ms:
                continue
            if case.kind == "op":
                r[f"tflops_{key}"] = mult * flops / ms / 1e9
            if r.get(f"dense_{key}_ms"):
                r[f"speedup_{key}"] = r[f"dense_{key}_ms"] / ms
        if case.kind == "layer" and r.get("fwdbwd_ms"):
            r["tokens_per_s"] = case.tokens / (r["fwdbwd_ms"] / 1e3)
    return rows


def profile_table(case: Case, device, backend: str, rows: int = 16) -> str:
    """Per-kernel device time of one MoBA forward+backward of ``case`` (torch.profiler)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v, do, cu = make_inputs(case, device, dtype)
    fwd_bwd = moba_fns(q, k, v, do, cu, case, backend)[1]
    fwd_bwd()  # compile outside the profile
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        fwd_bwd()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)
