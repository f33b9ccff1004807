"""Job ``decode``: latency of one decode step (one query token, batch 1) against a cache of
``lens[0]`` tokens, MoBA sparse decode vs dense SDPA decode.

When ``benchmarks/decode_bench.py`` provides ``bench_rows(case, reps, device) -> list[dict]``
(rows with ``backend`` and ``step_ms``) its rows are used. Otherwise the library's decode step
(``moba_dist.integrations.hf_decode.moba_decode_step``, backend ``auto``: its Triton kernel on
a GPU) is timed as ``moba-decode``, and this module's minimal PyTorch step as
``moba-decode-minimal``. Both read the complete blocks' key sums that a cache keeps up
to date (not timed), score them, take the top K - 1 and attend to those blocks and the own one.
"""

from __future__ import annotations

import importlib

import torch

from . import dense
from .cases import Case
from .local import Budget

__all__ = ["moba_decode_step", "run_decode_case"]


def moba_decode_step(q, kc, vc, cent, block: int, topk: int) -> torch.Tensor:
    """``q [Hq, D]`` at position S - 1 of caches ``kc, vc [Hkv, S, D]`` with block centroids
    ``cent [Hkv, N, D]`` -> ``out [Hq, D]``: MoBA attention of the newest token."""
    hkv, s, d = kc.shape
    g, cur = q.shape[0] // hkv, (s - 1) // block
    qg, acc = q.view(hkv, g, d), torch.promote_types(q.dtype, torch.float32)
    own = torch.arange(cur * block, s, device=q.device).expand(hkv, g, -1)
    idx = own
    if cur > 0 and topk > 1:
        scores = torch.einsum("hgd,hnd->hgn", qg.to(acc), cent[:, :cur].to(acc))
        sel = scores.topk(min(topk - 1, cur), -1).indices
        past = (sel[..., None] * block + torch.arange(block, device=q.device)).flatten(2)
        idx = torch.cat([past, own], -1)
    flat = idx.reshape(hkv, -1, 1).expand(-1, -1, d)
    ks = kc.gather(1, flat).view(hkv, g, -1, d)
    vs = vc.gather(1, flat).view(hkv, g, -1, d)
    att = torch.einsum("hgd,hgld->hgl", qg.to(acc), ks.to(acc)) * d**-0.5
    out = torch.einsum("hgl,hgld->hgd", att.softmax(-1), vs.to(acc))
    return out.reshape(-1, d).to(q.dtype)


def _external():
    try:
        mod = importlib.import_module("benchmarks.decode_bench")
    except ImportError:
        return None
    return getattr(mod, "bench_rows", None)


def _library_step(q, kc, vc, cent, case: Case):
    """The library's decode step on these caches (batch 1), or None where it is missing."""
    try:
        from moba_dist.integrations.hf_decode import moba_decode_step as step
    except ImportError:
        return None
    sums = (cent * case.block)[None]  # complete-block key sums [1, Hkv, n, D]
    starts = torch.zeros(1, dtype=torch.int64, device=q.device)
    t = torch.full((1,), kc.shape[1] - 1, dtype=torch.int64, device=q.device)
    args = (q[None], kc[None], vc[None], sums, starts, t, case.block, case.topk, case.d**-0.5)
    return lambda: step(*args)


def _base_row(case: Case) -> dict:
    return dict(
        job="decode",
        case=case.name,
        kind="decode",
        T=case.tokens,
        Hq=case.hq,
        Hkv=case.hkv,
        D=case.d,
        block=case.block,
        topk=case.topk,
        keys_moba=min(case.tokens, case.topk * case.block),
    )


def run_decode_case(
    case: Case, device, backend: str, reps: int, budget_s: float, log=print
) -> list[dict]:
    """Rows of one decode case: MoBA and every dense baseline, ``step_ms`` each."""
    ext = _external()
    if ext is not None:
        rows = [
            dict(_base_row(case), source="decode_bench.py", **r) for r in ext(case, reps, device)
        ]
        return _finish(rows)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    s, n = case.tokens, case.tokens // case.block
    kc, vc = (
        torch.randn(case.hkv, s, case.d, device=device, dtype=dtype, generator=g) for _ in range(2)
    )
    q = torch.randn(case.hq, case.d, device=device, dtype=dtype, generator=g)
    cent = kc[:, : n * case.block].view(case.hkv, n, case.block, case.d).float().mean(2)
    budget, rows = Budget(budget_s), []
    steps = {"moba-decode-minimal": lambda: moba_decode_step(q, kc, vc, cent, case.block,
                                                              case.topk)}  # fmt: skip
    library = _library_step(q, kc, vc, cent, case)
    if library is not None:  # both: the minimal step still gives a MoBA number if it fails
        steps = {"moba-decode": library, **steps}
    for name in dense.dense_backends(device):
        steps[name] = lambda name=name: dense.sdpa_call(
            name, q[None, :, None], kc[None], vc[None], causal=False
        )
    for name, fn in steps.items():
        row = dict(_base_row(case), backend=name, source="moba_bench.decode")
        try:
            with torch.no_grad():
                row["step_ms"] = budget.time(fn, reps, device)
        except Exception as e:  # keep the other backends' numbers
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"  {case.name} {name}: {row.get('step_ms', row.get('error'))}")
        rows.append(row)
    return _finish(rows)


def _finish(rows: list[dict]) -> list[dict]:
    timed = [r for r in rows if r["backend"].startswith("dense") and r.get("step_ms")]
    best = min(timed, key=lambda r: r["step_ms"], default=None)
    for r in rows:
        r["dense_step_ms"] = best["step_ms"] if best else None
        r["dense_backend"] = best["backend"] if best else None
        if best and r.get("step_ms"):
            r["speedup_step"] = best["step_ms"] / r["step_ms"]
    return rows
