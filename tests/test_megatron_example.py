"""docs/megatron.md's worked example, ``examples/megatron_example.py``, run as a user runs it.

The example checks itself against the single-device op and exits non-zero on a mismatch; the
tests also parse the ``max |diff|`` it prints. Without megatron-core it must skip cleanly, which
is checked by hiding the package (``sys.modules["megatron"] = None`` makes ``find_spec`` say
"not installed").
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "megatron_example.py"
HAVE_MEGATRON = (
    importlib.util.find_spec("megatron") is not None
    and importlib.util.find_spec("megatron.core") is not None
)


def _run(cmd: list[str], timeout: float = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    res = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _diffs(stdout: str) -> list[float]:
    return [
        float(x) for x in re.findall(r"max \|diff\| vs single-device moba_attn_func (\S+)", stdout)
    ]


@pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core is not installed")
def test_megatron_example_world1_matches_single_device_op():
    out = _run([sys.executable, str(EXAMPLE), "--seq-len", "512"])
    assert "rank 0/1: out (512, 2, 256)" in out, out
    diffs = _diffs(out)
    # float64 end to end, and CP size 1 runs the single-device op itself: equal to rounding.
    assert len(diffs) == 1 and diffs[0] <= 1e-10, out


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core is not installed")
def test_megatron_example_cp2_matches_single_device_op():
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    out = _run([*torchrun, str(EXAMPLE), "--seq-len", "512"])
    diffs = _diffs(out)
    # float64; CP reorders the float sums (LSE merge of local and fetched keys): ~1e-16.
    assert len(diffs) == 2 and max(diffs) <= 1e-10, out


def test_megatron_example_skips_without_megatron():
    hide = (
        "import runpy, sys; sys.modules['megatron'] = None; sys.argv = [sys.argv[1]]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    out = _run([sys.executable, "-c", hide, str(EXAMPLE)], timeout=120)
    assert "megatron-core is not installed; skipping" in out, out
