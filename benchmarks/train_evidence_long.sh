#!/usr/bin/env bash
# Issue 17's long-run probe: VARIANTS (default moba, full and topk1) at one learning rate LR
# (default the one every variant picked from the 800-step grid), STEPS steps each, one process
# per variant sharing the GPU, through benchmarks/train_evidence_gpu.sh (same model, corpus and
# evaluation).
#
#   OUT=runs/te_long STEPS=2400 bash benchmarks/train_evidence_long.sh
#   OUT=runs/te_hyb VARIANTS="hybrid_last hybrid_final" bash benchmarks/train_evidence_long.sh
#
# LR may be a comma-separated list (one process per variant and learning rate). PORT (default
# 29700) is the first rendezvous port; two invocations running at once need bases 100 apart.
set -u
OUT=${OUT:?set OUT to the output directory}
STEPS=${STEPS:-2400}
LR=${LR:-1.5e-3}
export STEPS LRS=$LR EVAL_EVERY=$((STEPS / 10)) BLOCK=${BLOCK:-512} BUDGET_S=${BUDGET_S:-500}
export EXTRA_ARGS="--dense-full --local-warmup $((STEPS / 4))"
VARIANTS=${VARIANTS:-moba full topk1}
port=${PORT:-29700}
for v in $VARIANTS; do
  mkdir -p "$OUT/$v"
  ORDER=$v PORT=$port OUT=$OUT/$v bash benchmarks/train_evidence_gpu.sh > "$OUT/$v.log" 2>&1 &
  port=$((port + 10))  # train_evidence_gpu.sh takes one port per learning rate from PORT up
done
wait
for v in $VARIANTS; do tail -n 3 "$OUT/$v.log"; done
# The device returns at most 8 files: everything travels as one archive.
logs=(); for v in $VARIANTS; do logs+=("$v" "$v.log"); done
tar czf "$OUT/long.tgz" -C "$OUT" "${logs[@]}"
(cd "$OUT" && rm -rf "${logs[@]}")
