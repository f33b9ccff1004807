"""Budgets of the single-device op on one GPU (issue 11 items 3-5): host syncs, 1M-token memory,
``torch.compile(fullgraph=True)`` with triton, and a bf16 accuracy check.

Conventions:
- syncs: ``torch.cuda.set_sync_debug_mode("warn")`` warnings (every device-to-host copy or
  stream/device synchronize torch issues) during one forward and one backward, after a warm-up
  call (Triton compilation is excluded); each is attributed to the Python line that caused it.
  Budget: <= 2 forward, <= 2 backward.
- memory: ``max_memory_allocated()`` after ``reset_peak_memory_stats()``, with q, k, v
  (requiring grad) and dout already allocated, over one fwd+bwd. Budget: <= 22 GiB.
- accuracy: relative Frobenius error ``|x - ref| / |ref|`` of out, dq, dk, dv (and dq with a loss
  on lse too) of the bf16 triton op against the reference backend on the same inputs upcast to
  float32, computed in float32.

Usage: ``PYTHONPATH=. python benchmarks/op_budgets.py --out DIR`` writes ``op_budgets.json`` and
``op_budgets.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from benchmarks.moba_bench.common import sync_sites
from moba_dist import moba_attn_varlen

GIB = 1 << 30
SYNC_CASES = {
    # name: (sequence lengths, Hq, Hkv, D, block, topk)
    "32K-H32": ([32768], 32, 32, 128, 1024, 4),
    "128K-64docs-H16kv4": (None, 16, 4, 128, 512, 8),
    "1M-H8": ([1 << 20], 8, 8, 128, 4096, 12),
}


def _docs(total: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randperm(total - 1, generator=g)[: n - 1] + 1).values.tolist()
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def _inputs(lens, hq, hkv, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = sum(lens)
    q, k, v, do = (
        torch.randn(t, h, d, device="cuda", dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq)
    )
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    return [x.requires_grad_() for x in (q, k, v)], do, cu


def _op(leaves, cu, lens, block, topk, backend="triton", **kw):
    return moba_attn_varlen(
        *leaves, cu, max(lens), moba_chunk_size=block, moba_topk=topk, backend=backend, **kw
    )


def sync_case(name: str) -> dict:
    lens, hq, hkv, d, block, topk = SYNC_CASES[name]
    lens = lens or _docs(1 << 17, 64, seed=1)
    leaves, do, cu = _inputs(lens, hq, hkv, d)
    _op(leaves, cu, lens, block, topk).backward(do)  # warm-up: Triton compiles
    for x in leaves:
        x.grad = None
    box = {}
    fwd = sync_sites(lambda: box.setdefault("out", _op(leaves, cu, lens, block, topk)))
    bwd = sync_sites(lambda: box["out"].backward(do))
    row = dict(case=name, tokens=sum(lens), seqs=len(lens), hq=hq, hkv=hkv, d=d, block=block,
               topk=topk, fwd_syncs=len(fwd), bwd_syncs=len(bwd), fwd_sites=fwd,
               bwd_sites=bwd)  # fmt: skip
    return row


def memory_1m() -> dict:
    lens, hq, hkv, d, block, topk = SYNC_CASES["1M-H8"]
    torch.cuda.empty_cache()
    leaves, do, cu = _inputs(lens, hq, hkv, d)
    inputs = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _op(leaves, cu, lens, block, topk).backward(do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    with_grads = torch.cuda.memory_allocated()
    del leaves, do
    gc.collect()
    # Whatever stays allocated once the caller drops every tensor is held by the library.
    left = torch.cuda.memory_allocated()
    return dict(case="1M-H8-B4096-top12-bf16", inputs_gib=inputs / GIB, peak_gib=peak / GIB,
                after_bwd_gib=with_grads / GIB, left_after_del_gib=left / GIB,
                budget_gib=22.0)  # fmt: skip


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def accuracy() -> dict:
    lens, hq, hkv, d, block, topk = [3000, 0, 5192], 8, 2, 128, 512, 4
    leaves, do, cu = _inputs(lens, hq, hkv, d)
    w = torch.randn(hq, sum(lens), device="cuda")
    res = {}
    runs = (("triton", torch.bfloat16), ("varlen", torch.bfloat16), ("reference", torch.float32))
    for backend, dtype in runs:
        xs = [x.detach().to(dtype).requires_grad_() for x in leaves]
        out, lse = _op(xs, cu, lens, block, topk, backend, return_lse=True)
        out.backward(do.to(dtype), retain_graph=True)
        res[backend] = [out, *(x.grad.clone() for x in xs)]
        if backend != "varlen":  # varlen refuses a gradient on lse
            for x in xs:
                x.grad = None
            ((out * do.to(dtype)).sum() + (lse * w).sum()).backward()
            res[backend].append(xs[0].grad)
    names = ["out", "dq", "dk", "dv", "dq_with_lse_loss"]
    errs = {
        b: {n: _rel(x, y) for n, x, y in zip(names, res[b], res["reference"], strict=False)}
        for b in ("triton", "varlen")
    }
    return dict(case="8K-2docs+empty-H8kv2-B512-top4", rel_frobenius=errs)


def compile_check() -> dict:
    lens, hq, hkv, d, block, topk = [4096, 4096], 8, 2, 128, 512, 4
    leaves, do, cu = _inputs(lens, hq, hkv, d)

    def fn(q, k, v):
        return _op([q * 1.5, k, v], cu, lens, block, topk)

    explain = torch._dynamo.explain(fn)(*leaves)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(*leaves)
    got.backward(do)
    g_got = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    want = fn(*leaves)
    want.backward(do)
    pairs = zip(
        ["out", "dq", "dk", "dv"], [got, *g_got], [want, *(x.grad for x in leaves)], strict=True
    )
    errs = {n: _rel(a, b) for n, a, b in pairs}
    return dict(graph_breaks=explain.graph_break_count, graphs=explain.graph_count,
                compiled_vs_eager_rel=errs)  # fmt: skip


def _markdown(rep: dict) -> str:
    lines = [f"# Op budgets on {rep['gpu']} (torch {rep['torch']})", "",
             "| case | tokens | seqs | Hq/Hkv | D | block | topk | fwd syncs | bwd syncs |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rep["syncs"]:
        lines.append(f"| {r['case']} | {r['tokens']} | {r['seqs']} | {r['hq']}/{r['hkv']} | "
                     f"{r['d']} | {r['block']} | {r['topk']} | {r['fwd_syncs']} | "
                     f"{r['bwd_syncs']} |")  # fmt: skip
    for r in rep["syncs"]:
        lines.append(f"\n{r['case']} sync sites: fwd {r['fwd_sites']}, bwd {r['bwd_sites']}")
    lines += ["", f"memory: {rep['memory']}", "", f"compile: {rep['compile']}", "",
              f"accuracy: {rep['accuracy']}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rep = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    # Memory first, in a fresh process: nothing else allocated.
    steps = [("memory", memory_1m), ("accuracy", accuracy), ("compile", compile_check)]
    steps += [("syncs", lambda: [sync_case(n) for n in SYNC_CASES])]
    for key, step in steps:
        try:
            rep[key] = step()
        except Exception as err:  # keep the other measurements when one step fails
            rep[key] = dict(error=f"{type(err).__name__}: {err}")
            if key == "syncs":
                rep[key] = []
        print(key, rep[key], flush=True)
        (args.out / "op_budgets.json").write_text(json.dumps(rep, indent=1, default=str))
    (args.out / "op_budgets.md").write_text(_markdown(rep))


if __name__ == "__main__":
    main()
