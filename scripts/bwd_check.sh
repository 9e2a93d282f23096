#!/usr/bin/env bash
# Backward (training) iteration on a GPU machine (offline): build, the C++ backward tests (and the
# SparseK forward tests, which share the selection plan), compute-sanitizer over a backward subset,
# the Python autograd tests, then the forward+backward benchmark. Logs under $OUT.
# BSK_BWD_STAGES picks stages (default "build gtest sanitize pytest bench").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/bwd_check}
mkdir -p "$OUT"
export BSK_WHEELS=${BSK_WHEELS:-$PWD/.whl} BSK_GTEST_SOURCE_DIR=${BSK_GTEST_SOURCE_DIR:-$PWD/.deps/googletest}
export PYTHONUNBUFFERED=1 BSK_CUDA_ARCHS=${BSK_CUDA_ARCHS:-80;90a}
STAGES=${BSK_BWD_STAGES:-build gtest sanitize pytest bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }
source scripts/deps.sh
T=build/cmake/tests/cpp/bsk_tests
if has build; then
  cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DBSK_CUDA_ARCHS="$BSK_CUDA_ARCHS" \
    -DBSK_BUILD_TESTS=ON -DBSK_GTEST_SOURCE_DIR="$BSK_GTEST_SOURCE_DIR" >"$OUT/build.log" 2>&1 &&
    cmake --build build/cmake -j"$(nproc)" >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  echo "build ok"
fi
if has gtest; then
  $T --gtest_filter="${BSK_GTEST_FILTER:-*BackwardGpu*:*SparseKGpu*}" >"$OUT/gtest.log" 2>&1
  echo "gtest rc=$?"; grep -E "FAILED|PASSED|rel err" "$OUT/gtest.log" | tail -${BSK_TAIL:-60}
fi
if has sanitize; then
  F='*BackwardGpu*/Dense_causal_fp16:*BackwardGpu*/SK_Basic_kv_fp16:*BackwardGpu*/SK_SqGtSkv*:*BackwardGpu*/SK_S17*:*BackwardGpu*/SK_MQA*:*BackwardGpu*/Dense_SqGtSkv*'
  compute-sanitizer --tool memcheck --error-exitcode 9 $T --gtest_filter="$F" >"$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.log" | tail -3
  compute-sanitizer --tool racecheck --error-exitcode 9 $T --gtest_filter="$F" >"$OUT/racecheck.log" 2>&1
  echo "racecheck rc=$?"; grep -E "HAZARD|RACECHECK SUMMARY|PASSED|FAILED" "$OUT/racecheck.log" | tail -3
fi
if has pytest; then
  install_package "$OUT/pip.log"
  (cd /tmp && python3 -m pytest -q -x ${BSK_PYTEST_FILES:-"$OLDPWD/tests/python/test_autograd.py"} \
    >"$OUT/pytest.log" 2>&1); echo "pytest rc=$?"
  tail -5 "$OUT/pytest.log"
fi
if has bench && [ -f python/blackwell_sparsek/bench_train.py ]; then
  python3 -m blackwell_sparsek.bench_train --out "$OUT" ${BSK_BENCH_ARGS:-} 2>&1 | tail -30
fi
