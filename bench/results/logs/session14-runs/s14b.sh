#!/usr/bin/env bash
# Decode combine: first partial batch in flight before the split weights, a warp per head for the weights: A/B of the decode
# pieces against HEAD (5aeef9a)'s kernel, then on the new build the decode tests (cache + dense GPU) and
# compute-sanitizer over the cache's CUDA subset (scripts/decode_check.sh without the HF tests).
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
scripts/ab_build.sh run bash build/runs/dec14.sh
echo "=== NEW"; cat $OUT/ab-new.txt; echo "=== BASE"; cat $OUT/ab-base.txt
install_package /tmp/pip-final.log || exit 1
(cd /tmp && python3 -m pytest -q -p no:cacheprovider $OLDPWD/tests/python/test_sparsek_cache.py $OLDPWD/tests/python/test_gpu.py -k "not cpu" > $OUT/py-tests.txt 2>&1); echo "pytest rc=$?"; tail -2 $OUT/py-tests.txt
sel='cuda and (nonfinite or overflow or B1_H4x4 or B2_H4x1_D128_k24_w16_value or B1_H4x2_D128_k30_w0 or (fused and ramp))'
for tool in memcheck racecheck; do
  (cd /tmp && compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
     $OLDPWD/tests/python/test_sparsek_cache.py -k "$sel" > $OUT/$tool.txt 2>&1)
  echo "$tool rc=$?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" $OUT/$tool.txt | tail -2
done
