"""slurm/: syntax of every script, the dry run and a faked real run of train_cp.sbatch.

The dry run prints the srun/torchrun command on one line; it is parsed with ``shlex`` and checked
flag by flag. A fake ``scontrol`` on PATH stands in for a real 2-node allocation; for the real
(non-dry) path a fake ``srun`` runs its command once here and a fake ``torchrun`` records its
arguments, so the pre-flight device check (examples/devices.py, with this machine's real torch)
and the resume guard run for real.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
SBATCH = SLURM / "train_cp.sbatch"
SCRIPTS = sorted(p for p in SLURM.iterdir() if p.suffix in (".sbatch", ".sh", ".env"))


def run_script(env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """Run train_cp.sbatch with bash in a clean environment (no SLURM_* of the caller)."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(ROOT)}
    proc = subprocess.run(
        ["bash", str(SBATCH)], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def parse(out: str) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    """The printed command split into (srun part, torchrun part, training flags), and exports."""
    line = next(ln for ln in out.splitlines() if ln.startswith("srun "))
    words = shlex.split(line)
    t = words.index("torchrun")
    script = next(i for i, w in enumerate(words) if w.endswith("train_cp.py"))
    exports = dict(
        ln.removeprefix("export ").split("=", 1)
        for ln in out.splitlines()
        if ln.startswith("export ")
    )
    return words[:t], words[t:script], words[script + 1 :], exports


def flag_values(args: list[str]) -> dict[str, str | bool]:
    """``['--a', '1', '--b']`` -> ``{'--a': '1', '--b': True}``."""
    out: dict[str, str | bool] = {}
    for i, a in enumerate(args):
        if a.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[a] = nxt if nxt is not None and not nxt.startswith("--") else True
    return out


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_fake_two_node_allocation():
    env = {"DRY_RUN": "1", "FAKE_NODELIST": "gpu-a,gpu-b", "GPUS_PER_NODE": "4",
           "MASTER_PORT": "29611", "SEQ_LEN": "65536", "TOPK": "5", "DP": "2"}  # fmt: skip
    proc = run_script(env)
    srun, torchrun, train, exports = parse(proc.stdout)
    assert srun == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert torchrun == [
        "torchrun", "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu-a:29611", "--rdzv-id=moba-dry-run", "--max-restarts=0",
    ]  # fmt: skip
    flags = flag_values(train)
    assert flags["--seq-len"] == "65536" and flags["--topk"] == "5" and flags["--dp"] == "2"
    assert flags["--layout"] == "zigzag" and flags["--strategy"] == "auto"
    assert flags["--resume"] is True
    expected = {"--seq-len", "--batch-size", "--layers", "--dim", "--heads", "--kv-heads",
                "--block", "--topk", "--full-layers", "--full-attn-final-frac", "--dp",
                "--layout", "--strategy", "--steps", "--lr", "--out-dir", "--resume",
                "--save-every", "--device"}  # fmt: skip
    assert set(flags) == expected
    assert flags["--device"] == "cuda"  # a cluster job fails rather than falls back to the CPU
    assert exports["NCCL_NVLS_ENABLE"] == "0"
    assert "world=8 dp=2 cp=4" in proc.stdout


def test_dry_run_1m_config_and_overrides():
    env = {"DRY_RUN": "1", "MOBA_ENV": "slurm/moba_1m.env", "TOPK": "16", "RESUME": "0",
           "EXTRA_ARGS": "--data corpus.txt"}  # fmt: skip
    _, torchrun, train, _ = parse(run_script(env).stdout)
    assert "--nnodes=2" in torchrun and "--nproc-per-node=8" in torchrun
    assert "--rdzv-endpoint=node-0:29500" in torchrun and "--max-restarts=2" in torchrun
    flags = flag_values(train)
    assert flags["--seq-len"] == "1048576" and flags["--block"] == "4096"
    assert (flags["--heads"], flags["--kv-heads"], flags["--dim"]) == ("32", "8", "4096")
    assert flags["--topk"] == "16"  # the environment beats the env file
    assert "--resume" not in flags and flags["--data"] == "corpus.txt"


def test_dry_run_under_slurm_with_fake_scontrol(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && printf "n17\\nn18\\n"\n')
    fake.chmod(0o755)
    env = {"DRY_RUN": "1", "PATH": f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}",
           "SLURM_JOB_NODELIST": "n[17-18]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT)}  # fmt: skip
    srun, torchrun, train, _ = parse(run_script(env).stdout)
    assert "--nodes=2" in srun
    assert "--rdzv-endpoint=n17:29500" in torchrun and "--rdzv-id=4242" in torchrun
    assert "--nproc-per-node=8" in torchrun
    # No job name: the run directory is runs/moba-cp whatever the job id
    assert flag_values(train)["--out-dir"] == "runs/moba-cp"


def test_resubmission_keeps_the_run_dir(tmp_path):
    """Issue 16: a resubmitted job (new SLURM_JOB_ID, same job name) resumes the same run dir."""
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/bash\necho n1\n")
    fake.chmod(0o755)
    base = {"DRY_RUN": "1", "PATH": f"{tmp_path}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "8",
            "SLURM_JOB_NAME": "exp7"}  # fmt: skip
    dirs, ids = set(), set()
    for job in ("101", "102"):
        _, torchrun, train, _ = parse(run_script({**base, "SLURM_JOB_ID": job}).stdout)
        dirs.add(flag_values(train)["--out-dir"])
        ids.update(w for w in torchrun if w.startswith("--rdzv-id="))
    assert dirs == {"runs/exp7"}
    assert ids == {"--rdzv-id=101", "--rdzv-id=102"}  # the rendezvous stays per job
    out = run_script({**base, "SLURM_JOB_ID": "103", "RUN_NAME": "other"}).stdout
    assert flag_values(parse(out)[2])["--out-dir"] == "runs/other"


def fake_cluster(tmp_path: Path) -> dict[str, str]:
    """A 1-node allocation whose srun runs the step once here and whose torchrun logs argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "scontrol": '#!/bin/bash\necho n1\n',
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "torchrun": f'#!/bin/bash\necho "$*" >>{tmp_path}/torchrun.log\n',
    }  # fmt: skip
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "7",
            "SLURM_SUBMIT_DIR": str(ROOT), "PYTHON": sys.executable, "GPUS_PER_NODE": "2",
            "SEQ_LEN": "4096", "OUT_DIR": str(tmp_path / "run"),
            "TORCHRUN": str(bin_dir / "torchrun"), "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip


def test_real_run_preflight_and_resume_guard(tmp_path):
    env = fake_cluster(tmp_path)
    log = tmp_path / "torchrun.log"
    # No GPU visible (hidden on GPU machines too): DEVICE=cuda, the default, fails before
    # torchrun starts, with the fix
    proc = run_script(env, check=False)
    assert proc.returncode != 0 and not log.exists()
    assert "--device cuda but no GPU is visible" in proc.stderr
    assert "pre-flight device check failed" in proc.stderr
    # DEVICE=auto: the check prints the CPU fallback line, torchrun starts, the flags are kept
    proc = run_script({**env, "DEVICE": "auto"})
    assert "devices: 2 ranks on cpu, backend gloo, float32 - no GPU visible" in proc.stdout
    assert log.read_text().count("--resume") == 1 and "--device auto" in log.read_text()
    saved = (tmp_path / "run" / "launch_args.txt").read_text()
    assert "--topk 8" in saved and "--steps" not in saved
    # Resubmitted with more steps: resumes. With another topk: refused, naming both.
    run_script({**env, "DEVICE": "auto", "STEPS": "400", "SLURM_JOB_ID": "8"})
    assert log.read_text().count("--resume") == 2
    proc = run_script({**env, "DEVICE": "auto", "TOPK": "4"}, check=False)
    assert proc.returncode != 0 and log.read_text().count("--resume") == 2
    assert "written by a run with other flags" in proc.stderr
    assert "--topk 8" in proc.stderr and "--topk 4" in proc.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "not inside a SLURM allocation"),
        ({"DRY_RUN": "1", "NODES": "3", "FAKE_NODELIST": "a,b"}, "NODES=3 but the allocation"),
        ({"DRY_RUN": "1", "DP": "3"}, "not a multiple of DP=3"),
        ({"DRY_RUN": "1", "SEQ_LEN": "1000"}, "needs SEQ_LEN % (2*CP) == 0"),
        ({"DRY_RUN": "1", "MOBA_ENV": "slurm/missing.env"}, "is not a file"),
        ({"DRY_RUN": "1", "DEVICE": "gpu"}, "DEVICE must be auto, cpu or cuda, got DEVICE=gpu"),
    ],
    ids=["no-slurm", "too-many-nodes", "dp", "zigzag-seq-len", "missing-env", "device"],
)
def test_clear_errors(env, message):
    proc = run_script(env, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr
