"""The Megatron-Core adapter on gloo against the single-process op on the unsharded input.

Uses megatron-core's own ``TransformerConfig``, ``AttnMaskType``, ``PackedSeqParams``,
``ProcessGroupCollection`` and ``SelfAttention`` when the package imports (it does on CPU with
``pip install --no-deps megatron-core``), else stand-ins of the same shapes
(``MOBA_TEST_MEGATRON=standin`` forces them). The CP shards are cut here the way Megatron cuts
them (``get_batch_on_this_cp_rank`` for ``[s, b]``, TransformerEngine's partitioned indices for
``thd``), independently of ``moba_dist.parallel.shard``. One spawned world per test runs many
cases; importing megatron costs ~5 s of CPU per process, so the world-3 and error runs use the
stand-ins (the world-1 run checks the errors with megatron's objects too).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import itertools
import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_world

from moba_dist import moba_attn_varlen
from moba_dist.integrations.megatron import MoBACoreAttention

pytestmark = pytest.mark.dist

TOL = dict(atol=1e-9, rtol=1e-9)  # float64 end to end, as in test_cp.py
HQ, HKV, D = 4, 2, 8
CASES = ((4, 2), (3, 3), (5, 1), (64, 4))  # (block, topk); the last one is dense causal
USE_REAL = (
    os.environ.get("MOBA_TEST_MEGATRON") != "standin"
    and importlib.util.find_spec("megatron") is not None
    and importlib.util.find_spec("megatron.core") is not None
)


# ---- stand-ins with megatron-core 0.16's names and fields -------------------------------------
class StandInAttnMaskType(enum.Enum):
    padding = 1
    causal = 2
    no_mask = 3
    padding_causal = 4
    arbitrary = 5
    causal_bottom_right = 6


@dataclasses.dataclass
class StandInConfig:
    context_parallel_size: int = 1
    attention_dropout: float = 0.1  # megatron's default
    softmax_scale: float | None = None
    window_size: Any = None
    softmax_type: str = "vanilla"


@dataclasses.dataclass
class StandInPackedSeqParams:
    qkv_format: str | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_kv: torch.Tensor | None = None
    cu_seqlens_q_padded: torch.Tensor | None = None
    cu_seqlens_kv_padded: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_kv: int | None = None


class StandInProcessGroupCollection:
    def __init__(self, **groups: Any) -> None:
        self.__dict__.update(groups)


def mcore(real: bool) -> SimpleNamespace:
    """Megatron's classes (imported lazily: seconds) or the stand-ins."""
    if not real:
        return SimpleNamespace(
            config=lambda **kw: StandInConfig(**kw), AttnMaskType=StandInAttnMaskType,
            PackedSeqParams=StandInPackedSeqParams, pgs=StandInProcessGroupCollection,
        )  # fmt: skip
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    def config(**kw: Any) -> Any:
        base = dict(num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ,
                    num_query_groups=HKV, use_cpu_initialization=True,
                    params_dtype=torch.float64)  # fmt: skip
        return TransformerConfig(**{**base, **kw})

    return SimpleNamespace(
        config=config, AttnMaskType=AttnMaskType, PackedSeqParams=PackedSeqParams,
        pgs=ProcessGroupCollection,
    )  # fmt: skip


def build(m: SimpleNamespace, world: int, group: Any, **moba: Any) -> MoBACoreAttention:
    """Construct with exactly the keywords Megatron's ``CoreAttentionBuilder`` passes."""
    cfg = m.config(context_parallel_size=world, attention_dropout=0.0)
    return MoBACoreAttention(
        config=cfg, layer_number=1, attn_mask_type=m.AttnMaskType.causal, attention_type="self",
        cp_comm_type="p2p", softmax_scale=None, pg_collection=m.pgs(cp=group), **moba,
    )  # fmt: skip


