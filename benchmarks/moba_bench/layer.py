"""A Llama-style transformer layer step (RMSNorm, QKV projection, attention, output projection,
RMSNorm, SwiGLU MLP, residuals; no RoPE: it is elementwise and the same for both attentions)
with MoBA or dense attention, for the ``layer-*`` cases' tokens/s."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moba_dist import moba_attn_varlen

from .cases import Case
from .dense import sdpa_call

__all__ = ["layer_fns", "layer_forward"]


def _weights(case: Case, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = (case.hq + 2 * case.hkv) * case.d
    shapes = dict(
        wqkv=(qkv, case.dim),
        wo=(case.dim, case.dim),
        w1=(case.mlp, case.dim),
        w3=(case.mlp, case.dim),
        w2=(case.dim, case.mlp),
    )
    return {
        n: (torch.randn(s, device=device, dtype=dtype, generator=g) * s[1] ** -0.5).requires_grad_()
        for n, s in shapes.items()
    }


def layer_forward(x: torch.Tensor, w: dict, case: Case, attn: str) -> torch.Tensor:
    """One layer on ``x [T, dim]``; ``attn``: a MoBA backend name or a dense baseline."""
    t, d = x.shape[0], case.d
    h = F.rms_norm(x, (case.dim,))
    q, k, v = F.linear(h, w["wqkv"]).split([case.hq * d, case.hkv * d, case.hkv * d], -1)
    q, k, v = q.view(t, case.hq, d), k.view(t, case.hkv, d), v.view(t, case.hkv, d)
    if attn.startswith("dense"):
        o = sdpa_call(attn, *(y.transpose(0, 1)[None] for y in (q, k, v)))[0].transpose(0, 1)
    else:
        cu = torch.tensor([0, t], dtype=torch.int32, device=x.device)
        o = moba_attn_varlen(
            q, k, v, cu, t, moba_chunk_size=case.block, moba_topk=case.topk, backend=attn
        )
    x = x + F.linear(o.reshape(t, case.dim), w["wo"])
    h = F.rms_norm(x, (case.dim,))
    return x + F.linear(F.silu(F.linear(h, w["w1"])) * F.linear(h, w["w3"]), w["w2"])


def layer_fns(case: Case, attn: str, device, dtype) -> tuple[Callable, Callable]:
    """(forward, forward+backward) of one layer step on fresh random activations."""
    w = _weights(case, device, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(case.tokens, case.dim, device=device, dtype=dtype, generator=g)
    dy = torch.randn_like(x)
    xl = x.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return layer_forward(x, w, case, attn)

    def fwd_bwd():
        layer_forward(xl, w, case, attn).backward(dy)
        for p in (xl, *w.values()):
            p.grad = None

    return fwd, fwd_bwd
