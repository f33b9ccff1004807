#!/usr/bin/env bash
# Third H200 call of 2026-12-02, from an archive of the commit that adds this script
# (build/head): the benchmark tool's op cases again with the forward tile chosen in round 2, into
# benchmarks/results/nvidia-h200/2026-12-02-issue13b/, the gate's share of the forward in the
# tool's own cases (issue 12), then, with what time is left, issue 17's training run.
#   OUT=<dir> TRAIN_S=<seconds, 0 to skip> bash benchmarks/run_h200_round3.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
run=benchmarks/results/nvidia-h200/2026-12-02-issue13b
pack() { tar czf "$OUT/results.tgz" "$run" -C "$OUT" gate train_evidence 2>/dev/null; }
step() {
  local limit=$1; shift; echo "== $* (limit ${limit}s)"
  timeout "$limit" "$@"; echo "== rc $? at ${SECONDS}s"; pack
}
mkdir -p "$OUT/gate" "$OUT/train_evidence"
tool="python -m benchmarks.moba_bench local --date 2026-12-02 --tag issue13b"
step 100 $tool --reps 3 --budget-s 40 --profile h32-128k-b4096 --cases h32-128k-b4096,gqa-128k-b4096
step 90 $tool --reps 3 --budget-s 20 --cases h32-32k,h16-128k,gqa-128k-b512,fm-64k
step 70 python benchmarks/gate_check.py --out "$OUT/gate" --quick --time-op \
  --cases h32-32k,h16-128k,gqa-128k-b512,gqa-128k-b4096,h8-1m
if [ "${TRAIN_S:-0}" -gt 0 ]; then
  step "$TRAIN_S" env OUT="$OUT/train_evidence" BUDGET_S=$((TRAIN_S - 70)) \
    bash benchmarks/train_evidence_gpu.sh
fi
