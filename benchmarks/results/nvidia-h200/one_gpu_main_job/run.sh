#!/bin/bash
# Issue 18 check on one H200 (device kind nvidia-h200): 2 ranks on a machine with one GPU.
# Run from the repository root with OUT set:  OUT=/some/dir bash <this file>
# The 2-rank runs must take examples/devices.py's CPU fallback (gloo, float32) and finish; the
# 1-rank demo takes NCCL + bf16 on the GPU; --device cuda with 2 ranks must exit with the fix.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
tr=(python -m torch.distributed.run --standalone)
step() {  # step NAME TIMEOUT CMD...: output and exit status to $OUT/NAME.txt
    local name=$1 t=$2
    shift 2
    echo "\$ $*" >"$OUT/$name.txt"
    timeout "$t" "$@" >>"$OUT/$name.txt" 2>&1
    echo "exit status $?" >>"$OUT/$name.txt"
}
{
    nvidia-smi -L
    nproc
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'visible GPUs', torch.cuda.device_count())"
} >"$OUT/env.txt" 2>&1
step demo_cp_2ranks 45 "${tr[@]}" --nproc-per-node 2 examples/demo_cp.py
step demo_cp_1rank 35 "${tr[@]}" --nproc-per-node 1 examples/demo_cp.py
step demo_cp_2ranks_device_cuda 25 "${tr[@]}" --nproc-per-node 2 examples/demo_cp.py --device cuda
step train_cp_2ranks_device_cuda 25 "${tr[@]}" --nproc-per-node 2 examples/train_cp.py --device cuda
# README's main job (defaults, fewer steps): whatever is left of ${BUDGET:-190} s
step train_cp_2ranks $((${BUDGET:-190} - SECONDS)) "${tr[@]}" --nproc-per-node 2 examples/train_cp.py \
    --steps "${STEPS:-60}" --out-dir /tmp/train_cp_run
cp /tmp/train_cp_run/metrics.json /tmp/train_cp_run/loss.png "$OUT/" 2>/dev/null
true
