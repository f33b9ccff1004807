"""Run a function on every rank of a gloo world spawned inside pytest.

A FileStore in a fresh temporary directory avoids port races; the process-group timeout and the
join timeout make a broken rank fail the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PG_TIMEOUT_S = 60


def _entry(rank, world, store_path, fn, args, errq):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT_S),
    )  # fmt: skip
    try:
        fn(rank, world, *args)
        dist.barrier()  # every rank finished every collective before anyone tears down
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()
    # Success is settled here. Skip interpreter teardown: gloo's background threads sometimes
    # abort the process while static objects are destroyed ("terminate called without an active
    # exception", exit code -6, about 1 run in 8 on a loaded 2-core machine), after all checks
    # have passed on every rank.
    os._exit(0)


def run_world(world: int, fn, *args, timeout: float = 300.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; raise with every failing rank's
    traceback. ``fn`` must be a module-level function (it is pickled by name)."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_entry, args=(r, world, os.path.join(tmp, "store"), fn, args, errq))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = []
        while not errq.empty():
            errors.append(errq.get())
        if errors or hung or any(p.exitcode != 0 for p in procs):
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors))
            codes = [p.exitcode for p in procs]
            raise AssertionError(
                f"distributed run failed: exit codes {codes}, hung {hung}\n{detail}"
            )
