"""Independent oracle: MoBA written straight from docs/semantics.md with loops and a dense mask.

Shares no code with moba_dist. Float64 throughout; differentiable in q, k, v (the mask is built
without gradient). Slow on purpose: only for the small shapes of the tests.
"""

from __future__ import annotations

import itertools
import math

import torch


def naive_mask(q: torch.Tensor, k: torch.Tensor, block: int, topk: int) -> torch.Tensor:
    """``[Hq, n, n]`` bool mask of one sequence: own block causal + top-(K-1) past blocks."""
    n, hq, _ = q.shape
    group = hq // k.shape[1]
    nblocks = math.ceil(n / block)
    mask = torch.zeros(hq, n, n, dtype=torch.bool)
    with torch.no_grad():
        for h in range(hq):
            keys = k[:, h // group].double()
            cents = [keys[j * block : min((j + 1) * block, n)].mean(0) for j in range(nblocks)]
            for t in range(n):
                own = t // block
                mask[h, t, own * block : t + 1] = True
                scores = {j: float(q[t, h].double() @ cents[j]) for j in range(own)}
                # Exact ties go to the lower block index.
                chosen = sorted(scores, key=lambda j: (-scores[j], j))[: topk - 1]
                for j in chosen:
                    mask[h, t, j * block : (j + 1) * block] = True
    return mask


def naive_moba(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: list[int],
    block: int,
    topk: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` -> ``out [T, Hq, D]`` float64, ``lse [Hq, T]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for s, e in itertools.pairwise(cu_seqlens):
        qs, ks, vs = q[s:e].double(), k[s:e].double(), v[s:e].double()
        mask = naive_mask(qs, ks, block, topk)
        kr = ks.repeat_interleave(
            group, dim=1
        )  # the oracle may repeat heads; the library never does
        vr = vs.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", qs, kr) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        lses.append(torch.logsumexp(scores, dim=-1))
        outs.append(torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), vr))
    return torch.cat(outs), torch.cat(lses, dim=1)
