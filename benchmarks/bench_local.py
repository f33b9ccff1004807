"""Single-GPU MoBA benchmark: dense causal baselines vs the `varlen` and `triton` backends.

Run on the device from the checkout (one sequence per case, bf16, fresh random inputs):

    PYTHONPATH=. python benchmarks/bench_local.py --cases h32-32k,h16-128k --check h32-32k

For each case: forward ms and forward+backward ms (median of --reps runs after a warm-up, CUDA
events), useful TFLOP/s (density formula of shared/docs/moba_semantics.md), peak memory of one
forward+backward, and the gate's share of the triton forward. Dense = the faster of PyTorch's
default SDPA and FlashAttention-2 varlen (PyTorch's built-in) in the same run. ``--check`` cases
also compare bf16 outputs and gradients with a float32 reference (relative Frobenius error, next
to the FA2-based `varlen` backend's as the bf16 yardstick) and the triton gate's routing with the
torch gate's. Rows merge into ``<out-dir>/<gpu>.json``; a markdown table and a PNG plot follow.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import moba_dist.ops
from moba_dist import moba_attn_varlen
from moba_dist.kernels import gate as gate_mod
from moba_dist.kernels import triton_bwd, triton_fwd, triton_gate, triton_moba
from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.flash import flash_varlen_bwd, flash_varlen_fwd
from moba_dist.kernels.gate import block_centroids
from moba_dist.kernels.reference import RoutedKeys, reference_routed_bwd, reference_routed_fwd
from moba_dist.kernels.triton_gate import select_blocks_triton
from moba_dist.ops import moba_route

# name: (T, Hq, Hkv, D, block, topk, backends); the issue-5 target cases first.
CASES = {
    "h32-32k": (32768, 32, 32, 128, 512, 3, "sdpa,fa2,varlen,triton,triton-tgate"),
    "h16-128k": (131072, 16, 16, 128, 512, 3, "sdpa,fa2,varlen,triton,triton-tgate"),
    "h16-64k-b128": (65536, 16, 16, 128, 128, 8, "sdpa,fa2,varlen,triton,triton-tgate"),
    "h32-128k-b4096": (131072, 32, 32, 128, 4096, 12, "sdpa,fa2,varlen,triton,triton-tgate"),
    "1m-h8": (1048576, 8, 8, 128, 4096, 12, "sdpa-fwd,triton-tgate,triton-raw"),
    "gqa-256k": (262144, 32, 8, 128, 4096, 12, "sdpa-fwd,triton-tgate,triton-raw"),
    "gqa-16k-d64": (16384, 16, 4, 64, 512, 4, "sdpa,fa2,varlen,triton,triton-tgate"),
}


def useful_flops(t: int, hq: int, d: int, block: int, topk: int) -> tuple[float, float]:
    """Forward FLOPs of MoBA on one sequence of t tokens, and its density vs dense causal."""
    keys = 0
    for c in range((t + block - 1) // block):
        m = min(block, t - c * block)
        keys += m * (m + 1) // 2 + min(topk - 1, c) * block * m
    return 4.0 * d * hq * keys, keys / (t * (t + 1) / 2)


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def inputs(t, hq, hkv, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (
        torch.randn(t, h, d, device="cuda", dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq)
    )
    return q, k, v, do


def leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def backend_fns(name, q, k, v, do, cu, t, block, topk):
    """(forward fn, forward+backward fn or None) for one backend on one case."""
    scale = q.shape[-1] ** -0.5
    if name.startswith("sdpa"):
        qh, kh, vh, doh = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (q, k, v, do))
        gqa = q.shape[1] != k.shape[1]
        lq, lk, lv = leaves(qh, kh, vh)

        def sdpa_fwd(a=qh, b=kh, c=vh):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa)

        def sdpa_fb():
            sdpa_fwd(lq, lk, lv).backward(doh)
            lq.grad = lk.grad = lv.grad = None

        return sdpa_fwd, (None if name == "sdpa-fwd" else sdpa_fb)
    if name == "fa2":

        def fa2_fwd():
            return flash_varlen_fwd(q, k, v, cu, cu, t, t, scale, causal=True)

        def fa2_fb():
            out, lse = fa2_fwd()
            flash_varlen_bwd(do, q, k, v, out, lse, cu, cu, t, t, scale, causal=True)

        return fa2_fwd, fa2_fb
    if name == "triton-raw":
        return _raw_fns(q, k, v, do, cu, block, topk, scale)
    lq, lk, lv = leaves(q, k, v)
    kw = dict(moba_chunk_size=block, moba_topk=topk, backend=name.split("-")[0])
    gate = {"triton-tgate": triton_gate_patch, "triton-base": base_patch}.get(
        name, contextlib.nullcontext
    )

    def moba_fwd():
        with gate():
            return moba_attn_varlen(q, k, v, cu, t, **kw)

    def moba_fb():
        with gate():
            moba_attn_varlen(lq, lk, lv, cu, t, **kw).backward(do)
        lq.grad = lk.grad = lv.grad = None

    return moba_fwd, moba_fb


@contextlib.contextmanager
def triton_gate_patch():
    """Benchmark-only shim: the op's gate with select_blocks swapped for the fused Triton gate
    (what wiring ``triton_gate.select_blocks_triton`` into ``gate.py`` would give)."""
    keep = moba_dist.ops.select_blocks
    moba_dist.ops.select_blocks = select_blocks_triton
    try:
        yield
    finally:
        moba_dist.ops.select_blocks = keep


_BASE = {}


def _base_module(name):
    """The kernels module as it was before the issue-5 follow-up (snapshot of the committed file
    in benchmarks/results/base_<name>.py), loaded under a private name."""
    if name not in _BASE:
        path = Path(__file__).parent / "results" / f"base_{name}.py"
        spec = importlib.util.spec_from_file_location(f"_bench_base_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _BASE[name] = mod
    return _BASE[name]


@contextlib.contextmanager
def base_patch():
    """Benchmark-only: the triton op as committed before this follow-up (float32 partials,
    torch segment_sums centroids, 2 host syncs per gate chunk, torch slab gathers, zero-filled
    dQ partials), to time old and new side by side in one process."""
    old_bwd, old_gate = _base_module("triton_bwd"), _base_module("triton_gate")
    keep = (triton_fwd.PARTIAL_DTYPE, gate_mod._triton_block_sums, triton_bwd.bwd_all,
            triton_gate._select_exact)  # fmt: skip

    def bwd_all(dout, q, k, v, out, lse, q_pos, keys, plan, sel, scale, grad_dtype):
        return old_bwd.bwd_all(dout, q, k, v, out, lse, q_pos, keys, plan, scale, grad_dtype)

    triton_fwd.PARTIAL_DTYPE = torch.float32
    gate_mod._triton_block_sums = lambda k, layout: None
    triton_bwd.bwd_all = bwd_all
    triton_gate._select_exact = old_gate._select_exact
    try:
        yield
    finally:
        (triton_fwd.PARTIAL_DTYPE, gate_mod._triton_block_sums, triton_bwd.bwd_all,
         triton_gate._select_exact) = keep  # fmt: skip


def _raw_fns(q, k, v, do, cu, block, topk, scale):
    """The triton kernels without the autograd wrapper, gradients in bf16 (what the op would
    do with ``grad_dtype=q.dtype``): shows the memory floor at 1M tokens."""
    layout = BlockLayout.build(cu, block)
    pos = torch.arange(q.shape[0], device="cuda")
    keys = RoutedKeys(layout.block_starts, pos)

    def raw_fwd():
        with triton_gate_patch():
            sel = moba_route(q, k, layout, topk)
        return triton_moba.routed_fwd(q, k, v, pos, keys, sel, scale), sel

    def raw_fb():
        (out, lse), sel = raw_fwd()
        triton_moba.routed_bwd(do, q, k, v, out, lse, pos, keys, sel, scale, q.dtype)

    return raw_fwd, raw_fb


def gate_times(q, k, cu, block, topk, reps):
    """Torch gate ms, triton gate ms, and the fraction of (t, h) with the same selected set."""
    layout = BlockLayout.build(cu, block)
    tok = layout.token_block
    first = layout.block_seq_first[tok]

    def triton_gate(precision="ieee"):
        return select_blocks_triton(q, block_centroids(k, layout), tok, first, topk, precision)

    with base_patch():
        base_ms = median_ms(lambda: moba_route(q, k, layout, topk), reps)
        base_sel = moba_route(q, k, layout, topk).sort(-1).values
    res = dict(
        gate_base_ms=base_ms,
        gate_torch_ms=median_ms(lambda: moba_route(q, k, layout, topk), reps),
        gate_triton_ms=median_ms(triton_gate, reps),
        gate_tf32x3_ms=median_ms(lambda: triton_gate("tf32x3"), reps),
        centroids_ms=median_ms(lambda: block_centroids(k, layout), reps),
    )
    a = moba_route(q, k, layout, topk).sort(-1).values
    res["gate_base_agreement"] = (a == base_sel).all(-1).float().mean().item()
    for key, prec in (("gate_agreement", "ieee"), ("gate_tf32x3_agreement", "tf32x3")):
        b = triton_gate(prec).sort(-1).values
        res[key] = (a == b).all(-1).float().mean().item()
    return res


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def accuracy(t, hq, hkv, d, block, topk) -> dict:
    """bf16 triton and varlen outputs/grads vs a float32 reference with the same routing."""
    q, k, v, do = inputs(t, hq, hkv, d, seed=11)
    cu = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    layout = BlockLayout.build(cu, block)
    sel = moba_route(q, k, layout, topk)  # the gate upcasts: same routing for every path
    pos = torch.arange(t, device="cuda")
    keys = RoutedKeys(layout.block_starts, pos)
    f32 = [x.float() for x in (q, k, v, do)]
    scale = d**-0.5
    ref_out, ref_lse = reference_routed_fwd(*f32[:3], pos, keys, sel, scale)
    ref = [
        ref_out,
        *reference_routed_bwd(f32[3], *f32[:3], ref_out, ref_lse, pos, keys, sel, scale),
    ]
    res = {}
    for name in ("triton", "triton-base", "varlen"):
        lq, lk, lv = leaves(q, k, v)
        with base_patch() if name == "triton-base" else contextlib.nullcontext():
            out = moba_attn_varlen(
                lq, lk, lv, cu, t, moba_chunk_size=block, moba_topk=topk,
                backend=name.split("-")[0],
            )  # fmt: skip
            out.backward(do)
        got = (out, lq.grad, lk.grad, lv.grad)
        for tag, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True):
            res[f"{name}_{tag}_err"] = rel(a, b)
    ok = all(
        res[f"triton_{x}_err"] <= 2 * res[f"varlen_{x}_err"] for x in ("out", "dq", "dk", "dv")
    )
    res["within_2x_of_bf16_fa2"] = ok
    return res


def run_case(name, reps, check, backends=None) -> list[dict]:
    t, hq, hkv, d, block, topk, default = CASES[name]
    backends = backends or default
    flops, density = useful_flops(t, hq, d, block, topk)
    q, k, v, do = inputs(t, hq, hkv, d)
    cu = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    base = dict(case=name, T=t, Hq=hq, Hkv=hkv, D=d, block=block, topk=topk, density=density)
    rows = []
    for bk in backends.split(","):
        row = dict(base, backend=bk)
        try:
            fwd, fb = backend_fns(bk, q, k, v, do, cu, t, block, topk)
            row["fwd_ms"] = median_ms(fwd, reps)
            if fb is not None:
                row["fwdbwd_ms"] = median_ms(fb, reps)
                row["peak_gib"] = peak_gib(fb)
        except Exception as e:  # keep the other backends' numbers (e.g. out of memory)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  {name} {bk}: {row}", flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    try:
        extra = gate_times(q, k, cu, block, topk, reps)
    except Exception as e:
        print(f"  gate failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        extra = dict(gate_torch_ms=float("nan"))
    print(f"  {name} gate: {extra}", flush=True)
    if check:
        try:
            extra.update(accuracy(min(t, 32768), hq, hkv, d, block, topk))
        except Exception as e:
            extra["accuracy_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    _finish(rows, flops, extra)
    return rows


def _finish(rows, flops, extra):
    """Add dense columns (faster of SDPA and FA2), speedups, TFLOP/s and gate share."""
    by = {r["backend"].removesuffix("-fwd"): r for r in rows}
    dense = [by[b] for b in ("sdpa", "fa2") if b in by]
    for key in ("fwd_ms", "fwdbwd_ms"):
        vals = [r[key] for r in dense if r.get(key)]
        for r in rows:
            r[f"dense_{key}"] = min(vals) if vals else None
            for b in dense:
                r[f"{b['backend']}_{key}"] = b.get(key)
    for r in rows:
        if "fwd_ms" not in r:
            continue
        r["tflops_fwd"] = flops / r["fwd_ms"] / 1e9
        if "fwdbwd_ms" in r:
            r["tflops_fwdbwd"] = 3.5 * flops / r["fwdbwd_ms"] / 1e9
        for key in ("fwd_ms", "fwdbwd_ms"):
            if r.get(f"dense_{key}") and r.get(key):
                r[f"speedup_{key.removesuffix('_ms')}"] = r[f"dense_{key}"] / r[key]
        if r["backend"].startswith("triton"):
            r.update(extra)
            # Share of the gate the row ran: the fused gate for -tgate/-raw rows.
            key = {"triton": "gate_torch_ms", "triton-base": "gate_base_ms"}.get(
                r["backend"], "gate_triton_ms"
            )
            r["gate_share"] = extra.get(key, 0) / r["fwd_ms"]


TUNE = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    "dkdv": [(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 3)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
}


def tune(name, reps):
    """Time the triton backend under each launch shape (one kernel varied at a time)."""
    t, hq, hkv, d, block, topk, _ = CASES[name]
    q, k, v, do = inputs(t, hq, hkv, d)
    cu = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    fwd, fb = backend_fns("triton", q, k, v, do, cu, t, block, topk)
    tables = {
        "fwd": triton_fwd.FWD_CONFIG,
        "dkdv": triton_bwd.DKDV_CONFIG,
        "dq": triton_bwd.DQ_CONFIG,
    }
    out = {}
    for kernel, shapes in TUNE.items():
        keep = tables[kernel][d]
        for shape in shapes:
            tables[kernel][d] = triton_fwd.TileConfig(*shape)
            try:
                ms = median_ms(fwd if kernel == "fwd" else fb, reps)
            except Exception as e:  # a shape that does not compile (shared memory): record it
                ms = f"failed: {type(e).__name__}"
            out[f"{kernel}{shape}"] = ms
            print(f"  tune {name} {kernel} {shape}: {ms}", flush=True)
        best = min((s for s in shapes if isinstance(out[f"{kernel}{s}"], float)),
                   key=lambda s: out[f"{kernel}{s}"], default=None)  # fmt: skip
        tables[kernel][d] = triton_fwd.TileConfig(*best) if best else keep
    return out


def profile(name, backend, out_dir: Path) -> str:
    """Per-kernel CUDA time of one forward+backward (torch.profiler), as a text table."""
    t, hq, hkv, d, block, topk, _ = CASES[name]
    q, k, v, do = inputs(t, hq, hkv, d)
    cu = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    fwd, fb = backend_fns(backend, q, k, v, do, cu, t, block, topk)
    keep = triton_fwd.PARTIAL_DTYPE
    for dt in (torch.float32, torch.bfloat16):
        triton_fwd.PARTIAL_DTYPE = dt
        print(f"  {name} {backend} fwd ms with {dt} partials: {median_ms(fwd, 5)}", flush=True)
    triton_fwd.PARTIAL_DTYPE = keep
    fb()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fb()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = avg.table(sort_by=key, row_limit=14, max_name_column_width=60)
            break
        except (AttributeError, KeyError):
            continue
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile_{name}_{backend}.txt").write_text(table)
    print(f"profile {name} {backend}:\n{table}", flush=True)
    return table


def write_outputs(rows, out_dir: Path, gpu: str, command: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{gpu}.json"
    old = json.loads(path.read_text()) if path.exists() else []
    keyset = {(r["case"], r["backend"]) for r in rows}
    merged = [r for r in old if (r["case"], r["backend"]) not in keyset] + rows
    path.write_text(json.dumps(merged, indent=1))
    (out_dir / f"{gpu}.md").write_text(markdown(merged, gpu))
    plot(merged, out_dir / f"{gpu}.png")


def markdown(rows, gpu) -> str:
    lines = [f"# Local MoBA benchmark on {gpu}", "", "Commands (per row in the json):", ""]
    lines += sorted({f"    {r['command']}" for r in rows if "command" in r})
    head = "| case | density | backend | fwd ms | fwd+bwd ms | fwd x dense | fwd+bwd x dense "
    head += "| TFLOP/s fwd | TFLOP/s f+b | peak GiB | gate share |"
    lines += ["", head, "|" + "---|" * 11]
    for r in rows:

        def f(key, fmt="{:.2f}", r=r):
            return fmt.format(r[key]) if r.get(key) is not None else ""

        lines.append(
            f"| {r['case']} | {r['density']:.3f} | {r['backend']} | {f('fwd_ms')} | "
            f"{f('fwdbwd_ms')} | {f('speedup_fwd')} | {f('speedup_fwdbwd')} | "
            f"{f('tflops_fwd', '{:.0f}')} | {f('tflops_fwdbwd', '{:.0f}')} | {f('peak_gib')} | "
            f"{f('gate_share')} |"
        )
    acc = [r for r in rows if "triton_out_err" in r]
    if acc:
        lines += ["", "| case | path | out err | dq err | dk err | dv err | gate agreement |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for r in acc:
            for p in ("triton", "triton-base", "varlen"):
                if f"{p}_out_err" not in r:
                    continue
                errs = " | ".join(f"{r[f'{p}_{x}_err']:.2e}" for x in ("out", "dq", "dk", "dv"))
                lines.append(f"| {r['case']} | {p} | {errs} | {r.get('gate_agreement')} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("fwd_ms", "fwdbwd_ms"), strict=True):
        for bk in ("sdpa", "fa2", "varlen", "triton", "triton-tgate"):
            pts = sorted((r["T"], r[key], r["case"]) for r in rows
                         if r["backend"].removesuffix("-fwd") == bk and r.get(key))  # fmt: skip
            if pts:
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o", label=bk)
        ax.set_xlabel("tokens T (cases differ in H, B, K: see table)")
        ax.set_ylabel(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="h32-32k,h16-128k,h16-64k-b128,h32-128k-b4096")
    ap.add_argument("--check", default="", help="cases that also get the accuracy check")
    ap.add_argument("--tune", default="", help="cases to tune launch shapes on first")
    ap.add_argument("--profile", default="", help="CASE:BACKEND pairs to profile")
    ap.add_argument("--partial", action="store_true", help="bf16 partials in the triton forward")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", default="", help="override every case's backend list")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    command = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    if args.partial:
        triton_fwd.PARTIAL_DTYPE = torch.bfloat16
    tuned = {c: tune(c, args.reps) for c in filter(None, args.tune.split(","))}
    for pair in filter(None, args.profile.split(",")):
        try:
            profile(*pair.split(":"), args.out_dir)
        except Exception as e:  # keep the timing table
            print(f"profile {pair} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    rows = []
    for name in args.cases.split(","):
        reps = 3 if CASES[name][0] >= 1 << 20 else args.reps
        rows += run_case(name, reps, name in args.check.split(","), args.backends)
    for r in rows:
        r["command"] = command
        r["partial_dtype"] = str(triton_fwd.PARTIAL_DTYPE or torch.float32)
        r["configs"] = {k: {d: vars(c) for d, c in tab.items()} for k, tab in (
            ("fwd", triton_fwd.FWD_CONFIG), ("dkdv", triton_bwd.DKDV_CONFIG),
            ("dq", triton_bwd.DQ_CONFIG))}  # fmt: skip
    write_outputs(rows, args.out_dir, gpu, command)
    if tuned:
        (args.out_dir / f"{gpu}_tune.json").write_text(json.dumps(tuned, indent=1))
    print(markdown(rows, gpu))


if __name__ == "__main__":
    main()
