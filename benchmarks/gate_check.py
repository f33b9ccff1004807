"""GPU check of the fused MoBA gate: routing agreement with a float64 gate, gate and op times.

For every case (2 sequences, H16, D128 unless stated) it measures

- agreement of the Triton gate's selection (as a set per (query, head) row) with a float64 gate
  on a random subsample of query tokens, raw, outside near-ties (near-tie: the (K-1)-th and
  K-th best float64 scores differ by < 1e-6 * |q| * max |candidate centroid|; docs/routing.md)
  and outside the wider band of each opt-in precision (``MARGINS``), for every ``precision``;
- the gate's GPU time (CUDA events, median): centroids + fused scores/top-k + the routing table
  the attention kernels read (``triton_moba.plan_entries``), each part and the sum;
- with ``--time-op``, the op forward time (``moba_attn_varlen``, backend triton) and the
  profiler's per-kernel split, for the cases marked so.

Usage: ``PYTHONPATH=. python benchmarks/gate_check.py --out DIR [--sweep D] [--quick]
[--time-op] [--cases a,b] [--name gate_check]``; writes ``NAME.json`` and ``NAME.md`` to DIR
after every case (a run cut short keeps what it finished). ``--sweep D`` first times the tile
configs ``SWEEP[D]`` and uses the best for head dim D. ``--compile-sm90`` instead compiles the
gate kernel for sm_90 (Triton's nvidia backend; no GPU needed) for every head dim, q dtype and
precision with the launcher's own configs, and writes the ptxas resource usage to NAME.md.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.moba_bench.common import median_ms
from moba_dist import moba_attn_varlen
from moba_dist.config import HEAD_DIMS
from moba_dist.kernels import triton_gate
from moba_dist.kernels.blocks import BlockLayout, segment_sums
from moba_dist.kernels.gate import block_centroids, select_blocks

# name: (tokens per sequence, sequences, Hq, Hkv, D, block, topk, q dtype, time the op)
CASES = {
    "128K-b128-k8-d64": ([131072] * 2, 2, 16, 16, 64, 128, 8, torch.bfloat16, False),
    "128K-b128-k8-d96": ([131072] * 2, 2, 16, 16, 96, 128, 8, torch.bfloat16, False),
    "128K-b128-k8-d256": ([131072] * 2, 2, 16, 16, 256, 128, 8, torch.bfloat16, False),
    "128K-b128-k8-d256-fp32": ([131072] * 2, 2, 16, 16, 256, 128, 8, torch.float32, False),
    "small-varlen-gqa": ([1000, 37, 5000, 129], 4, 8, 2, 64, 64, 4, torch.bfloat16, False),
    "128K-b128-k8-fp16": ([131072] * 2, 2, 16, 16, 128, 128, 8, torch.float16, False),
    "128K-b128-k8-fp32": ([131072] * 2, 2, 16, 16, 128, 128, 8, torch.float32, False),
    "128K-b128-k8": ([131072] * 2, 2, 16, 16, 128, 128, 8, torch.bfloat16, True),
    "128K-b512-k3": ([131072] * 2, 2, 16, 16, 128, 512, 3, torch.bfloat16, True),
    "128K-b4096-k12": ([131072] * 2, 2, 16, 16, 128, 4096, 12, torch.bfloat16, True),
    "512K-b128-k8": ([524288] * 2, 2, 16, 16, 128, 128, 8, torch.bfloat16, True),
    # The benchmark tool's single-sequence cases with block >= 512 (issue 12's share target).
    "h32-32k": ([32768], 1, 32, 32, 128, 512, 3, torch.bfloat16, True),
    "h16-128k": ([131072], 1, 16, 16, 128, 512, 3, torch.bfloat16, True),
    "gqa-128k-b512": ([131072], 1, 32, 8, 128, 512, 8, torch.bfloat16, True),
    "gqa-128k-b4096": ([131072], 1, 32, 8, 128, 4096, 12, torch.bfloat16, True),
    "h8-1m": ([1048576], 1, 8, 8, 128, 4096, 12, torch.bfloat16, True),
}
# Tile configs per head dim and the cases that time them.
SWEEP = {
    128: [
        dict(BLOCK_T=128, BLOCK_C=32, num_warps=4, num_stages=3),
        dict(BLOCK_T=128, BLOCK_C=64, num_warps=8, num_stages=2),
        dict(BLOCK_T=128, BLOCK_C=64, num_warps=4, num_stages=3),
        dict(BLOCK_T=64, BLOCK_C=64, num_warps=4, num_stages=3),
        dict(BLOCK_T=64, BLOCK_C=32, num_warps=4, num_stages=3),
        dict(BLOCK_T=256, BLOCK_C=64, num_warps=8, num_stages=2),
        dict(BLOCK_T=256, BLOCK_C=32, num_warps=8, num_stages=3),
    ],
    256: [
        dict(BLOCK_T=128, BLOCK_C=32, num_warps=8, num_stages=2),
        dict(BLOCK_T=128, BLOCK_C=32, num_warps=8, num_stages=3),
        dict(BLOCK_T=64, BLOCK_C=32, num_warps=4, num_stages=2),
        dict(BLOCK_T=128, BLOCK_C=64, num_warps=8, num_stages=2),
    ],
}
SWEEP_CASES = {128: ("128K-b128-k8", "128K-b512-k3"), 256: ("128K-b128-k8-d256",)}
# Near-tie margins (relative to |q| * max|c|) per precision: the contract's 1e-6 for float32,
# and twice each opt-in's score error bound for the others (docs/routing.md).
MARGINS = {"float32": 1e-6, "bf16x2": 4e-5, "bf16": 1e-2}
SAMPLE_TOKENS = 2048


# Median GPU ms of fn over reps calls (CUDA events), after one warm-up call.
cuda_ms = partial(median_ms, device=torch.device("cuda"))


def make(lens, hq, hkv, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lens)
    q, k, v = (
        torch.randn(t, h, d, device="cuda", generator=g, dtype=dtype) for h in (hq, hkv, hkv)
    )
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, cu


def reference64(q, k, layout, rows, topk):
    """Float64 gate on the query tokens ``rows``: sorted selected past-block sets
    ``[S, Hq, K - 1]`` (-1 padded, then sorted) and the relative gap ``[S, Hq]`` between the
    (K-1)-th and K-th best scores over ``|q| * max|c|`` (inf with fewer than K candidates)."""
    sums = segment_sums(k, layout.token_block, layout.num_blocks, layout.block_size, torch.float64)
    counts = (layout.block_starts[1:] - layout.block_starts[:-1]).clamp_min(1).double()
    cen = sums / counts.view(-1, 1, 1)  # [N, Hkv, D]
    norms = cen.norm(dim=-1)  # [N, Hkv]
    hq, hkv = q.shape[1], k.shape[1]
    grp = hq // hkv
    ids = torch.arange(layout.num_blocks, device=q.device)
    sets, gaps = [], []
    for r in rows.split(64):
        own = layout.token_block[r]
        first = layout.block_seq_first[own]
        qs = q[r].double()  # [C, Hq, D]
        s = torch.einsum("cgid,ngd->cgin", qs.view(-1, hkv, grp, qs.shape[-1]), cen)
        s = s.reshape(len(r), hq, -1)
        ok = (ids >= first[:, None]) & (ids < own[:, None])  # [C, N]
        s.masked_fill_(~ok[:, None, :], float("-inf"))
        vals, order = torch.sort(s, dim=-1, descending=True, stable=True)
        kp = topk - 1
        pick = torch.where(vals[..., :kp] > float("-inf"), order[..., :kp], -1)
        sets.append(pick.sort(-1).values)
        ncand = ok.sum(1)[:, None]
        maxn = torch.where(ok[:, None, :], norms.T.repeat_interleave(grp, 0)[None], 0).amax(-1)
        gap = (vals[..., kp - 1] - vals[..., kp]) / (qs.norm(dim=-1) * maxn)
        gaps.append(torch.where(ncand >= topk, gap, float("inf")))
    return torch.cat(sets), torch.cat(gaps)


def agreement(sel, ref_sets, gaps, rows, precision) -> dict:
    got = sel[rows][..., 1:].long().sort(-1).values
    same = (got == ref_sets).all(-1)
    res = dict(rows=same.numel(), raw=same.double().mean().item())
    bands = {"": MARGINS["float32"]}
    if precision != "float32":
        bands["_own_margin"] = MARGINS[precision]
    for tag, margin in bands.items():
        ties = gaps < margin
        res[f"near_tie_rows{tag}"] = int(ties.sum())
        res[f"outside_near_ties{tag}"] = same[~ties].double().mean().item()
        res[f"mismatches_outside{tag}"] = int((~same & ~ties).sum())
    return res


def gate_parts(q, k, layout, topk, reps):
    tok = layout.token_block
    first = layout.block_seq_first[tok]
    cen = block_centroids(k, layout)
    sel = select_blocks(q, cen, tok, first, topk)
    parts = dict(
        centroids_ms=cuda_ms(lambda: block_centroids(k, layout), reps),
        select_ms=cuda_ms(lambda: select_blocks(q, cen, tok, first, topk), reps),
    )
    try:  # the attention kernels' planning may change under us: keep the gate's own parts
        from moba_dist.kernels.triton_moba import plan_entries

        parts["routing_table_ms"] = cuda_ms(
            lambda: plan_entries(sel, layout.num_blocks, k.shape[1]), reps
        )

        def whole_gate():
            c = block_centroids(k, layout)
            plan_entries(select_blocks(q, c, tok, first, topk), layout.num_blocks, k.shape[1])

        # The same three parts as one call in GPU time (the profiler's kernel total): at small
        # sizes the event-timed parts also count the host's launch gaps.
        gate_gpu = op_profile(whole_gate)[1]
    except Exception as e:
        print("routing table failed:", repr(e)[:200], flush=True)
        parts["routing_table_ms"] = gate_gpu = float("nan")
    parts["gate_total_ms"] = sum(parts.values())
    parts["gate_gpu_ms"] = gate_gpu
    return parts


def op_profile(fn) -> tuple[list[dict], float]:
    """GPU time per kernel name of one call (torch.profiler), the 12 largest first, and the
    call's total GPU time in ms (every kernel)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us > 0:
            out.append(dict(kernel=ev.key[:90], ms=us / 1000, calls=ev.count))
    return sorted(out, key=lambda e: -e["ms"])[:12], sum(e["ms"] for e in out)