# ---- Megatron's CP sharding, written out independently -----------------------------------------
def megatron_split_sbhd(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """``[S, b, ...] -> [S / P, b, ...]``: chunks ``rank`` and ``2P-1-rank`` of every sequence
    (what ``get_batch_on_this_cp_rank`` does on ``[b, S]`` before the model transposes)."""
    xb = x.transpose(0, 1)
    b, n = xb.shape[:2]
    xb = xb.reshape(b, 2 * world, n // (2 * world), *xb.shape[2:])
    xb = xb.index_select(1, torch.tensor([rank, 2 * world - 1 - rank]))
    return xb.reshape(b, n // world, *xb.shape[3:]).transpose(0, 1)


def thd_index(cu: list[int], rank: int, world: int) -> torch.Tensor:
    """Global token indices of ``rank`` for packed sequences at offsets ``cu`` (TE's thd rule)."""
    idx: list[int] = []
    for start, end in itertools.pairwise(cu):
        c = (end - start) // (2 * world)
        for chunk in (rank, 2 * world - 1 - rank):
            idx.extend(range(start + chunk * c, start + (chunk + 1) * c))
    return torch.tensor(idx)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_packed(q, k, v, dout, cu, block, topk):
    """Single-process op on packed ``[T, H, D]``: ``out [T, Hq*D]`` and ``dq, dk, dv``."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = moba_attn_varlen(
        *leaves, cu, int((cu[1:] - cu[:-1]).max()), moba_chunk_size=block, moba_topk=topk,
        backend="reference",
    )  # fmt: skip
    out.reshape(out.shape[0], -1).backward(dout)
    return [out.detach().reshape(out.shape[0], -1), *(x.grad for x in leaves)]


def assert_all_close(got, want, what: str) -> None:
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, n=name: f"{what} {n}: {m}")


# ---- [s, b, h, d] ------------------------------------------------------------------------------
def check_sbhd(m, rank, world, group, block, topk, seed=0) -> MoBACoreAttention:
    n, b = 2 * world * 5, 3  # S tokens per sequence: blocks and chunks cross rank boundaries
    q, k, v = (randn(n, b, h, D, seed=seed + i) for i, h in enumerate((HQ, HKV, HKV)))
    dout = randn(n, b, HQ * D, seed=seed + 3)
    cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32)
    packed = [x.transpose(0, 1).reshape(b * n, *x.shape[2:]) for x in (q, k, v, dout)]
    want = reference_packed(*packed, cu, block, topk)  # [b*S, ...] sequence-major
    want = [w.reshape(b, n, *w.shape[1:]).transpose(0, 1) for w in want]  # -> [S, b, ...]
    want = [megatron_split_sbhd(w, rank, world) for w in want]
    attn = build(m, world, group, moba_chunk_size=block, moba_topk=topk, backend="reference")
    lq, lk, lv = (megatron_split_sbhd(x, rank, world).requires_grad_() for x in (q, k, v))
    out = attn(lq, lk, lv, None)
    assert out.shape == (n // world, b, HQ * D)
    out.backward(megatron_split_sbhd(dout, rank, world))
    assert_all_close([out, lq.grad, lk.grad, lv.grad], want, f"sbhd B={block} K={topk}")
    return attn


# ---- packed [t, h, d] --------------------------------------------------------------------------
def check_packed(m, rank, world, group, block, topk, real_lens, seed=0) -> None:
    """Padded sequences: outputs at padding are zero and send no gradient."""
    mult = 2 * world
    padded_lens = [(n + mult - 1) // mult * mult for n in real_lens]
    cu_real = [0, *torch.tensor(real_lens).cumsum(0).tolist()]
    cu_pad = [0, *torch.tensor(padded_lens).cumsum(0).tolist()]
    t = cu_pad[-1]
    q, k, v = (randn(t, h, D, seed=seed + i) for i, h in enumerate((HQ, HKV, HKV)))
    is_real = torch.zeros(t, dtype=torch.float64)
    for s, n in zip(cu_pad[:-1], real_lens, strict=True):
        is_real[s : s + n] = 1
    dout = randn(t, HQ * D, seed=seed + 3)
    cu_pad_t = torch.tensor(cu_pad, dtype=torch.int32)
    want = reference_packed(q, k, v, dout * is_real[:, None], cu_pad_t, block, topk)
    want[0] = want[0] * is_real[:, None]
    idx = thd_index(cu_pad, rank, world)
    params = m.PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=torch.tensor(cu_real, dtype=torch.int32),
        cu_seqlens_kv=torch.tensor(cu_real, dtype=torch.int32),
        cu_seqlens_q_padded=cu_pad_t, cu_seqlens_kv_padded=cu_pad_t.clone(),
        max_seqlen_q=max(padded_lens), max_seqlen_kv=max(padded_lens),
    )  # fmt: skip
    if cu_real == cu_pad:  # Megatron leaves the padded offsets unset when nothing is padded
        params.cu_seqlens_q_padded = params.cu_seqlens_kv_padded = None
    attn = build(m, world, group, moba_chunk_size=block, moba_topk=topk, backend="reference")
    lq, lk, lv = (x[idx].requires_grad_() for x in (q, k, v))
    out = attn(lq, lk, lv, None, attn_mask_type=m.AttnMaskType.padding_causal,
               packed_seq_params=params)  # fmt: skip
    assert out.shape == (t // world, HQ * D)
    out.backward(dout[idx])
    got = [out, lq.grad, lk.grad, lv.grad]
    assert_all_close(got, [w[idx] for w in want], f"thd {real_lens} B={block} K={topk}")


# ---- a whole Megatron SelfAttention layer (real megatron-core only) ----------------------------
def check_self_attention(rank, world, group) -> None:
    """Megatron's SelfAttention with MoBA core attention: the CP layer on the zigzag shard equals
    the layer without CP on the whole sequence; weight gradients summed over CP ranks agree."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    m = mcore(True)
    tp = [dist.new_group([r]) for r in range(world)][rank]  # new_group is collective: all ranks
    spec = ModuleSpec(module=MoBACoreAttention, params=dict(moba_chunk_size=3, moba_topk=2))
    torch.manual_seed(0)  # the same initial weights on every rank
    layers = []
    for cp in (1, world):
        cfg = m.config(context_parallel_size=cp, attention_dropout=0.0)
        subs = SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=spec, linear_proj=RowParallelLinear
        )
        pgs = m.pgs(tp=tp, cp=group if cp > 1 else None)
        mask = m.AttnMaskType.causal
        layers.append(SelfAttention(cfg, subs, 1, attn_mask_type=mask, pg_collection=pgs))
    full, part = layers
    part.load_state_dict(full.state_dict())
    x, dy = randn(8 * world, 2, HQ * D, seed=7), randn(8 * world, 2, HQ * D, seed=8)
    want, _ = full(x, None)
    want.backward(dy)
    xl = megatron_split_sbhd(x, rank, world).requires_grad_()
    got, _ = part(xl, None)
    got.backward(megatron_split_sbhd(dy, rank, world))
    torch.testing.assert_close(got, megatron_split_sbhd(want.detach(), rank, world), **TOL)
    checked = 0
    for (name, p_full), p_part in zip(full.named_parameters(), part.parameters(), strict=True):
        if p_full.grad is None:  # linear_proj's bias is returned, not added (skip_bias_add)
            assert p_part.grad is None, name
            continue
        grad = p_part.grad.clone()
        if world > 1:
            dist.all_reduce(grad, group=group)  # Megatron all-reduces over dp x cp
        torch.testing.assert_close(grad, p_full.grad, **TOL, msg=lambda m_, n=name: f"{n}: {m_}")
        checked += 1
    assert checked == 3, "expected gradients for linear_qkv.weight, .bias, linear_proj.weight"


def _match_worker(rank, world, real):
    m, group = mcore(real), dist.new_group(list(range(world)))
    for block, topk in CASES:
        attn = check_sbhd(m, rank, world, group, block, topk)
        check_packed(m, rank, world, group, block, topk, [3 * world + 1, 4 * world, 2])
    check_packed(m, rank, world, group, 4, 2, [2 * world * 3, 2 * world])  # no padding
    # CP size 1 runs the single-process op (fastest backend, no handshake): no CP statistics.
    assert attn.last_stats.get("world_size") == (world if world > 1 else None)
    if real:
        check_self_attention(rank, world, group)
    if world == 1:
        _local_errors(m)  # with megatron's own objects where available (the errors test: stand-ins)


@pytest.mark.parametrize("world", [1, 2], ids=lambda w: f"world{w}")
def test_megatron_adapter_matches_single_process(world):
    run_world(world, _match_worker, USE_REAL)


def test_megatron_adapter_world3_with_stand_ins():
    # Three processes importing megatron cost ~30 s on a 2-core machine; the stand-ins keep P = 3.
    run_world(3, _match_worker, False)


# ---- errors ------------------------------------------------------------------------------------
def _local_errors(m) -> None:
    """Errors raised before any collective (the same on every rank)."""
    mt = m.AttnMaskType
    q, kv = randn(8, 1, HQ, D, seed=0), randn(8, 1, HKV, D, seed=1)
    ok = dict(moba_chunk_size=4, moba_topk=2)
    with pytest.raises(ValueError, match="attn_mask_type must be a causal AttnMaskType"):
        MoBACoreAttention(m.config(attention_dropout=0.0), 1, mt.padding, "self", **ok)
    with pytest.raises(ValueError, match="attention_type must be 'self'"):
        MoBACoreAttention(m.config(attention_dropout=0.0), 1, mt.causal, "cross", **ok)
    with pytest.raises(ValueError, match="moba_topk must be given"):
        MoBACoreAttention(m.config(), 1, mt.causal, "self", moba_chunk_size=4)
    with pytest.raises(ValueError, match="context_parallel_size = 2 needs a CP process group"):
        MoBACoreAttention(m.config(context_parallel_size=2), 1, mt.causal, "self", **ok)
    with pytest.raises(ValueError, match=r"config\.window_size must be None"):
        MoBACoreAttention(m.config(window_size=(4, 0)), 1, mt.causal, "self", **ok)
    cfg = m.config()  # attention_dropout = 0.1, megatron's default
    cfg.moba_chunk_size, cfg.moba_topk = 4, 2  # MoBA settings as config attributes
    attn = MoBACoreAttention(cfg, 1, mt.causal, "self")
    with pytest.raises(ValueError, match=r"attention dropout is not supported.*0\.1"):
        attn(q, kv, kv, None)
    attn.eval()  # dropout is inactive in eval: allowed
    want = moba_attn_varlen(q[:, 0], kv[:, 0], kv[:, 0], torch.tensor([0, 8], dtype=torch.int32),
                            8, moba_chunk_size=4, moba_topk=2)  # fmt: skip
    torch.testing.assert_close(attn(q, kv, kv, None), want.reshape(8, 1, -1), **TOL)
    with pytest.raises(ValueError, match=r"attn_mask_type must be a causal.*no_mask"):
        attn(q, kv, kv, None, attn_mask_type=mt.no_mask)
    with pytest.raises(ValueError, match="attention_bias must be None"):
        attn(q, kv, kv, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match=r"query must be 4-D \[s, b, h, d\]"):
        attn(q[:, 0], kv[:, 0], kv[:, 0], None)
    with pytest.raises(ValueError, match=r"key must be \[s, b, Hkv, d\]"):
        attn(q, kv[:4], kv, None)
    _packed_errors(m, attn, q[:, 0], kv[:, 0])


def _packed_errors(m, attn, q, kv) -> None:
    cu, other = (torch.tensor(c, dtype=torch.int32) for c in ([0, 3, 8], [0, 4, 8]))
    bad = [
        (m.PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu), "qkv_format must be 'thd'"),
        (m.PackedSeqParams(qkv_format="thd"), "cu_seqlens_q must be set"),
        (m.PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.long()), "must be int32"),
        (m.PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=other),
         "cu_seqlens_kv must equal its _q twin"),
        (m.PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu,
                           cu_seqlens_q_padded=torch.tensor([0, 2, 8], dtype=torch.int32)),
         "each at least as long"),
    ]  # fmt: skip
    for params, msg in bad:
        with pytest.raises((ValueError, TypeError), match=msg):
            attn(q, kv, kv, None, packed_seq_params=params)
    with pytest.raises(ValueError, match=r"query must be 3-D \[t, h, d\]"):
        attn(q[:, None], kv, kv, None, packed_seq_params=m.PackedSeqParams(cu_seqlens_q=cu))


