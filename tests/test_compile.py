"""``torch.compile(fullgraph=True)`` traces the public op as one graph (custom ops with fake
kernels and registered autograd) and matches eager, forward and backward.

The ``aot_eager`` compiler backend runs Dynamo and AOTAutograd (fake tensors, the joint
forward/backward graph) without code generation, so no C++ toolchain is needed on CPU.
"""

from __future__ import annotations

import pytest
import torch

from moba_dist import moba_attn_func, moba_attn_varlen

pytestmark = pytest.mark.skipif(
    not hasattr(torch, "compile") or not hasattr(torch.library, "register_autograd"),
    reason="needs torch.compile and torch.library.register_autograd",
)


def _layer(q, k, v, cu, w):
    """A caller with work before and after the op, as a model layer has."""
    out, lse = moba_attn_varlen(
        q * 1.5, k, v, cu, 13, moba_chunk_size=4, moba_topk=2, return_lse=True,
        backend="reference",
    )  # fmt: skip
    return (out * w).sum() + lse.sum()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(25, h, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    w = torch.randn(25, 4, 16, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 7, 7, 20, 25], dtype=torch.int32)
    return q, k, v, cu, w


def _run(fn, q, k, v, cu, w):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    loss = fn(*leaves, cu, w)
    loss.backward()
    return [loss, *(x.grad for x in leaves)]


def test_compiled_fullgraph_matches_eager():
    torch._dynamo.reset()
    args = _inputs()
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")
    got = _run(compiled, *args)
    want = _run(_layer, *args)
    for name, a, b in zip(["loss", "dq", "dk", "dv"], got, want, strict=True):
        # The same kernels run in both (the op is opaque to the compiler): bitwise equal.
        assert torch.equal(a, b), name


def test_compile_has_no_graph_break():
    torch._dynamo.reset()
    q, k, v, cu, w = _inputs(1)
    explanation = torch._dynamo.explain(_layer)(q, k, v, cu, w)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_batched_form_compiles():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 9, h, 16, generator=g) for h in (4, 4, 4))

    def fn(q, k, v):
        return moba_attn_func(q, k, v, moba_chunk_size=4, moba_topk=2, backend="reference")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), fn(q, k, v))
