#!/usr/bin/env bash
# Fold, second try (k = 0 fix, cheaper per-element tests): tests with fold on, then A/B (6 rounds).
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
git status --short | head
install_package /tmp/pip.log || { tail -30 /tmp/pip.log; exit 1; }
(cd /tmp && python3 -m pytest -q -p no:cacheprovider $OLDPWD/tests/python/test_sparsek_gpu.py > $OUT/py-tests-fold.txt 2>&1); echo "pytest fold rc=$?"; tail -3 $OUT/py-tests-fold.txt
ROUNDS=6 python3 build/runs/fold13.py 131072 32768 2>&1 | grep -v -i warn | tee $OUT/fold-ab.txt
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv
