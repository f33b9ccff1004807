"""Shared pieces of the context-parallel tests: awkward packed lengths, float64 inputs, the
single-device oracle, and a byte counter wrapped around one comm function."""

from __future__ import annotations

import torch

from moba_dist import moba_attn_varlen

__all__ = [
    "ByteCounter",
    "grads_plain_twice_then_checkpointed",
    "make_inputs",
    "reference",
    "seq_lens",
]


def seq_lens(world: int, layout: str) -> list[int]:
    """Awkward packed lengths that satisfy the layout: blocks and sequences cross ranks."""
    if layout == "zigzag":
        return [2 * world * 2, 2 * world * 5, 2 * world * 3]
    lens = [7, 10 * world + 3, 5]
    lens[-1] += (-sum(lens)) % world
    return lens


def make_inputs(lens, hq: int, hkv: int, d: int, seed: int = 0):
    """Global float64 ``q, k, v, dout`` ``[T, H, D]`` and int32 ``cu_seqlens`` of ``lens``."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v, dout = (
        torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq)
    )
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, dout, cu


def reference(q, k, v, dout, cu, block, topk):
    """The single-device op (reference backend): ``out, lse, dq, dk, dv``."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = moba_attn_varlen(
        *leaves, cu, int((cu[1:] - cu[:-1]).max()), moba_chunk_size=block, moba_topk=topk,
        return_lse=True, backend="reference",
    )  # fmt: skip
    out.backward(dout)
    return out.detach(), lse.detach(), *(x.grad for x in leaves)


class ByteCounter:
    """Wraps a comm function ``fn(send, send_counts, recv_counts, group, ...)``: payload bytes
    to and from other ranks, and calls. ``empty_row``: the row width assumed when this rank
    sends nothing (its received rows are as wide)."""

    def __init__(self, rank: int, fn, empty_row: int = 0) -> None:
        self.rank, self.fn, self.empty_row = rank, fn, empty_row
        self.reset()

    def reset(self) -> None:
        self.sent = self.received = self.calls = 0

    def __call__(self, send, send_counts, recv_counts, group, *args, **kw):
        row = send[0].numel() * send.element_size() if send.shape[0] else self.empty_row
        self.sent += row * (sum(send_counts) - send_counts[self.rank])
        self.received += row * (sum(recv_counts) - recv_counts[self.rank])
        self.calls += 1
        return self.fn(send, send_counts, recv_counts, group, *args, **kw)


def grads_plain_twice_then_checkpointed(mod, q, k, v, dout, cu, sh: dict) -> list[list]:
    """Local ``[dq, dk, dv]`` of ``mod`` on this rank's shards (``sh``: shard's keywords) for
    two plain forward+backward passes and one under non-reentrant activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    from moba_dist.parallel import shard

    grads = []
    for use_ckpt in (False, False, True):
        leaves = [shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v)]
        if use_ckpt:
            out = checkpoint(mod, *leaves, cu, use_reentrant=False)
        else:
            out = mod(*leaves, cu)
        out.backward(shard(dout, cu, **sh))
        grads.append([x.grad for x in leaves])
    return grads
