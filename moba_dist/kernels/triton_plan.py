"""Triton kernels of the entry plan's elementwise passes (``triton_moba.plan_entries``).

The plan sorts the ``E = Tq * Hq * K`` entries of ``sel [Tq, Hq, K]`` by group
``g = block * Hkv + kv_head``. Around the sort there are two elementwise passes over ``[E]``:
the sort key of every entry (in the narrowest dtype that holds the G + 1 group ids) and the
composite ``comp = group * E + e`` the kernels read. In PyTorch each is a chain of ~6 kernels
over int64 arrays; at 6M entries that chain took about as long as the sort, and the plan is part
of the gate's time (issue 12). One kernel per pass reads and writes each array once.

``entry_keys_reference`` / ``compose_reference`` are the PyTorch twins (the test oracle).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["compose", "compose_reference", "entry_keys", "entry_keys_reference"]

_BLOCK = 1024


@triton.jit
def _entry_key_kernel(SEL, KEY, n_ent, TOPK, HQ, GROUP, HKV, SENTINEL, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < n_ent
    blk = tl.load(SEL + e, mask=live, other=-1).to(tl.int64)
    kvh = (e // TOPK) % HQ // GROUP
    key = tl.where(blk < 0, SENTINEL, blk * HKV + kvh)
    tl.store(KEY + e, key.to(KEY.dtype.element_ty), mask=live)


@triton.jit
def _compose_kernel(SKEY, ORDER, n_ent, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < n_ent
    g = tl.load(SKEY + e, mask=live, other=0).to(tl.int64)
    order = tl.load(ORDER + e, mask=live, other=0)
    tl.store(ORDER + e, g * n_ent + order, mask=live)


def entry_keys_reference(
    sel: torch.Tensor, hkv: int, groups: int, dtype: torch.dtype
) -> torch.Tensor:
    """PyTorch twin of :func:`entry_keys`."""
    tq, hq, topk = sel.shape
    key = torch.arange(tq * hq * topk, device=sel.device)
    key = key // topk % hq // (hq // hkv)  # KV head of every entry
    flat = sel.reshape(-1).to(torch.int64)
    key = torch.where(flat < 0, groups, flat * hkv + key)
    return key.to(dtype)


def compose_reference(skey: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of :func:`compose` (a new tensor)."""
    return skey.to(torch.int64) * order.numel() + order


def entry_keys(sel: torch.Tensor, hkv: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Sort key ``[E]`` (``dtype``) of every entry of ``sel [Tq, Hq, K]`` (int32, contiguous):
    ``block * Hkv + kv_head``, or ``groups`` (the sentinel, sorted last) for a negative slot."""
    tq, hq, topk = sel.shape
    n_ent = tq * hq * topk
    key = torch.empty(n_ent, dtype=dtype, device=sel.device)
    if n_ent:
        _entry_key_kernel[(triton.cdiv(n_ent, _BLOCK),)](
            sel.contiguous(), key, n_ent, topk, hq, hq // hkv, hkv, groups, BLOCK=_BLOCK
        )
    return key


def compose(skey: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``comp = skey * E + order`` (int64), written over ``order`` (int64, from the sort)."""
    n_ent = order.numel()
    if n_ent:
        _compose_kernel[(triton.cdiv(n_ent, _BLOCK),)](skey, order, n_ent, BLOCK=_BLOCK)
    return order
