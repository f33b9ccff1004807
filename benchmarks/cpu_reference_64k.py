"""Memory-lean reference backend on the CPU: 64K tokens, 8 heads, D=64, B=512, K=3, fwd+bwd.

    PYTHONPATH=. python benchmarks/cpu_reference_64k.py [--tokens 65536]

Prints wall time of forward and backward and the process's peak resident memory. The inputs
alone are 3 x 32 MiB (float32); a dense [T, T] score matrix per head would be 16 GiB.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from moba_dist import moba_attn_varlen


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--topk", type=int, default=3)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(a.tokens, a.heads, a.head_dim, generator=g).requires_grad_() for _ in range(3)
    )
    cu = torch.tensor([0, a.tokens], dtype=torch.int32)
    t0 = time.perf_counter()
    out = moba_attn_varlen(
        q, k, v, cu, a.tokens, moba_chunk_size=a.block, moba_topk=a.topk, backend="reference"
    )
    t1 = time.perf_counter()
    out.backward(torch.randn_like(out))
    t2 = time.perf_counter()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"T={a.tokens} H={a.heads} D={a.head_dim} B={a.block} K={a.topk} threads="
        f"{torch.get_num_threads()}: forward {t1 - t0:.1f} s, backward {t2 - t1:.1f} s, "
        f"peak RSS {peak_mib:.0f} MiB, finite={bool(torch.isfinite(q.grad).all())}"
    )


if __name__ == "__main__":
    main()
