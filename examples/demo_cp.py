"""Context-parallel MoBA demo: one forward+backward over a sequence split across all ranks.

    torchrun --nproc-per-node 2 examples/demo_cp.py            # any machine: see below
    torchrun --nproc-per-node 3 examples/demo_cp.py            # 4096 tokens padded to 4098
    torchrun --nproc-per-node 8 examples/demo_cp.py --tokens 131072 --heads 32 --kv-heads 8

Where the ranks run is examples/devices.py's decision, shared with train_cp.py and the SLURM
job: NCCL and bfloat16 with one GPU per rank when there are enough GPUs, else gloo and float32
on the CPU (``--device cpu|cuda`` forces it); rank 0 prints the choice first. A token count the
layout cannot split over the ranks is padded at the sequence's end (``pad_for_cp``), which
changes no real token's result. Every rank checks its real tokens' output and gradients against
the single-device op on the gathered input and prints the communication statistics.
examples/train_cp.py is the full training example.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch
import torch.distributed as dist
from devices import DEVICES, select_devices

from moba_dist import MoBAContextParallel, moba_attn_varlen
from moba_dist.parallel import pad_for_cp, shard


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
    p.add_argument("--device", choices=DEVICES, default="auto", help="examples/devices.py")
    return p.parse_args()


def setup(device: str) -> tuple[int, int, torch.device, torch.dtype]:
    """The shared device decision, then the process group; rank 0 prints the choice."""
    plan, index = select_devices(device, prog="demo_cp")
    dist.init_process_group(plan.backend, timeout=datetime.timedelta(seconds=120))
    dev = torch.device("cpu") if index is None else torch.device("cuda", index)
    return dist.get_rank(), dist.get_world_size(), dev, getattr(torch, plan.dtype)


def rel_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    return [
        ((a.float() - b.float()).norm() / b.float().norm()).item()
        for a, b in zip(got, want, strict=True)
    ]


def main() -> None:
    args = parse_args()
    rank, world, device, dtype = setup(args.device)
    g = torch.Generator().manual_seed(0)  # same global input on every rank
    shapes = [(args.tokens, h, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
    q, k, v = (torch.randn(s, generator=g).to(device, dtype) for s in shapes)
    dout = torch.randn(shapes[0], generator=g).to(device, dtype)
    cu = torch.tensor([0, args.tokens], dtype=torch.int32, device=device)
    # Tail padding: zero dout at the padded queries, so no gradient comes from them.
    pad = pad_for_cp(cu, world_size=world, layout=args.layout)
    sh = dict(rank=rank, world_size=world, layout=args.layout)
    real = pad.local_real_index(rank).to(device)
    local = [shard(pad.pad(x), pad.cu_seqlens, **sh).clone().requires_grad_() for x in (q, k, v)]
    attn = MoBAContextParallel(
        args.block, args.topk, layout=args.layout, strategy=args.strategy, backend=args.backend
    )

    start = time.perf_counter()
    out = attn(*local, pad.cu_seqlens)
    out.backward(shard(pad.pad(dout), pad.cu_seqlens, **sh))
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = moba_attn_varlen(
        *full, cu, args.tokens, moba_chunk_size=args.block, moba_topk=args.topk, backend="reference"
    )
    ref.backward(dout)
    mine = [y.index_select(0, real) for y in (out, *(x.grad for x in local))]
    theirs = [shard(pad.pad(y), pad.cu_seqlens, **sh).index_select(0, real)
              for y in (ref, *(x.grad for x in full))]  # fmt: skip
    errs = rel_errors(mine, theirs)
    # bf16 keeps 8 mantissa bits (2^-8 = 3.9e-3 per rounding; both sides round); float32's
    # summation-order differences over a few thousand keys stay near 1e-6.
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = all(e < tol for e in errs)
    s = attn.last_stats
    padded = f"(padded {pad.num_padded_tokens}) " if pad.num_padding else ""
    line = (
        f"rank {rank}/{world} {device} {str(dtype)[6:]} T={args.tokens} {padded}B={args.block} "
        f"K={args.topk} {args.layout}/{s['strategy']}: fwd+bwd {elapsed * 1e3:.1f} ms, "
        f"sent {s['bytes_sent'] / 1e6:.2f} MB, received {s['bytes_received'] / 1e6:.2f} MB, "
        f"union {s['union_fraction']:.3f}, density {s['density']:.3f}, "
        f"rel err out/dq/dk/dv {' '.join(f'{e:.1e}' for e in errs)} -> {'OK' if ok else 'FAIL'}"
    )
    # One write per line: ranks share stdout, and print's separate newline write can interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
