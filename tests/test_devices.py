"""examples/devices.py: the device/backend decision shared by the examples and the SLURM job.

Pure function, so the whole grid (visible GPUs x local ranks x requested device x requested
backend x whether gloo carries CUDA tensors) runs on a CPU machine. Expected choices are written
out by hand from issue 18's rules; the full grid is checked against those rules' invariants.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from devices import (  # noqa: E402
    BACKENDS,
    DEVICES,
    DeviceChoiceError,
    DevicePlan,
    choose_devices,
    main,
    select_devices,
)

CPU1, CPU2, CPU8 = (("cpu", "gloo", "float32", (None,) * n) for n in (1, 2, 8))


def as_tuple(p: DevicePlan) -> tuple:
    return p.device_type, p.backend, p.dtype, p.device_indices


@pytest.mark.parametrize(
    ("gpus", "ranks", "device", "backend", "gloo_cuda", "want"),
    [
        (0, 1, "auto", "auto", False, CPU1),
        (0, 2, "auto", "auto", False, CPU2),
        (1, 1, "auto", "auto", False, ("cuda", "nccl", "bfloat16", (0,))),
        (1, 2, "auto", "auto", False, CPU2),  # issue 18: one GPU, 2 ranks -> CPU, no crash
        (2, 2, "auto", "auto", False, ("cuda", "nccl", "bfloat16", (0, 1))),
        (8, 2, "auto", "auto", False, ("cuda", "nccl", "bfloat16", (0, 1))),
        (4, 8, "auto", "auto", False, CPU8),
        (8, 8, "cpu", "auto", False, CPU8),
        (2, 2, "cpu", "gloo", False, CPU2),
        (2, 2, "cuda", "auto", False, ("cuda", "nccl", "bfloat16", (0, 1))),
        (2, 2, "auto", "nccl", False, ("cuda", "nccl", "bfloat16", (0, 1))),
        (2, 2, "auto", "gloo", False, CPU2),  # gloo asked for, carries no CUDA tensors
        (1, 2, "auto", "auto", True, ("cuda", "gloo", "bfloat16", (0, 0))),
        (2, 4, "auto", "auto", True, ("cuda", "gloo", "bfloat16", (0, 1, 0, 1))),
        (1, 2, "cuda", "auto", True, ("cuda", "gloo", "bfloat16", (0, 0))),
        (2, 2, "cuda", "gloo", True, ("cuda", "gloo", "bfloat16", (0, 1))),
        (2, 2, "auto", "auto", True, ("cuda", "nccl", "bfloat16", (0, 1))),  # NCCL still wins
        (0, 2, "auto", "auto", True, CPU2),
        (1, 2, "cpu", "auto", True, CPU2),
    ],
)
def test_choice(gpus, ranks, device, backend, gloo_cuda, want):
    assert as_tuple(choose_devices(gpus, ranks, device, backend, gloo_cuda)) == want


@pytest.mark.parametrize(
    ("gpus", "ranks", "device", "backend", "gloo_cuda", "needles"),
    [
        (1, 2, "cuda", "auto", False, ["2 local rank(s) but 1 visible", "--nproc-per-node 1",
                                       "CUDA_VISIBLE_DEVICES", "--device cpu"]),
        (0, 1, "cuda", "auto", False, ["no GPU is visible", "CUDA build", "CUDA_VISIBLE_DEVICES",
                                       "--device cpu"]),
        (4, 8, "cuda", "auto", False, ["--nproc-per-node 4", "make 8 GPUs visible"]),
        (1, 2, "auto", "nccl", False, ["nccl needs one GPU per rank", "--nproc-per-node 1"]),
        (1, 2, "auto", "nccl", True, ["nccl needs one GPU per rank", "--nproc-per-node 1"]),
        (0, 2, "cuda", "gloo", True, ["no GPU is visible", "--device cpu"]),
        (2, 2, "cpu", "nccl", False, ["nccl needs CUDA tensors", "--device cpu"]),
        (2, 2, "cuda", "gloo", False, ["carry CUDA tensors", "backend nccl", "--device cpu"]),
    ],
    ids=["1gpu-2ranks-cuda", "no-gpu-cuda", "4gpu-8ranks-cuda", "nccl-too-few",
         "nccl-too-few-gloo-cuda", "no-gpu-gloo-cuda", "cpu-nccl", "cuda-gloo"],
)  # fmt: skip
def test_error_names_the_fix(gpus, ranks, device, backend, gloo_cuda, needles):
    with pytest.raises(DeviceChoiceError) as e:
        choose_devices(gpus, ranks, device, backend, gloo_cuda)
    for needle in needles:
        assert needle in str(e.value)


GRID = list(itertools.product(range(4), range(1, 5), DEVICES, BACKENDS, (False, True)))


@pytest.mark.parametrize(("gpus", "ranks", "device", "backend", "gloo_cuda"), GRID)
def test_grid_follows_the_rules(gpus, ranks, device, backend, gloo_cuda):
    try:
        p = choose_devices(gpus, ranks, device, backend, gloo_cuda)
    except DeviceChoiceError as e:
        assert "fix:" in str(e)
        assert (device, backend) != ("auto", "auto")  # auto always runs somewhere
        return
    assert len(p.device_indices) == ranks
    assert device in ("auto", p.device_type) and backend in ("auto", p.backend)
    if p.device_type == "cpu":
        assert p.backend == "gloo" and p.dtype == "float32" and set(p.device_indices) == {None}
        # CPU only when the GPUs cannot hold the ranks, or when asked for
        assert device == "cpu" or backend == "gloo" or gpus < ranks
        return
    assert p.dtype == "bfloat16" and all(0 <= i < gpus for i in p.device_indices)
    if p.backend == "nccl":
        assert sorted(p.device_indices) == list(range(ranks))  # one GPU per rank
    else:
        assert gloo_cuda  # CUDA tensors meet gloo only once gloo can carry them
        assert p.device_indices == tuple(r % gpus for r in range(ranks))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(gpus=-1, local_ranks=1), "gpus must be an int >= 0, got -1"),
        (dict(gpus=1, local_ranks=0), "local_ranks must be an int >= 1, got 0"),
        (dict(gpus=1, local_ranks=1, device="gpu"), "device must be one of"),
        (dict(gpus=1, local_ranks=1, backend="mpi"), "backend must be one of"),
    ],
)
def test_bad_inputs(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        choose_devices(**kwargs)


def test_summary_line():
    one_gpu = choose_devices(1, 2).summary(2)
    assert one_gpu.startswith("devices: 2 ranks on cpu, backend gloo, float32 - ")
    assert "1 visible GPU(s) < 2 local ranks" in one_gpu
    nodes = choose_devices(8, 8).summary(16)
    assert nodes.startswith("devices: 16 ranks (8 per node) on cuda:0-7 (one per rank), ")
    assert "backend nccl, bfloat16" in nodes
    shared = choose_devices(1, 2, gloo_cuda=True).summary(2)
    assert "on cuda:0 shared by 2 ranks, backend gloo" in shared
    with pytest.raises(ValueError, match=r"local_rank must be in \[0, 2\), got 2"):
        choose_devices(1, 2).index(2)


def test_cli_exit_codes(capsys, monkeypatch):
    # moba_dist's comm layer stages CUDA tensors through gloo: 2 ranks share 1 GPU.
    assert main(["--local-world-size", "2", "--gpus", "1"]) == 0
    assert "2 ranks on cuda:0 shared by 2 ranks, backend gloo" in capsys.readouterr().out
    assert main(["--local-world-size", "2", "--gpus", "1", "--backend", "nccl"]) == 2
    assert "--nproc-per-node 1" in capsys.readouterr().err
    monkeypatch.setattr("devices.gloo_carries_cuda", lambda: False)  # a comm layer without it
    assert main(["--local-world-size", "2", "--gpus", "1"]) == 0
    assert "2 ranks on cpu" in capsys.readouterr().out
    assert main(["--local-world-size", "2", "--gpus", "1", "--device", "cuda"]) == 2
    assert "--nproc-per-node 1" in capsys.readouterr().err


def test_select_devices_exits_before_cuda(monkeypatch):
    """Under torchrun with more ranks than GPUs, backend nccl exits with the fix (this CPU build
    sees no GPU) instead of a CUDA error; other local ranks exit silently with code 2. Sharing
    the GPU over gloo pins every rank to it."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr("devices.visible_gpus", lambda: 1)
    monkeypatch.setattr("devices.time.sleep", lambda s: None)
    with pytest.raises(SystemExit) as e:
        select_devices("cuda", "nccl", prog="demo")
    assert str(e.value).startswith("demo: backend nccl needs one GPU per rank")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as e:
        select_devices("cuda", "nccl", prog="demo")
    assert e.value.code == 2
    pinned = []
    monkeypatch.setattr("torch.cuda.set_device", pinned.append)
    plan, index = select_devices("auto", prog="demo")  # one GPU, two ranks: shared over gloo
    assert (plan.device_type, plan.backend, index, pinned) == ("cuda", "gloo", 0, [0])
    monkeypatch.setattr("devices.gloo_carries_cuda", lambda: False)
    plan, index = select_devices("auto", prog="demo")  # without staging: the CPU
    assert (plan.device_type, index) == ("cpu", None)


def test_demo_cp_pads_three_ranks():
    """Issue 16: the defaults (4096 zigzag tokens) on 3 ranks need 4098; the demo pads and each
    rank's real tokens match the single-device op."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "3", str(ROOT / "examples" / "demo_cp.py"), "--device", "cpu", "--tokens", "1024",
           "--block", "64", "--head-dim", "16"]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=280, cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("rank ")]
    assert len(lines) == 3 and all("(padded 1026)" in ln and ln.endswith("OK") for ln in lines)
    assert "devices: 3 ranks on cpu, backend gloo, float32 - --device cpu requested" in res.stdout


def test_comm_layer_announces_gloo_cuda():
    """moba_dist.parallel.comm stages CUDA tensors through gloo, so ranks may share a GPU."""
    from devices import gloo_carries_cuda

    from moba_dist.parallel import comm

    assert comm.GLOO_CARRIES_CUDA is True and gloo_carries_cuda() is True
    assert choose_devices(1, 4, gloo_cuda=gloo_carries_cuda()).devices() == (
        "cuda:0 shared by 4 ranks"
    )
