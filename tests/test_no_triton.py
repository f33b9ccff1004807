"""Without triton installed: ``auto`` falls back, ``backend="triton"`` raises a clear error.

Each check runs in a fresh interpreter where ``sys.modules["triton"] = None`` makes every
``import triton`` fail as it does when the package is absent (the test process itself may
already have imported triton).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_PRELUDE = """
import sys
sys.modules["triton"] = None
sys.modules["triton.language"] = None
import types
import torch
from moba_dist import moba_attn_varlen
from moba_dist.kernels.dispatch import resolve_backend, triton_installed
"""


def _run(body: str) -> str:
    code = textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.timeout(300)
def test_auto_falls_back_without_triton():
    out = _run("""
        assert not triton_installed()
        # A stand-in with a CUDA device: auto would pick triton there; it must fall back.
        fake = types.SimpleNamespace(
            shape=(8, 2, 64), device=torch.device("cuda"), dtype=torch.bfloat16
        )
        print(resolve_backend("auto", fake))
        q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
        cu = torch.tensor([0, 12], dtype=torch.int32)
        out = moba_attn_varlen(q, k, v, cu, 12, moba_chunk_size=4, moba_topk=2)
        print(tuple(out.shape))
    """)
    assert out.split() == ["reference", "(12,", "2,", "16)"]


@pytest.mark.timeout(300)
def test_explicit_triton_without_triton_raises():
    out = _run("""
        q, k, v = (torch.randn(12, 2, 16) for _ in range(3))
        cu = torch.tensor([0, 12], dtype=torch.int32)
        try:
            moba_attn_varlen(q, k, v, cu, 12, moba_chunk_size=4, moba_topk=2, backend="triton")
        except ValueError as err:
            print(err)
    """)
    assert "backend='triton' cannot run here: triton is not installed; pip install triton" in out