def sweep(d: int, reps: int) -> list[dict]:
    """Select time of every ``SWEEP[d]`` config on the cases ``SWEEP_CASES[d]``."""
    res = [dict(cfg=dict(cfg)) for cfg in SWEEP[d]]
    names = SWEEP_CASES[d]
    for name in names:
        lens, _, hq, hkv, d, block, topk, dtype, _ = CASES[name]
        q, k, _, cu = make(lens, hq, hkv, d, dtype)
        layout = BlockLayout.build(cu, block)
        tok = layout.token_block
        cen, first = block_centroids(k, layout), layout.block_seq_first[tok]
        for r in res:
            triton_gate._CONFIGS[d] = r["cfg"]
            try:
                r[name] = cuda_ms(partial(select_blocks, q, cen, tok, first, topk), reps)
            except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                r[name] = float("nan")
                print("sweep", r["cfg"], "failed:", repr(e)[:200], flush=True)
            print("sweep", name, r["cfg"], r[name], flush=True)
    for name in names:
        best = min(r[name] for r in res if r[name] == r[name])
        for r in res:
            r["score"] = r.get("score", 0.0) + r[name] / best
    return res


def run_case(name, quick: bool, time_op: bool) -> dict:
    lens, _, hq, hkv, d, block, topk, dtype, op_case = CASES[name]
    q, k, v, cu = make(lens, hq, hkv, d, dtype)
    layout = BlockLayout.build(cu, block)
    res = dict(case=name, lens=lens, hq=hq, hkv=hkv, d=d, block=block, topk=topk,
               dtype=str(dtype).removeprefix("torch."))  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(1)
    n_tok = q.shape[0]
    rows = torch.randperm(n_tok, device="cuda", generator=g)[: min(n_tok, SAMPLE_TOKENS)]
    ref_sets, gaps = reference64(q, k, layout, rows.sort().values, topk)
    tok = layout.token_block
    cen, first = block_centroids(k, layout), layout.block_seq_first[tok]
    for prec in triton_gate.PRECISIONS:
        sel = select_blocks(q, cen, tok, first, topk, precision=prec)
        res[f"agreement_{prec}"] = agreement(sel, ref_sets, gaps, rows.sort().values, prec)
        del sel
        res[f"select_ms_{prec}"] = cuda_ms(
            lambda p=prec: select_blocks(q, cen, tok, first, topk, precision=p), 3
        )
    print(name, {p: res[f"agreement_{p}"] for p in triton_gate.PRECISIONS}, flush=True)
    reps = 3 if quick else 5
    res.update(gate_parts(q, k, layout, topk, reps))
    print(name, "gate", res["gate_total_ms"], flush=True)
    if time_op and op_case:
        try:  # the attention kernels are not this tool's: keep the gate's results if they fail
            time_forward(res, q, k, v, cu, max(lens), block, topk, reps)
        except Exception as e:
            res["op_error"] = repr(e)[:300]
            print(name, "forward failed:", res["op_error"], flush=True)
    return res


