#!/usr/bin/env bash
# Second H200 call of 2026-12-02: (1) the two cases the first call (run_h200.sh) lost, run by the
# same commit's code (an archive of fab005b in build/fab005b, carried to the device) into the
# same run folder; (2) the bf16 correctness check at full length; (3) the kernel sweep of the
# loop variants (pointer_step, dkdv_mask_skip) against the dense Triton yardstick; (4) CP with
# P = 2, 3, 4 ranks sharing the GPU (issue 15), (2)-(4) from an archive of the commit that adds
# this script (build/head), so uncommitted edits in the checkout do not run. Results are packed
# after every step.
#   OUT=<dir> bash benchmarks/run_h200_round2.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
root=$PWD run=benchmarks/results/nvidia-h200/2026-12-02-issue13
pack() {
  tar czf "$OUT/results.tgz" -C "$root/build/fab005b" "$run" -C "$OUT" sweep cp_one_gpu
}
step() {
  local limit=$1; shift; echo "== $* (limit ${limit}s)"
  timeout "$limit" "$@"; echo "== rc $? at ${SECONDS}s"; pack
}
mkdir -p "$OUT/sweep" "$OUT/cp_one_gpu"
tool="python -m benchmarks.moba_bench local --date 2026-12-02 --tag issue13"
cd build/fab005b
export MOBA_BENCH_COMMIT=fab005b
step 140 $tool --reps 2 --budget-s 130 --dense-long --cases h8-1m
step 60 $tool --reps 3 --budget-s 50 --cases layer-128k
cd "$root/build/head"
step 70 python benchmarks/check_gpu.py --backends triton
step 150 python benchmarks/kernel_sweep.py --out "$OUT/sweep" --reps 3 --skip check,profile \
  --cases h32-128k-b4096,h32-32k,gqa-128k-b512
step 110 python benchmarks/cp_one_gpu.py --out "$OUT/cp_one_gpu" --timeout 90
