"""Bytes moved by context-parallel MoBA: selective vs allgather, random vs concentrated gate.

    torchrun --nproc-per-node 4 benchmarks/cp_bytes.py [--tokens 16384 --block 256 --topk 3]

Random gate: i.i.d. Gaussian q and k (the worst case: queries spread their choices uniformly).
Concentrated gate: the keys of a few "sink" blocks get a shared offset that every query aligns
with, as trained models concentrate on a few popular blocks. Rank 0 prints one line per setting
with the max over ranks of forward bytes received and the union fraction.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import torch.distributed as dist

from moba_dist import MoBAContextParallel
from moba_dist.parallel import shard


def make_inputs(a, concentrated: bool):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(a.tokens, a.heads, a.head_dim, generator=g)
    k = torch.randn(a.tokens, a.kv_heads, a.head_dim, generator=g)
    v = torch.randn(a.tokens, a.kv_heads, a.head_dim, generator=g)
    if concentrated:
        direction = torch.randn(a.head_dim, generator=g)
        q += direction
        sinks = torch.arange(0, a.tokens, a.tokens // 4)[:4]  # four sink blocks, one per quarter
        for s in sinks.tolist():
            k[s : s + a.block] += 3 * direction
    return q, k, v


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--layout", default="contiguous")
    a = p.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    cu = torch.tensor([0, a.tokens], dtype=torch.int32)
    for gate in ("random", "concentrated"):
        q, k, v = make_inputs(a, gate == "concentrated")
        local = [shard(x, cu, rank=rank, world_size=world, layout=a.layout) for x in (q, k, v)]
        for strategy in ("selective", "allgather"):
            mod = MoBAContextParallel(a.block, a.topk, layout=a.layout, strategy=strategy)
            mod(*local, cu)
            s = mod.last_stats
            row = torch.tensor([s["bytes_received"], s["bytes_sent"], s["union_fraction"]])
            table = [torch.zeros_like(row) for _ in range(world)]
            dist.all_gather(table, row)
            if rank == 0:
                t = torch.stack(table)
                print(
                    f"P={world} T={a.tokens} B={a.block} K={a.topk} {a.layout} gate={gate:12s} "
                    f"{strategy:9s}: max recv {t[:, 0].max() / 2**20:7.2f} MiB, total recv "
                    f"{t[:, 0].sum() / 2**20:7.2f} MiB, union fraction per rank "
                    + " ".join(f"{x:.3f}" for x in t[:, 2].tolist()),
                    flush=True,
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
