"""Job ``cp``: context-parallel MoBA on NCCL through ``benchmarks/bench_cp.py``'s correctness
check and timed strategies (selective / allgather / auto vs dense all-gather CP), launched by
torchrun; rank 0 returns the rows:

    NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --nproc-per-node 8 -m benchmarks.moba_bench cp
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["run_cp"]


def run_cp(cases: str | None, layouts: str, reps: int, log=print) -> list[dict] | None:
    """Rows of every (case, layout, strategy) and one ``cp-check`` row per layout on rank 0;
    None on the other ranks."""
    from benchmarks import bench_cp

    if "RANK" not in os.environ:
        raise SystemExit("error: the cp job runs under torchrun (see benchmarks/moba_bench/cp.py)")
    names = cases.split(",") if cases else list(bench_cp.CASES)
    bad = [n for n in names if n not in bench_cp.CASES]
    if bad:
        raise SystemExit(
            f"error: --cases {bad} unknown to bench_cp.py; known: {', '.join(bench_cp.CASES)}"
        )
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for lay in layouts.split(","):
        check = bench_cp.correctness(lay, rank, world)
        rows.append(dict(job="cp-check", case=f"correctness-{lay}", backend="cp", P=world, **check))
    for name in names:
        for lay in layouts.split(","):
            try:
                got = bench_cp.run_case(name, lay, rank, world, reps)
            except Exception as e:  # the other cases still run (every rank fails alike)
                got = [
                    dict(
                        case=name,
                        layout=lay,
                        strategy="all",
                        error=f"{type(e).__name__}: {str(e)[:300]}",
                    )
                ]
            for r in got:
                rows.append(dict(job="cp", backend=r.get("strategy"), **r))
                if rank == 0:
                    log(f"  {name} {lay} {r.get('strategy')}: {r.get('fwdbwd_ms')}")
    dist.destroy_process_group()
    return rows if rank == 0 else None
