#!/usr/bin/env bash
# Session 13: the fold (newer candidates selected per element in the band's first block).
# Clean build, SparseK Python GPU tests (fold on: default; and off), A/B timing in one binary.
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
rm -rf build/cp3*
git log --oneline -1; git status --short | head
install_package /tmp/pip.log || { tail -30 /tmp/pip.log; exit 1; }
(cd /tmp && python3 -m pytest -q -x -p no:cacheprovider $OLDPWD/tests/python/test_sparsek_gpu.py > $OUT/py-tests-fold.txt 2>&1); echo "pytest fold rc=$?"; tail -3 $OUT/py-tests-fold.txt
python3 build/runs/fold13.py 131072 32768 2>&1 | grep -v Warn | tee $OUT/fold-ab.txt
(cd /tmp && BSK_SPARSEK_FOLD=0 python3 -m pytest -q -x -p no:cacheprovider $OLDPWD/tests/python/test_sparsek_gpu.py > $OUT/py-tests-nofold.txt 2>&1); echo "pytest nofold rc=$?"; tail -3 $OUT/py-tests-nofold.txt
