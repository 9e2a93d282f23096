#!/usr/bin/env bash
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > $OUT/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/env.txt
scripts/ab_build.sh run bash build/runs/ab12.sh
echo "=== NEW"; cat $OUT/ab-new.txt; echo "=== BASE"; cat $OUT/ab-base.txt
