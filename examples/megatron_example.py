"""One Megatron-Core ``SelfAttention`` layer whose core attention is MoBA, on a sequence split
over the ranks of a context-parallel (CP) group (docs/megatron.md's worked example).

    python examples/megatron_example.py                           # one process (CP size 1)
    torchrun --nproc-per-node 2 examples/megatron_example.py      # CP size 2 (gloo on CPU)

Runs on a CPU (gloo, float64); on GPUs pass ``--nccl``. It checks its own result: the core
attention's output on this rank equals the single-device ``moba_attn_func`` on the whole,
unsharded q/k/v (gathered from every rank), and prints ``max |diff|``. Without megatron-core it
says so and exits 0 (``pip install "moba-dist[megatron]"``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys

import torch
import torch.distributed as dist

from moba_dist import moba_attn_func
from moba_dist.integrations.megatron import MoBACoreAttention

HIDDEN, HEADS, GROUPS = 256, 8, 2  # head_dim 32, GQA: 4 query heads per KV head
BLOCK, TOPK = 64, 3


def megatron_installed() -> bool:
    # find_spec of the submodule imports its parent: check the parent first.
    return (
        importlib.util.find_spec("megatron") is not None
        and importlib.util.find_spec("megatron.core") is not None
    )


def init_distributed(backend: str) -> tuple[int, int]:
    """torchrun's environment, or a one-process world when started with plain ``python``."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def zigzag_rows(seqlen: int, rank: int, cp: int) -> torch.Tensor:
    """Positions of one sequence held by ``rank``: chunks r and 2P-1-r of 2P (Megatron's
    ``get_batch_on_this_cp_rank``)."""
    chunks = torch.arange(seqlen).chunk(2 * cp)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])


def build_layer(rank: int, cp: int, dtype: torch.dtype):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp_groups = [dist.new_group([r]) for r in range(cp)]  # TP = 1; new_group is collective
    pgs = ProcessGroupCollection(tp=tp_groups[rank], cp=dist.group.WORLD)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        context_parallel_size=cp,
        attention_dropout=0.0,  # MoBA has no attention dropout (Megatron's default is 0.1)
        use_cpu_initialization=True,
        params_dtype=dtype,
    )
    moba = ModuleSpec(module=MoBACoreAttention, params=dict(moba_chunk_size=BLOCK, moba_topk=TOPK))
    torch.manual_seed(0)  # the same weights on every rank
    subs = SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear, core_attention=moba, linear_proj=RowParallelLinear
    )
    return SelfAttention(
        config, subs, layer_number=1, attn_mask_type=AttnMaskType.causal, pg_collection=pgs
    )


def gather_sequence(local: torch.Tensor, rows: list[torch.Tensor], seqlen: int) -> torch.Tensor:
    """Every rank's ``[s, b, h, d]`` shard -> the whole ``[S, b, h, d]``."""
    parts = [torch.empty_like(local) for _ in rows]
    dist.all_gather(parts, local.contiguous())
    full = local.new_empty(seqlen, *local.shape[1:])
    for r, part in zip(rows, parts, strict=True):
        full[r] = part
    return full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nccl", action="store_true", help="NCCL and CUDA instead of gloo")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="sequences")
    args = parser.parse_args()
    if not megatron_installed():
        print("megatron-core is not installed; skipping (pip install 'moba-dist[megatron]')")
        return
    rank, cp = init_distributed("nccl" if args.nccl else "gloo")
    if args.seq_len % (2 * cp):
        sys.exit(f"--seq-len must be a multiple of 2 * CP size = {2 * cp}, got {args.seq_len}")
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.nccl else None
    if device is not None:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if args.nccl else torch.float64
    attn = build_layer(rank, cp, dtype).to(device)

    seen = {}  # what Megatron hands the core attention, and what it returns
    attn.core_attention.register_forward_hook(
        lambda _m, inputs, out: seen.update(qkv=inputs[:3], out=out)
    )
    S, b = args.seq_len, args.batch
    gen = torch.Generator().manual_seed(1)  # the same input on every rank
    x = torch.randn(S, b, HIDDEN, dtype=dtype, generator=gen).to(device)
    rows = [zigzag_rows(S, r, cp) for r in range(cp)]
    x_local = x[rows[rank].to(x.device)].requires_grad_()  # [S / P, b, hidden]

    out, _bias = attn(x_local, attention_mask=None)
    out.sum().backward()

    # Check: the CP core attention equals the single-device op on the unsharded q, k, v.
    q, k, v = (gather_sequence(t.detach(), rows, S) for t in seen["qkv"])
    want = moba_attn_func(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # [S, b, h, d] -> [b, S, h, d]
        moba_chunk_size=BLOCK, moba_topk=TOPK,
    ).transpose(0, 1)[rows[rank].to(x.device)]  # fmt: skip
    diff = (seen["out"].detach() - want.flatten(2)).abs().max().item()
    strategy = attn.core_attention.last_stats.get("strategy", "none (CP size 1: single-device op)")
    print(
        f"rank {rank}/{cp}: out {tuple(out.shape)}, x grad {tuple(x_local.grad.shape)}, "
        f"CP strategy {strategy}, max |diff| vs single-device moba_attn_func {diff:.2e}"
    )
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-10
    if not diff <= tol:
        sys.exit(f"rank {rank}: CP output differs from the single-device op by {diff} > {tol}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
