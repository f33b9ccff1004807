"""Where the example ranks run: one decision shared by demo_cp.py, train_cp.py and the SLURM job.

:func:`choose_devices` is pure (no torch, no CUDA calls), so every combination of visible GPUs,
local ranks and requested device/backend is tested on a CPU machine (tests/test_devices.py).

- At least as many visible GPUs as local ranks: NCCL, one GPU per rank, bfloat16.
- Fewer GPUs: the ranks share the GPUs over gloo when gloo groups can carry CUDA tensors
  (``gloo_cuda``); otherwise every rank runs on the CPU with gloo in float32.
- ``device="cpu"|"cuda"`` or ``backend="nccl"|"gloo"`` forces a choice; a forced choice that
  cannot run raises :class:`DeviceChoiceError` naming the fix, never a CUDA error later.

Run as a script it prints the choice for this machine (the SLURM job's pre-flight check)::

    python examples/devices.py --local-world-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

__all__ = [
    "BACKENDS",
    "DEVICES",
    "DeviceChoiceError",
    "DevicePlan",
    "choose_devices",
    "gloo_carries_cuda",
    "plan_from_env",
    "select_devices",
    "visible_gpus",
]

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "nccl", "gloo")


class DeviceChoiceError(ValueError):
    """The requested device/backend cannot run here; the message names the fix."""


@dataclass(frozen=True)
class DevicePlan:
    """What every local rank uses. ``device_indices[r]`` is local rank r's GPU (None on CPU)."""

    device_type: str
    device_indices: tuple[int | None, ...]
    backend: str
    dtype: str
    reason: str

    def __post_init__(self) -> None:
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type must be 'cpu' or 'cuda', got {self.device_type!r}")
        if self.backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {self.backend!r}")
        if not self.device_indices:
            raise ValueError("device_indices must name one entry per local rank, got none")

    def index(self, local_rank: int) -> int | None:
        """GPU index of ``local_rank`` (None on the CPU)."""
        if not 0 <= local_rank < len(self.device_indices):
            raise ValueError(
                f"local_rank must be in [0, {len(self.device_indices)}), got {local_rank}"
            )
        return self.device_indices[local_rank]

    def devices(self) -> str:
        """``cpu``, ``cuda:0-7 (one per rank)`` or ``cuda:0 shared by 2 ranks``."""
        if self.device_type == "cpu":
            return "cpu"
        used = sorted({i for i in self.device_indices if i is not None})
        span = f"cuda:{used[0]}" if len(used) == 1 else f"cuda:{used[0]}-{used[-1]}"
        ranks = len(self.device_indices)
        return f"{span} (one per rank)" if len(used) == ranks else f"{span} shared by {ranks} ranks"

    def summary(self, world_size: int) -> str:
        """The one line printed on rank 0 at start: ranks, devices, backend, dtype and why."""
        ranks = len(self.device_indices)
        where = f"{world_size} rank{'s' * (world_size != 1)}"
        where += f" ({ranks} per node)" if world_size != ranks else ""
        return (
            f"devices: {where} on {self.devices()}, backend {self.backend}, {self.dtype} "
            f"- {self.reason}"
        )


def _fixes(gpus: int, local_ranks: int) -> str:
    fewer = f"--nproc-per-node {gpus}, " if 0 < gpus < local_ranks else ""
    return (
        f"fix: {fewer}make {local_ranks} GPUs visible (CUDA_VISIBLE_DEVICES), "
        "or --device cpu (gloo, float32)"
    )


def _cpu(local_ranks: int, reason: str) -> DevicePlan:
    return DevicePlan("cpu", (None,) * local_ranks, "gloo", "float32", reason)


def _cuda_error(gpus: int, local_ranks: int, backend: str) -> DeviceChoiceError:
    if gpus == 0:
        return DeviceChoiceError(
            "--device cuda but no GPU is visible (torch.cuda.device_count() == 0); fix: a CUDA "
            "build of torch, GPUs made visible (CUDA_VISIBLE_DEVICES), or --device cpu"
        )
    if backend == "gloo":
        return DeviceChoiceError(
            "--device cuda with backend gloo needs gloo groups that carry CUDA tensors, which "
            "this version lacks; fix: backend nccl (one GPU per rank) or --device cpu"
        )
    return DeviceChoiceError(
        f"--device cuda needs one GPU per rank (NCCL): {local_ranks} local rank(s) but "
        f"{gpus} visible GPU(s); {_fixes(gpus, local_ranks)}"
    )


