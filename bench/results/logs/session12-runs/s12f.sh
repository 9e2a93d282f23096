#!/usr/bin/env bash
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > $OUT/deps.log 2>&1
git apply build/runs/nosync12.diff || exit 1
install_package $OUT/pip.log || exit 1
python3 build/runs/gap12.py $OUT 2>&1 | grep -v -i warn | tee $OUT/gap.txt
gzip $OUT/trace-*.json