def time_forward(res, q, k, v, cu, max_len, block, topk, reps) -> None:
    """Op forward time, gate share and per-kernel profile into ``res``."""

    def fwd():
        return moba_attn_varlen(
            q, k, v, cu, max_len, moba_chunk_size=block, moba_topk=topk, backend="triton"
        )

    res["op_forward_ms"] = cuda_ms(fwd, reps)
    res["gate_share_of_forward"] = res["gate_total_ms"] / res["op_forward_ms"]
    # Issue 12's share is of the forward's GPU time: the profiler's kernel total, beside the
    # event-timed wall (which includes host gaps at small sizes).
    res["op_forward_kernels"], res["op_forward_gpu_ms"] = op_profile(fwd)
    res["gate_share_of_forward_gpu"] = res["gate_gpu_ms"] / res["op_forward_gpu_ms"]
    print(res["case"], "forward", res["op_forward_ms"], flush=True)


def compile_sm90() -> str:
    """Markdown table: ``_gate_kernel`` compiled for sm_90 with ``triton_gate.launch_config`` for
    every (D, q dtype, precision), topk 8, with shared memory and ptxas registers / stack."""
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = Path(triton.__path__[0]) / "backends/nvidia/bin/cuobjdump"
    ints = ("TQ", "HQ", "HKV", "N", "PSTRIDE", "KSEL", "NUM_TILES")
    lines = [f"Compiled for sm_90 by triton {triton.__version__} (not run).", "",
             "| D | q | precision | BLOCK_T | warps | shared bytes | wgmma | ptxas |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in HEAD_DIMS:
        for qname, qp_full in (("bf16", 1), ("fp16", 2), ("fp32", 3)):
            for prec, cpn in triton_gate.PRECISIONS.items():
                cfg = triton_gate.launch_config(d, qp_full if cpn > 1 else 1, cpn, 8)
                opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
                sig = {"Q": f"*{qname}", "CP": "*bf16", "QBLOCK": "*i32", "QFIRST": "*i32",
                       "SEL": "*i32", **dict.fromkeys(ints, "i32"),
                       **dict.fromkeys(cfg, "constexpr")}  # fmt: skip
                src = ASTSource(fn=triton_gate._gate_kernel, signature=sig, constexprs=cfg)
                try:
                    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
                except Exception as e:  # report and go on: one failing variant is a finding
                    lines.append(f"| {d} | {qname} | {prec} | failed: {repr(e)[:150]} |")
                    continue
                cubin = Path("/tmp/gate_check_sm90.cubin")
                cubin.write_bytes(kern.asm["cubin"])
                usage = subprocess.run(
                    [str(tool), "--dump-resource-usage", str(cubin)], capture_output=True,
                    text=True, check=True,
                ).stdout  # fmt: skip
                regs = next(ln for ln in usage.splitlines() if "REG:" in ln)
                regs = " ".join(regs.split("Resource usage:")[-1].split()[:2])
                lines.append(
                    f"| {d} | {qname} | {prec} | {cfg['BLOCK_T']} | {opts['num_warps']} | "
                    f"{kern.metadata.shared} | {'wgmma' in kern.asm['ptx']} | {regs} |"
                )
                print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    lines = [
        "# Fused MoBA gate on the H200",
        "",
        f"Command: `{report['command']}`; device {report['device']}; torch {report['torch']},"
        f" triton {report['triton']}; gate config {report['config']}.",
        "",
        "Agreement: fraction of sampled (query, head) rows whose selected block set equals a "
        "float64 gate's; 'outside' excludes near-ties (docs/routing.md); for bf16x2 / bf16 the "
        f"last figure excludes each one's own band (margins {MARGINS}).",
        "",
        "| case | dtype | float32 raw / outside (mismatches) | bf16x2 raw / outside | bf16 raw / "
        "outside | select ms float32 / bf16x2 / bf16 | centroids ms | select ms | routing table"
        " ms | gate ms | op fwd ms | share | gate GPU ms | op fwd GPU ms | share of GPU time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["cases"]:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error'][:120]} |")
            continue
        ag = [r[f"agreement_{p}"] for p in triton_gate.PRECISIONS]
        cells = [f"{a['raw']:.6f} / {a['outside_near_ties']:.6f} ({a['mismatches_outside']})"
                 + (f" / {a['outside_near_ties_own_margin']:.6f} "
                    f"({a['mismatches_outside_own_margin']})" if "near_tie_rows_own_margin" in a
                    else "")
                 for a in ag]  # fmt: skip
        cells.append(" / ".join(f"{r[f'select_ms_{p}']:.2f}" for p in triton_gate.PRECISIONS))
        fwd = r.get("op_forward_ms")
        share = f"{r['gate_share_of_forward']:.1%}" if fwd else "-"
        gpu = r.get("op_forward_gpu_ms")
        gpu_cells = f"{r['gate_gpu_ms']:.2f} | {gpu:.2f} | {r['gate_share_of_forward_gpu']:.1%}"
        gpu_cells = gpu_cells if gpu else f"{r.get('gate_gpu_ms', float('nan')):.2f} | - | -"
        lines.append(
            f"| {r['case']} | {r['dtype']} D{r['d']} | {' | '.join(cells)} | "
            f"{r['centroids_ms']:.2f} | {r['select_ms']:.2f} | {r['routing_table_ms']:.2f} | "
            f"{r['gate_total_ms']:.2f} | {'-' if fwd is None else round(fwd, 2)} | {share} | "
            f"{gpu_cells} |"
        )
    for r in report["cases"]:
        if r.get("op_forward_kernels"):
            lines += ["", f"## {r['case']}: op forward, GPU time per kernel (profiler)", "",
                      "| kernel | ms | calls |", "|---|---|---|"]  # fmt: skip
            lines += [f"| `{e['kernel']}` | {e['ms']:.2f} | {e['calls']} |"
                      for e in r["op_forward_kernels"]]  # fmt: skip
    if report.get("sweep"):
        names = SWEEP_CASES[report["sweep_d"]]
        title = f"## Gate kernel configs, D={report['sweep_d']}: select ms ({', '.join(names)})"
        lines += ["", title, ""]
        lines += [f"- {s['cfg']}: " + ", ".join(f"{s[n]:.2f}" for n in names)
                  for s in report["sweep"]]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", type=int, choices=sorted(SWEEP), help="head dim to tune first")
    ap.add_argument("--quick", action="store_true", help="3 timing repetitions instead of 5")
    ap.add_argument("--time-op", action="store_true", help="also time the op forward")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--name", default="gate_check", help="output file stem")
    ap.add_argument("--compile-sm90", action="store_true", help="compile only (no GPU needed)")
    args = ap.parse_args()
    import triton

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.compile_sm90:
        (out / f"{args.name}.md").write_text(compile_sm90())
        return
    report = dict(
        command="PYTHONPATH=. python benchmarks/gate_check.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items() if v
        ),
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        cases=[],
    )  # fmt: skip
    if args.sweep:
        keep = dict(triton_gate._CONFIGS[args.sweep])
        report["sweep"], report["sweep_d"] = sweep(args.sweep, 3), args.sweep
        ok = [s for s in report["sweep"] if s["score"] == s["score"]]
        triton_gate._CONFIGS[args.sweep] = min(ok, key=lambda s: s["score"])["cfg"] if ok else keep
    report["config"] = {d: dict(c) for d, c in triton_gate._CONFIGS.items()}
    for name in args.cases.split(","):
        t0 = time.time()
        try:
            with torch.no_grad():
                res = run_case(name, args.quick, args.time_op)
        except Exception as e:  # keep the other cases' results
            res = dict(case=name, error=repr(e))
            print(name, "failed:", repr(e), flush=True)
        res["wall_s"] = time.time() - t0
        report["cases"].append(res)
        torch.cuda.empty_cache()
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
        (out / f"{args.name}.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
