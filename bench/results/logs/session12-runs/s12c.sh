#!/usr/bin/env bash
# Python SparseK GPU tests, then the sparsek-prefill benchmark (quotable) on this tree.
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > $OUT/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv > $OUT/env.txt
install_package $OUT/pip.log || exit 1
(cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $OLDPWD/tests/python/test_sparsek_gpu.py \
  $OLDPWD/tests/python/test_sparsek_modules.py > $OUT/py-tests.txt 2>&1); echo "pytest rc=$?"; tail -3 $OUT/py-tests.txt
python3 -m blackwell_sparsek.bench_sparsek --out $OUT/bench 2>&1 | tail -25
