"""The device scripts of issue 17 (benchmarks/train_evidence_long.sh through
train_evidence_gpu.sh) on a tiny CPU model: they must leave one archive whose per-variant records
merge into one sweep, since a device call returns at most 8 files and a broken script costs a
whole GPU call to find out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    "--seq-len 256 --block 32 --topk 2 --layers 1 --dim 32 --heads 2 --kv-heads 1 "
    "--batch-size 2 --steps 8 --warmup 2 --eval-every 4 --eval-batches 1 --device cpu"
)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_long_probe_archive_merges(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), STEPS="8", LR="2e-3", VARIANTS="moba topk1",
               MODEL_ARGS=TINY, PYTHON=sys.executable, OMP_NUM_THREADS="1")  # fmt: skip
    res = subprocess.run(["bash", "benchmarks/train_evidence_long.sh"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["long.tgz"]  # everything in one file
    with tarfile.open(out / "long.tgz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "examples/train_evidence.py", "--merge",
                    str(tmp_path / "x" / "moba"), str(tmp_path / "x" / "topk1"),
                    "--out-dir", str(merged)], cwd=ROOT, check=True, timeout=120,
                   capture_output=True)  # fmt: skip
    with open(merged / "metrics.json") as f:
        blob = json.load(f)
    assert set(blob["runs"]) == {"moba", "topk1"}
    assert blob["lrs"] == [2e-3]
    # --local-warmup is a quarter of the steps and reaches every variant's train_cp arguments.
    args = blob["train_cp_args"]
    assert args["local_warmup"] == 2 and args["dense_full"] and args["steps"] == 8, args
    for v in ("moba", "topk1"):
        run = blob["runs"][v]["0.002"]
        # Bytes: an 8-step model is near the uniform 8 bits/byte, never past it by much.
        assert 0 < run["test_bpb"]["all"] < 8.5, run["test_bpb"]
