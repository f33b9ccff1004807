"""MoBA benchmark tool: one entry point, one folder per run.

    PYTHONPATH=. python -m benchmarks.moba_bench local    [--cases h32-32k,...] [--tag T]
    PYTHONPATH=. python -m benchmarks.moba_bench decode   [--cases decode-128k,...]
    PYTHONPATH=. python -m benchmarks.moba_bench accuracy [--cases h32-32k,...]
    NCCL_NVLS_ENABLE=0 PYTHONPATH=. torchrun --nproc-per-node 8 -m benchmarks.moba_bench cp
    python -m benchmarks.moba_bench local --quick     # CPU smoke: tiny cases, reference op

Jobs: ``local`` (the single-device op vs dense per case, packed documents, a transformer layer
step), ``decode`` (one decode step vs dense SDPA decode), ``accuracy`` (errors vs float32),
``cp`` (context parallel through benchmarks/bench_cp.py). Each job writes or extends
``benchmarks/results/<gpu>/<yyyy-mm-dd>[-tag]/``: ``rows.json`` (schema 1: ``commit``, ``jobs``
with each job's command, ``rows`` with at least job / case / backend), ``table.md``, PNGs and
``command.txt``. Up to three GPU jobs of one run at one commit share a folder (same --date and
--tag); without .git pass ``--commit`` or ``MOBA_BENCH_COMMIT``.

Conventions (common.py states them in full):

* fwd+bwd FLOPs = 3.5x forward FLOPs (``common.FWD_BWD_FACTOR``);
* useful FLOPs from MoBA's density (the pairs it attends: own block causal + K - 1 past blocks);
* dense = the faster of cuDNN SDPA and FA2 (``sdpa_kernel`` with ``SDPBackend.CUDNN_ATTENTION``
  vs ``SDPBackend.FLASH_ATTENTION``) in the same run; FA2 varlen for packed documents;
* accuracy = relative Frobenius error of out, dq, dk, dv against the op computed in float32 on
  float32 copies of the inputs.

Every case runs in try/except (an error is recorded in its row), within ``--budget-s`` seconds;
dense baselines on sequences >= 512K tokens only with ``--dense-long``.
"""

from .common import FWD_BWD_FACTOR, dense_flops, moba_flops

__all__ = ["FWD_BWD_FACTOR", "dense_flops", "moba_flops"]
