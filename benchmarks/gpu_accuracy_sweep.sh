#!/usr/bin/env bash
# Accuracy variants trained side by side on one GPU (each run is launch-bound, so they overlap well).
# Usage: bash benchmarks/gpu_accuracy_sweep.sh DATA RESULTS_DIR
set -u
DATA=${1:-../shared/data/mvtec_ad/bottle}
RES=${2:-benchmarks/results}
common="--data $DATA --size lite --device cuda --results $RES"
python -m benchmarks.accuracy $common --steps 8750 --batch-size 8 --teacher-indices 1 2 3 --work /tmp/a1 --name accuracy_bottle_lite_idx123.json > /tmp/a1.log 2>&1 &
python -m benchmarks.accuracy $common --steps 8750 --batch-size 8 --teacher lite2 --work /tmp/a2 --name accuracy_bottle_lite2.json > /tmp/a2.log 2>&1 &
python -m benchmarks.accuracy $common --steps 8750 --batch-size 8 --student-width 256 --work /tmp/a3 --name accuracy_bottle_lite_w256.json > /tmp/a3.log 2>&1 &
python -m benchmarks.accuracy $common --steps 8750 --batch-size 16 --work /tmp/a4 --name accuracy_bottle_lite_b16.json > /tmp/a4.log 2>&1 &
python -m benchmarks.logical --device cuda --steps 8750 --batch-size 8 --work /tmp/lg --results $RES > /tmp/lg.log 2>&1 &
wait
for f in /tmp/a1.log /tmp/a2.log /tmp/a3.log /tmp/a4.log /tmp/lg.log; do echo "== $f"; tr '\r' '\n' < $f | grep -vE "it/s" | grep -E "image_auroc|pixel_auroc|aupro|structural|logical|Error|error" | head -12; done
