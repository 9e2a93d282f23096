#!/usr/bin/env bash
# The walks and the key lists in one grid (select_kernel): clean Python build, GPU tests (dense,
# SparseK, modules, autograd, CUDA fuzz), then the sparsek-prefill benchmark.
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
rm -rf build/cp3*
git status --short | head
install_package /tmp/pip.log || { tail -30 /tmp/pip.log; exit 1; }
(cd /tmp && python3 -m pytest -q -p no:cacheprovider $OLDPWD/tests/python/test_sparsek_gpu.py $OLDPWD/tests/python/test_gpu.py \
  $OLDPWD/tests/python/test_sparsek_modules.py $OLDPWD/tests/python/test_autograd.py $OLDPWD/tests/python/test_fuzz.py \
  -k "not gradcheck and not cpu and not gates_properties and not invalid_calls" > $OUT/py-tests.txt 2>&1); echo "pytest rc=$?"; tail -3 $OUT/py-tests.txt
python3 -m blackwell_sparsek.bench_sparsek --out $OUT 2>&1 | grep -v -i warn | tail -16