def _errors_worker(rank, world, real):
    m, group = mcore(real), dist.new_group(list(range(world)))
    _local_errors(m)
    ok = dict(moba_chunk_size=4, moba_topk=2)
    with pytest.raises(ValueError, match=r"CP group has 2 ranks but config\.context_parallel_size"):
        MoBACoreAttention(m.config(context_parallel_size=3), 1, m.AttnMaskType.causal, "self",
                          pg_collection=m.pgs(cp=group), **ok)  # fmt: skip
    attn = build(m, world, group, **ok)
    q, kv = randn(5, 2, HQ, D, seed=0), randn(5, 2, HKV, D, seed=1)
    with pytest.raises(ValueError, match="local sequence length s must be even, got s = 5"):
        attn(q, kv, kv, None)
    attn = build(m, world, group, layout="contiguous", **ok)
    with pytest.raises(ValueError, match="layout='contiguous' shards the packed batch"):
        attn(q[:4], kv[:4], kv[:4], None)
    # explicit cp_group wins over pg_collection; a mismatching rank raises everywhere (handshake)
    topk = 2 if rank == 0 else 3
    attn = build(m, world, None, cp_group=group, moba_chunk_size=4, moba_topk=topk)
    with pytest.raises(ValueError, match="moba_topk"):
        attn(q[:4], kv[:4], kv[:4], None)


def test_megatron_adapter_errors():
    run_world(2, _errors_worker, False)
