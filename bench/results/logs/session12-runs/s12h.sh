#!/usr/bin/env bash
# DIAG variants of the fused SparseK kernel (patch build/runs/diag12b.diff), then Nsight Compute on it.
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > $OUT/deps.log 2>&1
git apply build/runs/diag12b.diff || exit 1
install_package $OUT/pip.log || exit 1
python3 build/runs/diag12b.py 131072 2>&1 | grep -v Warn | tee $OUT/diag-131072.txt
python3 build/runs/diag12b.py 32768 2>&1 | grep -v Warn | tee $OUT/diag-32768.txt
