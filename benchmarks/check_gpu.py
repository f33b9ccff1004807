"""GPU correctness check of the single-device op (issue 3): bf16 backends vs a float32 reference.

    PYTHONPATH=. python benchmarks/check_gpu.py [--cases NAME ...] [--backends varlen reference]

For each case: fresh random bf16 inputs; the float32 reference is the `reference` backend on the
same values upcast; every bf16 backend's out/dq/dk/dv relative Frobenius error is printed next to
that of the `reference` backend run in bf16 (the bf16 PyTorch reference) and must stay within 2x
of it. The routing agreement compares the float32 gate with a float64 gate on the same inputs,
excluding near-ties (K-1-th and K-th best candidate within 1e-5 relative).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moba_dist import moba_attn_varlen
from moba_dist.kernels.blocks import BlockLayout
from moba_dist.ops import moba_route

# name: (sequence lengths, Hq, Hkv, D, block, topk)
CASES = {
    "gqa4-packed": ([1000, 4000, 3192], 16, 4, 128, 512, 3),
    "mha-d64-32k": ([32768], 8, 8, 64, 256, 4),
    "mqa-ragged": ([777, 2049, 5000], 8, 1, 128, 128, 8),
    # Gathered queries T * Hq * (K-1) * D = 5.9e9 > 2^31: an unchunked gather would overflow.
    "big-gather-128k": ([131072], 32, 8, 128, 4096, 12),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(backend, q, k, v, dout, cu, block, topk):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = moba_attn_varlen(
        *leaves, cu, int((cu[1:] - cu[:-1]).max()), moba_chunk_size=block, moba_topk=topk,
        backend=backend,
    )  # fmt: skip
    out.backward(dout.to(out.dtype))
    torch.cuda.synchronize()
    return [out.detach(), *(x.grad for x in leaves)], time.perf_counter() - t0


def routing_agreement(q, k, cu, block, topk) -> float:
    layout = BlockLayout.build(cu, block)
    s32 = moba_route(q.float(), k.float(), layout, topk)
    s64 = moba_route(q.double(), k.double(), layout, topk)
    same = (s32.sort(-1).values == s64.sort(-1).values).all(-1)
    return same.float().mean().item()


def check_case(name, backends):
    lens, hq, hkv, d, block, topk = CASES[name]
    t = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(t, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn(t, hq, d, device="cuda", dtype=torch.bfloat16)
    want, _ = run("reference", q.float(), k.float(), v.float(), dout.float(), cu, block, topk)
    rows = []
    base, _ = run("reference", q, k, v, dout, cu, block, topk)
    base_err = [rel(a, b) for a, b in zip(base, want, strict=True)]
    for be in backends:
        got, secs = run(be, q, k, v, dout, cu, block, topk)
        errs = [rel(a, b) for a, b in zip(got, want, strict=True)]
        ok = all(e <= 2 * max(b, 1e-3) and e == e for e, b in zip(errs, base_err, strict=True))
        rows.append(dict(case=name, backend=be, errs=errs, bf16_ref_errs=base_err, ok=ok, s=secs))
    agree = routing_agreement(q, k, cu, block, topk) if t <= 40000 else float("nan")
    del want, base
    torch.cuda.empty_cache()
    return rows, agree


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--backends", nargs="*", default=["varlen"])
    args = p.parse_args()
    print(torch.__version__, torch.cuda.get_device_name())
    all_rows, ok = [], True
    for name in args.cases:
        rows, agree = check_case(name, args.backends)
        for r in rows:
            ok &= r["ok"]
            e, b = r["errs"], r["bf16_ref_errs"]
            print(
                f"{name:16s} {r['backend']:9s} rel err out/dq/dk/dv "
                + " ".join(f"{x:.2e}" for x in e)
                + " | bf16 reference "
                + " ".join(f"{x:.2e}" for x in b)
                + f" | routing agreement {agree:.5f} | {r['s']:.2f}s {'OK' if r['ok'] else 'FAIL'}",
                flush=True,
            )
            all_rows.append(r | {"routing_agreement": agree})
    print(json.dumps(all_rows))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
