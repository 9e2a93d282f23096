#!/usr/bin/env bash
# Final checks of the decode change (HEAD): scripts/decode_check.sh (cache + HF pytest,
# compute-sanitizer memcheck/racecheck over the cache's CUDA subset, the sparsek-decode suite),
# then the dense GPU tests (Sq = 1 runs the same kernel).
export OUT BSK_CUDA_ARCHS=90a BSK_WHEELS=$PWD/.whl
# A warm machine keeps the A/B run's build dir, whose objects can look newer than this tree.
rm -rf build/cp3* build/py3*
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
bash scripts/decode_check.sh 2>&1 | tail -40
grep -c "" $OUT/pip.log; ls build
(cd /tmp && python3 -m pytest -q -p no:cacheprovider $OLDPWD/tests/python/test_gpu.py -k "not cpu" > $OUT/test_gpu.txt 2>&1); echo "test_gpu rc=$?"; tail -1 $OUT/test_gpu.txt
