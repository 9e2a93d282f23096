#!/usr/bin/env bash
# Lazy rescaling A/B (scripts/ab_build.sh: new = working tree, base = b524be6's two kernel headers),
# then the dense + SparseK Python GPU tests on the new build.
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
git log --oneline -1; git status --short | head
scripts/ab_build.sh run python3 build/runs/kt13.py
echo "=== NEW"; grep -v -i warn $OUT/ab-new.txt; echo "=== BASE"; grep -v -i warn $OUT/ab-base.txt
install_package /tmp/pip-final.log || exit 1
(cd /tmp && python3 -m pytest -q -p no:cacheprovider $OLDPWD/tests/python/test_sparsek_gpu.py $OLDPWD/tests/python/test_gpu.py > $OUT/py-tests.txt 2>&1); echo "pytest rc=$?"; tail -3 $OUT/py-tests.txt
