#!/usr/bin/env bash
# Clean rebuild of the Python package from this tree (a warm machine may hold an older build),
# SparseK Python GPU tests, then the sparsek-prefill benchmark.
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
ls -d build/*/ ; rm -rf build/cp3*
git log --oneline -1; git status --short | head
install_package /tmp/pip.log || exit 1
(cd /tmp && python3 -m pytest -q -p no:cacheprovider $OLDPWD/tests/python/test_sparsek_gpu.py \
  $OLDPWD/tests/python/test_sparsek_modules.py $OLDPWD/tests/python/test_autograd.py -k "not gradcheck" > $OUT/py-tests.txt 2>&1); echo "pytest rc=$?"; tail -3 $OUT/py-tests.txt
python3 -m blackwell_sparsek.bench_sparsek --out $OUT 2>&1 | tail -22
