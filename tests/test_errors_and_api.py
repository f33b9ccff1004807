"""Bad inputs raise clear errors naming the argument; the public API is pinned."""

from __future__ import annotations

import pytest
import torch

import moba_dist
import moba_dist.parallel
from moba_dist import MoBAConfig, moba_attn_func, moba_attn_varlen


def good(t=12, hq=4, hkv=2, d=8):
    q = torch.randn(t, hq, d)
    k, v = torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    return q, k, v, torch.tensor([0, 5, t], dtype=torch.int32)


def call(q=None, k=None, v=None, cu=None, max_seqlen=7, **kw):
    gq, gk, gv, gcu = good()
    args = dict(moba_chunk_size=4, moba_topk=2, backend="reference") | kw
    return moba_attn_varlen(
        gq if q is None else q, gk if k is None else k, gv if v is None else v,
        gcu if cu is None else cu, max_seqlen, **args,
    )  # fmt: skip


BAD = {
    "q-rank": (dict(q=torch.randn(12, 4)), ValueError, r"q must be 3-D \[T, H, D\]"),
    "q-not-tensor": (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    "kv-shape": (dict(v=torch.randn(12, 2, 4)), ValueError, "k and v must have the same shape"),
    "T-mismatch": (dict(k=torch.randn(11, 2, 8), v=torch.randn(11, 2, 8)), ValueError, "agree"),
    "head-dim": (dict(k=torch.randn(12, 2, 4), v=torch.randn(12, 2, 4)), ValueError, "head_dim"),
    "gqa-ratio": (
        dict(k=torch.randn(12, 3, 8), v=torch.randn(12, 3, 8)),
        ValueError,
        "Hq=4, Hkv=3",
    ),
    "mixed-dtype": (dict(k=torch.randn(12, 2, 8).double()), TypeError, "share one dtype"),
    "int-dtype": (dict(q=torch.ones(12, 4, 8, dtype=torch.int64)), TypeError, "q must be float16"),
    "cu-dtype": (dict(cu=torch.tensor([0, 5, 12])), TypeError, "cu_seqlens must be int32"),
    "cu-2d": (dict(cu=torch.tensor([[0, 12]], dtype=torch.int32)), ValueError, "1-D"),
    "cu-start": (dict(cu=torch.tensor([1, 12], dtype=torch.int32)), ValueError, "start at 0"),
    "cu-order": (
        dict(cu=torch.tensor([0, 7, 6, 12], dtype=torch.int32)),
        ValueError,
        r"non-decreasing .*cu_seqlens\[1\] = 7 > cu_seqlens\[2\] = 6",
    ),
    "cu-end": (
        dict(cu=torch.tensor([0, 5, 11], dtype=torch.int32)),
        ValueError,
        "end at .* T = 12",
    ),
    "max-seqlen": (dict(max_seqlen=6), ValueError, r"max_seqlen must be >= the longest .*\(7\)"),
    "chunk-0": (dict(moba_chunk_size=0), ValueError, "moba_chunk_size must be >= 1, got 0"),
    "chunk-float": (dict(moba_chunk_size=4.0), TypeError, "moba_chunk_size must be an int"),
    "topk-0": (dict(moba_topk=0), ValueError, "moba_topk must be >= 1, got 0"),
    "scale-neg": (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    "backend": (dict(backend="cuda"), ValueError, "backend must be one of"),
    "gate-precision": (
        dict(gate_precision="tf32"),
        ValueError,
        r"gate_precision must be one of \('float32', 'bf16x2', 'bf16'\), got 'tf32'",
    ),
    "gate-precision-type": (dict(gate_precision=None), ValueError, "gate_precision must be one"),
    "varlen-on-cpu": (dict(backend="varlen"), ValueError, "backend='varlen' cannot run here"),
}


@pytest.mark.parametrize("kwargs,exc,match", BAD.values(), ids=BAD.keys())
def test_bad_input_raises_clear_error(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        call(**kwargs)


def test_mixed_devices_raise():
    q, _, _, cu = good()
    meta = torch.empty(12, 2, 8, device="meta")
    with pytest.raises(ValueError, match="one device"):
        moba_attn_varlen(q, meta, meta, cu, 7, moba_chunk_size=4, moba_topk=2)


def test_batched_form_checks_rank():
    q, k, v, _ = good()
    with pytest.raises(ValueError, match=r"q must be 4-D \[B, S, H, D\]"):
        moba_attn_func(q, k, v, moba_chunk_size=4, moba_topk=2)


def test_config_is_frozen_and_validated():
    cfg = MoBAConfig(moba_chunk_size=512, moba_topk=3)
    assert cfg.scale_for(64) == 64**-0.5 and cfg.backend == "auto"
    assert cfg.gate_precision == "float32"  # the exact gate unless opted out
    with pytest.raises(AttributeError):
        cfg.moba_topk = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="backend must be one of"):
        MoBAConfig(512, 3, backend="flash")
    with pytest.raises(ValueError, match=r"gate_precision must be one of .* got 'fp8'"):
        MoBAConfig(512, 3, gate_precision="fp8")
    assert MoBAConfig(512, 3, gate_precision="bf16").gate_precision == "bf16"


def test_public_api_is_pinned():
    assert sorted(moba_dist.__all__) == sorted(
        ["MoBAConfig", "MoBAContextParallel", "__version__", "moba_attn_func", "moba_attn_varlen"]
    )
    assert sorted(moba_dist.parallel.__all__) == sorted(
        ["LAYOUTS", "CPConfig", "CPContext", "CPPadding", "check_layout", "local_positions",
         "moba_cp_attn_varlen", "pad_for_cp", "shard", "unshard"]
    )  # fmt: skip
    for name in moba_dist.__all__:
        assert getattr(moba_dist, name) is not None


def test_kernel_configs_are_frozen_and_validated():
    from moba_dist.kernels import BwdConfig, FwdConfig, TileConfig

    with pytest.raises(ValueError, match="partial_dtype must be None, float16, bfloat16"):
        FwdConfig(partial_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"TileConfig\.block_m must be an int >= 1, got 0"):
        TileConfig(0, 64, 4, 2)
    with pytest.raises(ValueError, match=r"BwdConfig\.slab_elems must be an int >= 1"):
        BwdConfig(slab_elems=0)
    with pytest.raises(AttributeError):
        FwdConfig().chunk_elems = 1  # type: ignore[misc]
