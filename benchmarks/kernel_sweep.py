"""Issue 13's offline tile sweep: check and time the routed kernels' launch shapes on one GPU.

For each case it builds the op's own routing (gate, plan), then times the forward kernels, the
dK/dV and the dQ kernels for every candidate tile shape, checks each result against the default
shape's, and times the plan build and the dense Triton yardstick. One JSON line per measurement
goes to ``--out`` (and stdout); the chosen shapes are committed in ``plan_types`` by hand.

    PYTHONPATH=. python benchmarks/kernel_sweep.py --out DIR [--cases h32-32k,...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.moba_bench.common import median_ms, moba_flops, rel_err
from benchmarks.moba_bench.triton_dense import dense_triton_fwd, dense_triton_fwd_bwd
from moba_dist.kernels import triton_bwd, triton_moba
from moba_dist.kernels.blocks import BlockLayout
from moba_dist.kernels.plan_types import BwdConfig, FwdConfig, TileConfig
from moba_dist.kernels.triton_fwd import fwd_chunks
from moba_dist.ops import _problem, moba_route

K = 1024
CASES = {  # name: (lens, hq, hkv, d, block, topk)
    "h32-32k": ([32 * K], 32, 32, 128, 512, 3),
    "h16-128k": ([128 * K], 16, 16, 128, 512, 3),
    "gqa-128k-b512": ([128 * K], 32, 8, 128, 512, 8),
    "h32-128k-b4096": ([128 * K], 32, 32, 128, 4096, 12),
    "gqa-128k-b4096": ([128 * K], 32, 8, 128, 4096, 12),
    "fm-64k": ([64 * K] * 2, 16, 16, 128, 128, 8),
    "fm-128k": ([128 * K] * 2, 16, 16, 128, 128, 8),
    "d64-32k": ([32 * K], 32, 8, 64, 512, 3),
    "d256-32k": ([32 * K], 16, 4, 256, 512, 3),
    "d96-32k": ([32 * K], 32, 8, 96, 512, 3),
}
FWD = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3)]
DKDV = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2)]
DQ = [(128, 32, 8, 3), (128, 64, 8, 2), (128, 32, 8, 4), (64, 32, 4, 3)]
SMALL_D = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    256: [(64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
    96: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
}
LAYOUTS = ("token", "head")
BWD = [  # (tag, BwdConfig keywords): the whole backward, D = 128
    ("default", {}),
    ("no-skip", dict(dkdv_skip=False)),
    ("slab28-chunk28", dict(slab_elems=1 << 28, chunk_elems=1 << 28)),
]


def kv_layout(x, layout):
    """``x [T, Hkv, D]`` stored token-major (as given) or head-major (a transposed copy)."""
    return x if layout == "token" else x.transpose(0, 1).contiguous().transpose(0, 1)


def emit(out, **row):
    line = json.dumps(row)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def build(name, dev):
    lens, hq, hkv, d, block, topk = CASES[name]
    t = sum(lens)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (
        torch.randn(t, h, d, generator=g, device=dev, dtype=torch.bfloat16)
        for h in (hq, hkv, hkv, hq)
    )
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    layout = BlockLayout.build(cu, block)
    sel = moba_route(q, k, layout, topk)
    prob = triton_moba._int64_problem(_problem(layout, sel, d**-0.5))
    flops = moba_flops(lens, hq, d, block, topk)[0]
    return q, k, v, do, prob, flops


def time_variants(out, name, what, variants, flops, reps, dev):
    """Check and time each ``(tags, run)`` of ``variants``: ``run()`` returns tensors, compared
    with the first variant that ran (``err``: the first tensor, ``lse_err``: a second one)."""
    base = None
    for tags, run in variants:
        try:
            got = run()
            base = got if base is None else base
            ms = median_ms(run, reps, dev)
            row = dict(ms=ms, tflops=flops / ms / 1e9, err=rel_err(got[0], base[0]))
            if len(got) > 1:
                row["lse_err"] = float((got[1] - base[1]).abs().max())
            emit(out, case=name, what=what, **tags, **row)
        except Exception as e:
            emit(out, case=name, what=what, **tags, error=f"{type(e).__name__}: {e}"[:300])
    return base


def fwd_variants(q, k, v, prob, plan, cfgs):
    for cfg, lay in [(c, x) for c in cfgs for x in LAYOUTS]:
        fc = FwdConfig(tiles={q.shape[-1]: TileConfig(*cfg)})
        kl, vl = kv_layout(k, lay), kv_layout(v, lay)
        yield (
            dict(cfg=cfg, layout=lay),
            lambda fc=fc, kl=kl, vl=vl: fwd_chunks(q, kl, vl, prob, plan, fc),
        )


def dkdv_variants(q, k, v, do, lse2, delta, prob, plan, cfgs):
    for cfg in cfgs:
        bc = BwdConfig(dkdv={q.shape[-1]: TileConfig(*cfg)})

        def run(bc=bc):
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
            triton_bwd._dkdv(q, k, v, do, lse2, delta, prob, plan, bc, dk, dv)
            return (dk,)

        yield dict(cfg=cfg), run


def dq_variants(q, k, v, do, lse2, delta, prob, plan, cfgs):
    for cfg, lay in [(c, x) for c in cfgs for x in LAYOUTS]:
        bc = BwdConfig(dq={q.shape[-1]: TileConfig(*cfg)})
        kl, vl = kv_layout(k, lay), kv_layout(v, lay)

        def run(bc=bc, kl=kl, vl=vl):
            dq = torch.empty_like(q)
            triton_bwd._dq(q, kl, vl, do, lse2, delta, prob, plan, bc, dq)
            return (dq,)

        yield dict(cfg=cfg, layout=lay), run


def sweep_case(name, dev, out, reps):
    q, k, v, do, prob, flops = build(name, dev)
    d = q.shape[-1]
    hkv = k.shape[1]
    plan = triton_moba.plan_entries(prob.sel, prob.num_blocks, hkv)
    ms = median_ms(lambda: triton_moba.plan_entries(prob.sel, prob.num_blocks, hkv), reps, dev)
    emit(out, case=name, what="plan", ms=ms, entries=plan.num_entries, groups=plan.num_groups)
    fwd = fwd_variants(q, k, v, prob, plan, SMALL_D.get(d, FWD))
    o, lse = time_variants(out, name, "fwd", fwd, flops, reps, dev)
    lse2, delta = triton_bwd.prep_rows(do, o, lse)
    dkdv = dkdv_variants(q, k, v, do, lse2, delta, prob, plan, SMALL_D.get(d, DKDV))
    time_variants(out, name, "dkdv", dkdv, flops, reps, dev)
    dq = dq_variants(q, k, v, do, lse2, delta, prob, plan, SMALL_D.get(d, DQ))
    time_variants(out, name, "dq", dq, 0.75 * flops, reps, dev)
    torch.cuda.empty_cache()


def bwd_case(name, dev, out, reps):
    """The forward at partial chunks of 2^28 and 2^30 elements, and the whole backward
    (``bwd_all``) per ``BWD`` variant, each against its first variant (bwd rows: ``err`` of dk,
    ``lse_err`` = max |dq - dq default|)."""
    q, k, v, do, prob, flops = build(name, dev)
    plan = triton_moba.plan_entries(prob.sel, prob.num_blocks, k.shape[1])
    fwd = [
        (dict(chunk=c), lambda c=c: fwd_chunks(q, k, v, prob, plan, FwdConfig(chunk_elems=c)))
        for c in (1 << 28, 1 << 30)
    ]
    o, lse = time_variants(out, name, "fwd-chunk", fwd, flops, reps, dev)

    def run(cfg):
        dq, dk, _ = triton_bwd.bwd_all(do, q, k, v, o, lse, prob, plan, q.dtype, cfg)
        return dk, dq

    def variants():
        for tag, kw in BWD:
            cfg = BwdConfig(**kw)
            yield dict(tag=tag), lambda cfg=cfg: run(cfg)

    time_variants(out, name, "bwd", variants(), 2.5 * flops, reps, dev)
    torch.cuda.empty_cache()


def check_small(dev, out):
    """bf16 kernels vs the float32 reference, and the bf16 torch reference's own error."""
    from moba_dist import moba_attn_varlen

    for d in (64, 96, 128, 256):
        for lens, block, hq, hkv, topk in (([3000, 1500], 256, 8, 2, 3), ([4096], 1024, 4, 4, 2)):
            t = sum(lens)
            g = torch.Generator(device=dev).manual_seed(d)
            xs = [torch.randn(t, h, d, generator=g, device=dev) for h in (hq, hkv, hkv, hq)]
            cu = torch.tensor(
                [0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev
            )
            res = {}
            for tag, backend, dt in (
                ("f32", "reference", torch.float32),
                ("bf16_ref", "reference", torch.bfloat16),
                ("bf16_triton", "triton", torch.bfloat16),
            ):
                lq, lk, lv = (x.detach().to(dt).requires_grad_() for x in xs[:3])
                o = moba_attn_varlen(
                    lq,
                    lk,
                    lv,
                    cu,
                    max(lens),
                    moba_chunk_size=block,
                    moba_topk=topk,
                    backend=backend,
                )
                o.backward(xs[3].to(dt))
                res[tag] = [o.float(), lq.grad.float(), lk.grad.float(), lv.grad.float()]
            for tag in ("bf16_ref", "bf16_triton"):
                emit(
                    out,
                    what="check",
                    d=d,
                    lens=lens,
                    block=block,
                    tag=tag,
                    errs=[rel_err(a, b) for a, b in zip(res[tag], res["f32"], strict=True)],
                )


def dense_yardstick(dev, out, reps):
    import torch.nn.functional as F

    for s, h in ((4096, 4), (32 * K, 32), (128 * K, 32)):
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v, do = (
            torch.randn(1, h, s, 128, generator=g, device=dev, dtype=torch.bfloat16)
            for _ in range(4)
        )
        flops = 4.0 * 128 * h * s * (s + 1) / 2
        if s == 4096:
            o, _ = dense_triton_fwd(q, k, v)
            lq, lk, lv = (x.clone().requires_grad_() for x in (q, k, v))
            F.scaled_dot_product_attention(lq, lk, lv, is_causal=True).backward(do)
            got = dense_triton_fwd_bwd(q, k, v, do)
            want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            emit(
                out,
                what="dense-check",
                out_err=rel_err(o, want),
                grad_errs=[rel_err(a, b.grad) for a, b in zip(got, (lq, lk, lv), strict=True)],
            )
            continue
        for ft in ((128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3)):
            ms = median_ms(lambda ft=ft: dense_triton_fwd(q, k, v, ft), reps, dev)  # noqa: B023
            emit(out, what="dense-fwd", s=s, h=h, cfg=ft, ms=ms, tflops=flops / ms / 1e9)
        for dk_t, dq_t in (
            ((64, 64, 4, 2), (128, 32, 8, 3)),
            ((64, 128, 8, 3), (128, 32, 8, 3)),
            ((32, 64, 4, 3), (128, 64, 8, 2)),
            ((64, 64, 4, 3), (128, 32, 8, 4)),
        ):
            ms = median_ms(
                lambda a=dk_t, b=dq_t: dense_triton_fwd_bwd(q, k, v, do, (128, 64, 8, 3), a, b),  # noqa: B023
                reps,
                dev,
            )
            emit(
                out,
                what="dense-fwdbwd",
                s=s,
                h=h,
                cfg=[dk_t, dq_t],
                ms=ms,
                tflops=3.5 * flops / ms / 1e9,
            )


def profile(dev, out_dir, names):
    """Per-kernel device time of the public op's fwd+bwd (the tool's profile table)."""
    from benchmarks.moba_bench.cases import CASES as TOOL_CASES
    from benchmarks.moba_bench.local import profile_table

    for name in names.split(","):
        table = profile_table(TOOL_CASES[name], dev, "triton", rows=25)
        with open(os.path.join(out_dir, f"profile_{name}.txt"), "w") as f:
            f.write(table)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip", default="")
    ap.add_argument("--profile", default="h32-32k,h32-128k-b4096")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    t0 = time.time()
    with open(os.path.join(args.out, "sweep.jsonl"), "w") as out:
        emit(out, what="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__)
        for part in ("check", "bwd", "cases", "dense", "profile"):
            if part in args.skip.split(","):
                continue
            try:
                if part == "check":
                    check_small(dev, out)
                elif part == "dense":
                    dense_yardstick(dev, out, args.reps)
                elif part == "bwd":
                    for name in args.cases.split(","):
                        bwd_case(name, dev, out, args.reps)
                        emit(out, what="elapsed", s=time.time() - t0)
                elif part == "profile":
                    profile(dev, args.out, args.profile)
                else:
                    for name in args.cases.split(","):
                        sweep_case(name, dev, out, args.reps)
                        emit(out, what="elapsed", s=time.time() - t0)
            except Exception as e:
                emit(out, what="part-error", part=part, error=f"{type(e).__name__}: {e}"[:500])


if __name__ == "__main__":
    main()