def _check_inputs(gpus: int, local_ranks: int, device: str, backend: str) -> None:
    if not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"gpus must be an int >= 0, got {gpus!r}")
    if not isinstance(local_ranks, int) or local_ranks < 1:
        raise ValueError(f"local_ranks must be an int >= 1, got {local_ranks!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def choose_devices(
    gpus: int, local_ranks: int, device: str = "auto", backend: str = "auto",
    gloo_cuda: bool = False,
) -> DevicePlan:  # fmt: skip
    """Decide device, per-rank GPU, process-group backend and dtype for one node.

    ``gpus``: visible GPUs on this node; ``local_ranks``: processes on this node
    (``LOCAL_WORLD_SIZE``); ``device``: auto|cpu|cuda; ``backend``: auto|nccl|gloo;
    ``gloo_cuda``: whether gloo groups can carry CUDA tensors (see :func:`gloo_carries_cuda`).
    """
    _check_inputs(gpus, local_ranks, device, backend)
    if device == "cpu":
        if backend == "nccl":
            raise DeviceChoiceError(
                "backend nccl needs CUDA tensors but --device cpu was requested; "
                "fix: drop the nccl request (gloo runs on the CPU) or use --device cuda"
            )
        return _cpu(local_ranks, "--device cpu requested")
    enough = gpus >= local_ranks
    if backend != "gloo" and enough:
        why = f"{gpus} visible GPU(s) >= {local_ranks} local rank(s)"
        return DevicePlan("cuda", tuple(range(local_ranks)), "nccl", "bfloat16", why)
    if backend == "nccl":
        raise DeviceChoiceError(
            f"backend nccl needs one GPU per rank: {local_ranks} local rank(s) but {gpus} "
            f"visible GPU(s); {_fixes(gpus, local_ranks)}"
        )
    if gloo_cuda and gpus > 0:
        why = (
            f"{gpus} visible GPU(s) for {local_ranks} local rank(s): gloo carries CUDA tensors"
            if not enough else "gloo requested; gloo carries CUDA tensors"
        )  # fmt: skip
        indices = tuple(r % gpus for r in range(local_ranks))
        return DevicePlan("cuda", indices, "gloo", "bfloat16", why)
    if device == "cuda":
        raise _cuda_error(gpus, local_ranks, backend)
    if backend == "gloo":
        return _cpu(local_ranks, "gloo requested and it carries CPU tensors only here")
    why = "no GPU visible" if gpus == 0 else (
        f"{gpus} visible GPU(s) < {local_ranks} local ranks and gloo cannot carry CUDA tensors "
        f"(for the GPU: --nproc-per-node {gpus})"
    )  # fmt: skip
    return _cpu(local_ranks, why)


def visible_gpus() -> int:
    """GPUs this process can see (honours CUDA_VISIBLE_DEVICES); 0 without a CUDA build."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gloo_carries_cuda() -> bool:
    """True when moba_dist's comm layer stages CUDA tensors through gloo groups.

    ``moba_dist.parallel.comm`` announces it with ``GLOO_CARRIES_CUDA = True`` (all_gather and
    all_to_all of CUDA tensors go through the host; gloo moves broadcast and all_reduce itself),
    so ranks without a GPU of their own share the visible GPUs. Where moba_dist cannot be
    imported, or a version lacks the flag, ranks without their own GPU run on the CPU.
    """
    try:
        from moba_dist.parallel import comm
    except ImportError:  # the CLI may run where only the launcher's python is installed
        return False
    return bool(getattr(comm, "GLOO_CARRIES_CUDA", False))


def plan_from_env(device: str = "auto", backend: str = "auto") -> DevicePlan:
    """:func:`choose_devices` for this process: torchrun's LOCAL_WORLD_SIZE, the visible GPUs."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return choose_devices(visible_gpus(), local_ranks, device, backend, gloo_carries_cuda())


def select_devices(device: str = "auto", backend: str = "auto", prog: str = "devices"):
    """Decide for this process under torchrun, print the choice on rank 0, pin the GPU.

    Returns ``(plan, gpu_index)`` (index None on the CPU). A choice that cannot run exits with
    the fix, printed once per node (by local rank 0; the others exit after it), before any CUDA
    call.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        plan = plan_from_env(device, backend)
    except DeviceChoiceError as e:
        if local_rank != 0:
            # Every rank reaches the same verdict; a quiet rank that exited first would make
            # torchrun kill local rank 0 before it prints the fix.
            time.sleep(5)
            raise SystemExit(2) from None
        raise SystemExit(f"{prog}: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(plan.summary(int(os.environ.get("WORLD_SIZE", "1"))), flush=True)
    index = plan.index(local_rank)
    if index is not None:
        import torch

        torch.cuda.set_device(index)
    return plan, index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print where the example ranks would run.")
    p.add_argument("--local-world-size", type=int, required=True, help="ranks per node")
    p.add_argument("--gpus", type=int, default=None, help="visible GPUs (default: count them)")
    p.add_argument("--world-size", type=int, default=None, help="all ranks (default: local)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    args = p.parse_args(argv)
    gpus = visible_gpus() if args.gpus is None else args.gpus
    try:
        plan = choose_devices(
            gpus, args.local_world_size, args.device, args.backend, gloo_carries_cuda()
        )
    except DeviceChoiceError as e:
        print(f"devices: {e}", file=sys.stderr)
        return 2
    print(plan.summary(args.world_size or args.local_world_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
