#!/usr/bin/env bash
# Session start (fd11b7e) against the final tree, one machine, one call: the fused SparseK kernel
# and the dense sm90 kernel (kt13.py), then the whole SparseK call (fold13-style call timing).
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
scripts/ab_build.sh run bash build/runs/ab13i.sh
echo "=== NEW (final)"; cat $OUT/ab-new.txt; echo "=== BASE (fd11b7e)"; cat $OUT/ab-base.txt
