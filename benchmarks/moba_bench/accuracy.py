"""Job ``accuracy``: relative Frobenius error of out, dq, dk, dv of the op in bf16 against the
same op computed in float32 on float32 copies of the inputs (the reference backend), next to
the bf16 PyTorch reference's error as the yardstick (issue 13: within 2x of it).

Inputs are drawn in float32 and rounded to bf16, so both runs see identical values and the
gate (which scores in float32) routes identically: the error is the attention arithmetic's.
Cases are cut to ``tokens`` tokens (the reference materialises routed scores).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moba_dist import moba_attn_varlen

from .cases import Case
from .common import rel_err

__all__ = ["run_accuracy_case", "shrink"]

NAMES = ("out", "dq", "dk", "dv")


def shrink(case: Case, tokens: int) -> Case:
    """``case`` with its sequences cut so that they total at most ``tokens``."""
    lens, left = [], tokens
    for t in case.lens:
        if left <= 0:
            break
        lens.append(min(t, left))
        left -= lens[-1]
    return replace(case, lens=tuple(lens))


def _grads(q, k, v, do, cu, case: Case, backend: str, dtype) -> list[torch.Tensor]:
    leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
    out = moba_attn_varlen(
        *leaves, cu, case.longest, moba_chunk_size=case.block, moba_topk=case.topk, backend=backend
    )
    out.backward(do.to(dtype))
    return [out.detach(), *(x.grad for x in leaves)]


def run_accuracy_case(case: Case, device, backend: str, tokens: int, log=print) -> list[dict]:
    """One row per path: ``backend`` and the reference backend, both in bf16."""
    small = shrink(case, tokens)
    low = torch.bfloat16  # the CPU --quick run too: the reference backend takes bf16
    g = torch.Generator(device=device).manual_seed(11)
    q, k, v, do = (
        torch.randn(small.tokens, h, case.d, device=device, generator=g).bfloat16().float()
        for h in (case.hq, case.hkv, case.hkv, case.hq)
    )
    cu = torch.tensor([0, *torch.tensor(small.lens).cumsum(0).tolist()], dtype=torch.int32)
    cu = cu.to(device)
    base = dict(
        job="accuracy",
        case=case.name,
        T=small.tokens,
        nseq=len(small.lens),
        Hq=case.hq,
        Hkv=case.hkv,
        D=case.d,
        block=case.block,
        topk=case.topk,
    )
    rows = []
    try:
        want = _grads(q, k, v, do, cu, small, "reference", torch.float32)
    except Exception as e:  # no float32 reference: every path's row says why
        return [dict(base, backend=backend, error=f"reference: {type(e).__name__}: {e}"[:300])]
    paths = {backend: backend, "reference-bf16": "reference"}
    if backend == "reference":
        paths = {"reference-bf16": "reference"}
    for label, name in paths.items():
        row = dict(base, backend=label, dtype=str(low).removeprefix("torch."))
        try:
            got = _grads(q, k, v, do, cu, small, name, low)
            row.update(
                {f"{n}_err": rel_err(a, b) for n, a, b in zip(NAMES, got, want, strict=True)}
            )
        except Exception as e:  # keep the other path's numbers
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"  {case.name} {label}: " + ", ".join(f"{n}={row.get(f'{n}_err')}" for n in NAMES))
        rows.append(row)
    ref = next((r for r in rows if r["backend"] == "reference-bf16" and "error" not in r), None)
    for r in rows:
        if ref is not None and r is not ref and "error" not in r:
            r["within_2x_bf16_reference"] = all(r[f"{n}_err"] <= 2 * ref[f"{n}_err"] for n in NAMES)
    return rows
