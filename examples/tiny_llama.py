"""A small Llama-style decoder (RoPE, GQA, RMSNorm, SwiGLU) whose attention is MoBAContextParallel.

The model code is single-device: it sees only this rank's tokens ``[T_local]`` and their
in-sequence positions; parallelism enters through the attention modules' process group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moba_dist import MoBAContextParallel
from moba_dist.parallel.comm import group_size


@dataclass(frozen=True)
class ModelConfig:
    vocab: int
    dim: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    block: int = 64
    topk: int = 3
    full_layers: int = 1
    """The last ``full_layers`` layers use full causal attention (MoBA with topk >= blocks)."""
    max_seq_len: int = 1024
    layout: str = "zigzag"
    strategy: str = "auto"
    backend: str = "auto"
    dense_full: bool = False
    """Layers at full attention run dense causal attention (F.scaled_dot_product_attention) instead
    of MoBA with every block selected: the same function, a faster kernel. One CP rank only (the
    dense path reads no other rank's keys), equal-length sequences."""


def rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of ``x [T, H, D]`` at in-sequence positions ``pos [T]``."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.float()[:, None] * freqs[None, :]  # [T, D/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def dense_causal(q, k, v, cu_seqlens) -> torch.Tensor:
    """Causal attention of packed sequences ``q [T, H, D]``, ``k, v [T, Hkv, D]`` that all have
    the same length (train_cp.py's windows; not checked, which would sync the host each layer)."""
    b = cu_seqlens.numel() - 1
    if b < 1 or q.shape[0] % b:
        raise ValueError(f"dense_causal needs equal-length sequences: {q.shape[0]} tokens do not "
                         f"split into {b} sequences")  # fmt: skip
    s = q.shape[0] // b
    # Query head h reads K/V head h // (H / Hkv), as MoBA's kernels do.

    def heads(x: torch.Tensor) -> torch.Tensor:  # [T, h, D] -> [B, S, H, D]
        return x.repeat_interleave(q.shape[1] // x.shape[1], dim=1).view(b, s, *q.shape[1:])

    # Expanded K/V rather than enable_gqa: every SDPA backend (flash on the GPU) takes it.
    out = F.scaled_dot_product_attention(*(heads(x).transpose(1, 2) for x in (q, k, v)),
                                         is_causal=True)  # fmt: skip
    return out.transpose(1, 2).reshape(q.shape)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, full: bool, group) -> None:
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.kv_heads
        self.head_dim = cfg.dim // cfg.heads
        self.wq = nn.Linear(cfg.dim, cfg.heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * self.head_dim, cfg.dim, bias=False)
        self.full = full
        self.moba_topk = cfg.topk
        # topk >= blocks is exact causal attention: the hybrid's full layers use the same module.
        self.full_topk = cfg.max_seq_len // cfg.block + 1
        self.attn = MoBAContextParallel(
            cfg.block, cfg.topk, process_group=group, layout=cfg.layout, strategy=cfg.strategy,
            backend=cfg.backend,
        )  # fmt: skip
        self.capture: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if cfg.dense_full and group is not None and group_size(group) > 1:
            raise ValueError(f"dense_full needs a CP group of one rank, got {group_size(group)}")
        self.dense_full = cfg.dense_full

    def set_full(self, full: bool) -> None:
        """Switch a MoBA layer to full attention (the paper's final-phase recipe)."""
        topk = self.full_topk if (full or self.full) else self.moba_topk
        self.attn.config = dataclasses.replace(self.attn.config, moba_topk=topk)

    def set_local(self) -> None:
        """Own block only (topk 1): the short-context warmup every variant shares."""
        self.attn.config = dataclasses.replace(self.attn.config, moba_topk=1)

    def forward(self, x, pos, cu_seqlens):
        t = x.shape[0]
        q = self.wq(x).view(t, self.heads, self.head_dim)
        k, v = self.wkv(x).view(t, 2, self.kv_heads, self.head_dim).unbind(1)
        q, k = rope(q, pos), rope(k, pos)
        if self.capture is not None:
            self.capture.append((q.detach(), k.detach()))
        if self.dense_full and self.attn.config.moba_topk >= self.full_topk:
            out = dense_causal(q, k, v, cu_seqlens)
        else:
            out = self.attn(q, k, v, cu_seqlens)
        return self.wo(out.reshape(t, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, full: bool, group) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.attn = Attention(cfg, full, group)
        hidden = 4 * cfg.dim
        self.w_gate_up = nn.Linear(cfg.dim, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x, pos, cu_seqlens):
        x = x + self.attn(self.norm1(x), pos, cu_seqlens)
        gate, up = self.w_gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.w_down(F.silu(gate) * up)


class TinyLlama(nn.Module):
    """``forward(tokens [T_local], pos [T_local], cu_seqlens) -> logits [T_local, vocab]``."""

    def __init__(self, cfg: ModelConfig, cp_group=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        first_full = cfg.layers - cfg.full_layers
        self.blocks = nn.ModuleList(
            Block(cfg, full=i >= first_full, group=cp_group) for i in range(cfg.layers)
        )
        for b in self.blocks:
            b.attn.set_full(False)
        self.norm = nn.RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def attention_layers(self) -> list[Attention]:
        return [b.attn for b in self.blocks]

    def set_full_attention(self, full: bool) -> None:
        for a in self.attention_layers():
            a.set_full(full)

    def set_local_attention(self) -> None:
        for a in self.attention_layers():
            a.set_local()

    def forward(self, tokens, pos, cu_seqlens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x, pos, cu_seqlens)
        return self.head(self.norm(x))
