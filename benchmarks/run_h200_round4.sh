#!/usr/bin/env bash
# Issue 13's final H200 run (2026-12-03), in two device calls, from an archive of the commit that
# adds this script (build/head: `git archive HEAD | tar -x -C build/head`), so uncommitted edits
# in the checkout do not run. Every job of the benchmark tool lands in one run folder,
# benchmarks/results/nvidia-h200/2026-12-03-issue13c; results are packed after every step.
#   CALL=1: kernel_sweep (bf16 checks at D 64/96/128/256, backward variants, profile), the op
#           cases at block 512 and 4096 (with their Triton dense yardstick), accuracy.
#   CALL=2: the FlashMoBA configuration at 128K-512K (512K against FA2 only) and H8 1M forward.
# Call 2 needs call 1's run folder copied into build/head first (the device starts bare).
#   CALL=<1|2> MOBA_BENCH_COMMIT=<sha> OUT=<dir> bash benchmarks/run_h200_round4.sh
set -uo pipefail
: "${MOBA_BENCH_COMMIT:?set to the commit archived in build/head}" "${CALL:?1 or 2}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
cd build/head
run=benchmarks/results/nvidia-h200/2026-12-03-issue13c
pack() { tar czf "$OUT/results.tgz" "$run" -C "$OUT" sweep 2>/dev/null; }
step() {
  local limit=$1; shift; echo "== $* (limit ${limit}s)"
  timeout "$limit" "$@"; echo "== rc $? at ${SECONDS}s"; pack
}
mkdir -p "$OUT/sweep"
tool="python -m benchmarks.moba_bench local --date 2026-12-03 --tag issue13c"
if [ "$CALL" = 1 ]; then
  step 170 python benchmarks/kernel_sweep.py --out "$OUT/sweep" --reps 3 --skip cases,dense \
    --profile h32-32k --cases h32-32k,gqa-128k-b512,h32-128k-b4096,gqa-128k-b4096
  step 110 $tool --reps 3 --budget-s 35 --profile h32-128k-b4096 \
    --cases h32-128k-b4096,gqa-128k-b4096
  step 100 $tool --reps 3 --budget-s 20 --profile h32-32k \
    --cases h32-32k,h16-128k,gqa-128k-b512,fm-64k
  step 40 python -m benchmarks.moba_bench accuracy --date 2026-12-03 --tag issue13c \
    --acc-tokens 8192 --cases h32-32k,gqa-128k-b4096
else
  step 100 $tool --reps 2 --budget-s 40 --cases fm-128k,fm-256k
  step 150 $tool --reps 1 --budget-s 120 --dense-long --baselines dense-fa2 --cases fm-512k
  step 150 $tool --reps 2 --budget-s 130 --dense-long --cases h8-1m
fi
