"""Context-parallel MoBA demo: one forward+backward over a sequence split across all ranks.

    torchrun --nproc-per-node 2 examples/demo_cp.py            # CPU: gloo, float64
    torchrun --nproc-per-node 8 examples/demo_cp.py --tokens 131072 --heads 32 --kv-heads 8

Uses NCCL and bfloat16 when every rank has a GPU, else gloo on the CPU. Every rank checks its
shard of the output and gradients against the single-device op on the gathered input and prints
the communication statistics. examples/train_cp.py is the full training example.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

from moba_dist import MoBAContextParallel, moba_attn_varlen
from moba_dist.parallel import shard


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="global tokens (one sequence)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=256, help="moba_chunk_size")
    p.add_argument("--topk", type=int, default=3, help="moba_topk")
    p.add_argument("--layout", choices=("contiguous", "zigzag"), default="zigzag")
    p.add_argument("--strategy", choices=("auto", "selective", "allgather"), default="auto")
    p.add_argument("--backend", choices=("auto", "reference", "triton"), default="auto")
    return p.parse_args()


def setup() -> tuple[int, int, torch.device, torch.dtype]:
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    return (
        dist.get_rank(),
        dist.get_world_size(),
        device,
        torch.bfloat16 if use_cuda else torch.float64,
    )


def main() -> None:
    args = parse_args()
    rank, world, device, dtype = setup()
    g = torch.Generator().manual_seed(0)  # same global input on every rank
    shapes = [(args.tokens, h, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
    q, k, v = (torch.randn(s, generator=g).to(device, dtype) for s in shapes)
    dout = torch.randn(shapes[0], generator=g).to(device, dtype)
    cu = torch.tensor([0, args.tokens], dtype=torch.int32, device=device)
    sh = dict(rank=rank, world_size=world, layout=args.layout)
    local = [shard(x, cu, **sh).clone().requires_grad_() for x in (q, k, v)]
    attn = MoBAContextParallel(
        args.block, args.topk, layout=args.layout, strategy=args.strategy, backend=args.backend
    )

    start = time.perf_counter()
    out = attn(*local, cu)
    out.backward(shard(dout, cu, **sh))
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = moba_attn_varlen(
        *full, cu, args.tokens, moba_chunk_size=args.block, moba_topk=args.topk, backend="reference"
    )
    ref.backward(dout)
    errs = [
        (shard(b.float(), cu, **sh) - a.float()).norm().item()
        / shard(b.float(), cu, **sh).norm().item()
        for a, b in zip(
            [out, *(x.grad for x in local)], [ref, *(x.grad for x in full)], strict=True
        )
    ]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-9  # bf16 rounding vs float64 exactness
    ok = all(e < tol for e in errs)
    s = attn.last_stats
    print(
        f"rank {rank}/{world} {device.type} {str(dtype)[6:]} T={args.tokens} B={args.block} "
        f"K={args.topk} {args.layout}/{s['strategy']}: fwd+bwd {elapsed * 1e3:.1f} ms, "
        f"sent {s['bytes_sent'] / 1e6:.2f} MB, received {s['bytes_received'] / 1e6:.2f} MB, "
        f"union {s['union_fraction']:.3f}, density {s['density']:.3f}, "
        f"rel err out/dq/dk/dv {' '.join(f'{e:.1e}' for e in errs)} -> {'OK' if ok else 'FAIL'}",
        flush=True,
    )
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
