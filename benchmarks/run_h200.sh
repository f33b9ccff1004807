#!/usr/bin/env bash
# One H200 device call that produces the committed results of issues 11-14 and 19 at one commit:
# the benchmark tool's local, 1M, accuracy and decode jobs into one dated folder, the bf16 GPU
# correctness check of the triton backend, and the CP world-size-1 overhead table, and the gate's
# agreement, time and share of the forward (issue 12). Every step
# has its own time limit so a slow one cannot take the others' results with it.
#   MOBA_BENCH_COMMIT=<sha> OUT=<dir> bash benchmarks/run_h200.sh <date> <tag>
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
date_=$1 tag=$2
tool="python -m benchmarks.moba_bench"
common="--date $date_ --tag $tag"
pack() {
  tar czf "$OUT/results.tgz" benchmarks/results/nvidia-h200/"$date_-$tag" -C "$OUT" cp_overhead gate
}
# Pack after every step: a call cut short at the device limit still returns what finished.
step() {
  local limit=$1; shift; echo "== $* (limit ${limit}s)"
  timeout "$limit" "$@"; echo "== rc $? at ${SECONDS}s"; pack
}
mkdir -p "$OUT/cp_overhead" "$OUT/gate"
# The tool writes a job's rows when the job ends: several short jobs keep what finished.
step 100 $tool local $common --reps 3 --budget-s 20 --profile h32-32k \
  --cases h32-32k,h16-128k,gqa-128k-b512,packed64-128k,layer-32k
step 80 $tool local $common --reps 3 --budget-s 35 --cases h32-128k-b4096,gqa-128k-b4096
step 120 $tool local $common --reps 2 --budget-s 35 --cases fm-64k,fm-128k,fm-256k,fm-512k
step 60 $tool local $common --reps 2 --budget-s 55 --dense-long --cases h8-1m
step 25 $tool accuracy $common --acc-tokens 8192 --cases h32-32k,gqa-128k-b4096
step 45 $tool decode $common --reps 5
step 30 python benchmarks/check_gpu.py --backends triton
step 50 python benchmarks/bench_cp.py --overhead --out "$OUT/cp_overhead"
step 60 python benchmarks/gate_check.py --out "$OUT/gate" --quick --time-op \
  --cases 512K-b128-k8,128K-b512-k3,128K-b4096-k12,128K-b128-k8-d64,128K-b128-k8-d256
