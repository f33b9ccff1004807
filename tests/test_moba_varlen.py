"""Single-device MoBA op against the independent float64 oracle (tests/moba_naive.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from moba_naive import naive_moba

from moba_dist import moba_attn_func, moba_attn_varlen, ops
from moba_dist.config import GATE_PRECISIONS

# Float64 inputs run the library in float64 end to end; the oracle differs only in summation
# order, so 1e-9 is ~1e5 ulps of headroom and still catches any wrong mask entry (O(0.1) errors).
TOL64 = dict(atol=1e-9, rtol=1e-9)
# Float32 inputs: float32 accumulation over <= 64 keys, errors ~1e-6; 2e-5 leaves 10x margin.
TOL32 = dict(atol=2e-5, rtol=2e-5)

CASES = {
    # name: (block size, sequence lengths) -- lengths 1, B-1, B, B+1 and a ragged last block.
    "ragged-B4": (4, [1, 3, 4, 5, 14]),
    "B1": (1, [1, 2, 9]),
    "B-gt-seq": (64, [5, 20, 33]),
    "one-seq-B8": (8, [61]),
}
HEADS = {"mha": (4, 4), "gqa2to1": (4, 2), "gqa4to1": (8, 2)}


def make_inputs(lens, hq, hkv, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def run_both(q, k, v, cu, block, topk, dtype=torch.float64):
    """Library and oracle out/lse/grads for the same inputs and the same upstream gradient."""
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = moba_attn_varlen(
        *leaves, cu, int((cu[1:] - cu[:-1]).max()), moba_chunk_size=block, moba_topk=topk,
        return_lse=True, backend="reference",
    )  # fmt: skip
    out.backward(dout.to(dtype))
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = naive_moba(*ref_leaves, cu.tolist(), block, topk)
    ref_out.backward(dout)
    got = [out, lse, *(x.grad for x in leaves)]
    want = [ref_out, ref_lse, *(x.grad for x in ref_leaves)]
    return got, want


@pytest.mark.parametrize("topk", [1, 2, 3, 100], ids=lambda k: f"topk{k}")
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_oracle_float64(case, heads, topk):
    block, lens = case
    q, k, v, cu = make_inputs(lens, *heads)
    got, want = run_both(q, k, v, cu, block, topk)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True):
        # lse is float32 by contract: compare at float32 precision.
        tol = TOL32 if name == "lse" else TOL64
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("topk", [2, 3], ids=lambda k: f"topk{k}")
def test_matches_oracle_float32(topk):
    q, k, v, cu = make_inputs([7, 33, 40], 4, 2, d=32, dtype=torch.float32, seed=3)
    got, want = run_both(q, k, v, cu, 8, topk, dtype=torch.float32)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, **TOL32)


def causal_sdpa(q, k, v, cu):
    """Per-sequence causal attention through torch SDPA (GQA by repeating heads)."""
    group = q.shape[1] // k.shape[1]
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("block", [1, 5, 16, 200], ids=lambda b: f"B{b}")
def test_topk_ge_blocks_is_causal_attention(block):
    q, k, v, cu = make_inputs([9, 50, 31], 4, 2)
    out = moba_attn_varlen(
        q, k, v, cu, 50, moba_chunk_size=block, moba_topk=50, backend="reference"
    )
    torch.testing.assert_close(out, causal_sdpa(q, k, v, cu), **TOL64)


def test_topk1_is_own_block_causal():
    block = 6
    q, k, v, cu = make_inputs([20], 2, 2)
    out = moba_attn_varlen(q, k, v, cu, 20, moba_chunk_size=block, moba_topk=1, backend="reference")
    # Own block only = causal attention within each block, i.e. blocks as separate sequences.
    blocks = torch.tensor([0, 6, 12, 18, 20], dtype=torch.int32)
    torch.testing.assert_close(out, causal_sdpa(q, k, v, blocks), **TOL64)


def test_exact_ties_pick_lower_block():
    # Every block holds the same keys, so all past blocks tie exactly; K=2 must pick block 0.
    block, nblocks = 4, 5
    g = torch.Generator().manual_seed(5)
    k_block = torch.randn(block, 1, 8, generator=g, dtype=torch.float64)
    k = k_block.repeat(nblocks, 1, 1)
    v = torch.randn(block * nblocks, 1, 8, generator=g, dtype=torch.float64)
    q = torch.randn(block * nblocks, 1, 8, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, block * nblocks], dtype=torch.int32)
    out = moba_attn_varlen(q, k, v, cu, 20, moba_chunk_size=block, moba_topk=2, backend="reference")
    expect = torch.empty_like(out)
    for t in range(block * nblocks):
        own = t // block
        keys = list(range(own * block, t + 1)) + (list(range(block)) if own > 0 else [])
        w = torch.softmax((k[keys, 0] @ q[t, 0]) * 8**-0.5, 0)
        expect[t, 0] = w @ v[keys, 0]
    torch.testing.assert_close(out, expect, **TOL64)


def test_packing_does_not_change_results():
    q, k, v, cu = make_inputs([13, 22, 9], 4, 2)
    packed = moba_attn_varlen(q, k, v, cu, 22, moba_chunk_size=4, moba_topk=3, backend="reference")
    s, e = 13, 35
    alone = moba_attn_varlen(
        q[s:e], k[s:e], v[s:e], torch.tensor([0, 22], dtype=torch.int32), 22,
        moba_chunk_size=4, moba_topk=3, backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(packed[s:e], alone, **TOL64)


def test_batched_form_equals_packed_form():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(3, 19, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 19, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    out, lse = moba_attn_func(
        q, k, v, moba_chunk_size=4, moba_topk=2, return_lse=True, backend="reference"
    )
    cu = torch.tensor([0, 19, 38, 57], dtype=torch.int32)
    ref_out, ref_lse = naive_moba(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu.tolist(), 4, 2
    )
    assert out.shape == (3, 19, 4, 8) and lse.shape == (3, 4, 19)
    torch.testing.assert_close(out.flatten(0, 1), ref_out, **TOL64)
    torch.testing.assert_close(lse.double(), ref_lse.view(4, 3, 19).transpose(0, 1), **TOL32)


def test_non_contiguous_inputs():
    q, k, v, cu = make_inputs([30], 4, 2)
    # Same values, transposed storage: [H, T, D] memory viewed as [T, H, D].
    qt, kt, vt = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    assert not qt.is_contiguous()
    a = moba_attn_varlen(q, k, v, cu, 30, moba_chunk_size=4, moba_topk=2, backend="reference")
    b = moba_attn_varlen(qt, kt, vt, cu, 30, moba_chunk_size=4, moba_topk=2, backend="reference")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_gradcheck_tiny():
    q, k, v, cu = make_inputs([3, 7], 2, 1, d=4)
    leaves = [x.requires_grad_() for x in (q, k, v)]

    def fn(q, k, v):
        return moba_attn_varlen(q, k, v, cu, 7, moba_chunk_size=2, moba_topk=2, backend="reference")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_auto_backend_on_cpu_is_reference():
    q, k, v, cu = make_inputs([10], 2, 2)
    a = moba_attn_varlen(q, k, v, cu, 10, moba_chunk_size=4, moba_topk=2)
    b = moba_attn_varlen(q, k, v, cu, 10, moba_chunk_size=4, moba_topk=2, backend="reference")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_empty_sequences_contribute_nothing():
    # Repeated offsets (empty sequences, as padding-free collators emit) change nothing: the
    # result equals the same tokens packed without them, and the float64 oracle.
    q, k, v, cu = make_inputs([5, 12, 9], 4, 2)
    cu_empty = torch.tensor([0, 0, 5, 5, 17, 26, 26], dtype=torch.int32)
    got, want = run_both(q, k, v, cu_empty, 4, 2)
    plain, _ = run_both(q, k, v, cu, 4, 2)
    for name, a, b, c in zip(["out", "lse", "dq", "dk", "dv"], got, want, plain, strict=True):
        tol = TOL32 if name == "lse" else TOL64  # lse is float32 by contract
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name: f"{n}: {m}")
        assert torch.equal(a, c), name


@pytest.mark.parametrize("cu", [[0, 0], [0, 0, 0]], ids=["one-empty", "two-empty"])
def test_zero_tokens_give_empty_outputs(cu):
    q, k, v = (torch.randn(0, h, 16, requires_grad=True) for h in (4, 2, 2))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    out, lse = moba_attn_varlen(
        q, k, v, cu_t, 0, moba_chunk_size=4, moba_topk=2, return_lse=True, backend="reference"
    )
    assert out.shape == (0, 4, 16) and lse.shape == (4, 0) and lse.dtype == torch.float32
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("shape", [(2, 0), (0, 6)], ids=["S0", "B0"])
def test_batched_empty_gives_empty_outputs(shape):
    b, s = shape
    q, k, v = (torch.randn(b, s, h, 16) for h in (4, 2, 2))
    out, lse = moba_attn_func(q, k, v, moba_chunk_size=4, moba_topk=2, return_lse=True)
    assert out.shape == (b, s, 4, 16) and lse.shape == (b, 4, s)


def test_batched_form_rejects_bhsd_when_heads_differ():
    # [B, H, S, D] tensors with Hq != Hkv differ on dim 1 only: reported as the wrong layout.
    q, k = torch.randn(2, 4, 12, 16), torch.randn(2, 2, 12, 16)
    with pytest.raises(ValueError, match=r"\[B, S, H, D\].*looks like\s+\[B, H, S, D\]"):
        moba_attn_func(q, k, k, moba_chunk_size=4, moba_topk=2)


def test_lse_gradient_matches_oracle():
    # A loss on lse as well as out: d lse / d s = p enters the backward as delta - dlse. The
    # float64 oracle's autograd is the independent expectation.
    q, k, v, cu = make_inputs([7, 13], 4, 2)
    g = torch.Generator().manual_seed(3)
    w_out = torch.randn(q.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(4, q.shape[0], generator=g, dtype=torch.float64)
    grads = []
    for use_lib in (True, False):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        if use_lib:
            out, lse = moba_attn_varlen(
                *leaves, cu, 13, moba_chunk_size=4, moba_topk=2, return_lse=True,
                backend="reference",
            )  # fmt: skip
            lse = lse.double()
        else:
            out, lse = naive_moba(*leaves, cu.tolist(), 4, 2)
        ((out * w_out).sum() + (lse * w_lse).sum()).backward()
        grads.append([x.grad for x in leaves])
    for name, a, b in zip(["dq", "dk", "dv"], *grads, strict=True):
        # The public lse is float32, so the gradient reaching it is rounded to float32 (relative
        # 6e-8) before the float64 backward: 1e-6 is ~10x that on O(1) values, while dropping
        # the dlse term entirely is an O(1) error.
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_lse_only_loss_has_gradient():
    # Only lse used: out's gradient is absent (None inside the backward), not an error.
    q, k, v, cu = make_inputs([9], 2, 2)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    _, lse = moba_attn_varlen(*leaves, cu, 9, moba_chunk_size=4, moba_topk=2, return_lse=True)
    lse.sum().backward()
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    naive_moba(*ref, cu.tolist(), 4, 2)[1].sum().backward()
    for a, b in zip(leaves, ref, strict=True):
        # lse does not depend on v: either side may leave v.grad None or give zeros.
        ga, gb = (x.grad if x.grad is not None else torch.zeros_like(x) for x in (a, b))
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-6)  # as above


@pytest.mark.parametrize("precision", [None, *GATE_PRECISIONS], ids=str)
def test_gate_precision_reaches_the_gate(precision, monkeypatch):
    # Both public ops hand gate_precision to the gate unchanged; leaving it out means float32.
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["precision"])
        return real(*args, **kwargs)

    real = ops.select_blocks
    monkeypatch.setattr(ops, "select_blocks", spy)
    q, k, v, cu = make_inputs([16, 16], 4, 2, dtype=torch.float32)
    kw = dict(moba_chunk_size=4, moba_topk=2, backend="reference")
    if precision is not None:
        kw["gate_precision"] = precision
    moba_attn_varlen(q, k, v, cu, 16, **kw)
    moba_attn_func(*(x.view(2, 16, *x.shape[1:]) for x in (q, k, v)), **kw)
    assert seen == [precision or "float32"] * 2


@pytest.mark.parametrize("precision", ["bf16x2", "bf16"])
def test_opt_in_precision_routes_exactly_on_cpu(precision):
    # The CPU gate is the exact torch gate whatever gate_precision says: the opt-ins give the
    # default's result bit for bit, and both match the float64 oracle (random inputs: no
    # near-ties at this size).
    q, k, v, cu = make_inputs([7, 33, 40], 4, 2, d=64, dtype=torch.float32, seed=4)
    kw = dict(moba_chunk_size=8, moba_topk=3, backend="reference")
    default = moba_attn_varlen(q, k, v, cu, 40, **kw)
    opted = moba_attn_varlen(q, k, v, cu, 40, gate_precision=precision, **kw)
    assert torch.equal(opted, default)
    want, _ = naive_moba(q.double(), k.double(), v.double(), cu.tolist(), 8, 3)
    torch.testing.assert_close(opted.double(), want, **TOL32)
