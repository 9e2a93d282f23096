#!/usr/bin/env bash
# Quick SparseK iteration on a GPU machine (offline): build, the C++ and Python SparseK/dense GPU
# tests, then the sparsek-prefill benchmark. Logs under $OUT. scripts/gpu_check.sh is the full run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/sparsek_check}
mkdir -p "$OUT"
export BSK_WHEELS=${BSK_WHEELS:-$PWD/.whl} BSK_GTEST_SOURCE_DIR=${BSK_GTEST_SOURCE_DIR:-$PWD/.deps/googletest}
export PYTHONUNBUFFERED=1 BSK_CUDA_ARCHS=${BSK_CUDA_ARCHS:-80;90a}
source scripts/deps.sh
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DBSK_CUDA_ARCHS="$BSK_CUDA_ARCHS" \
  -DBSK_BUILD_TESTS=ON -DBSK_GTEST_SOURCE_DIR="$BSK_GTEST_SOURCE_DIR" >"$OUT/build.log" 2>&1 &&
  cmake --build build/cmake -j"$(nproc)" >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
build/cmake/tests/cpp/bsk_tests --gtest_filter="${BSK_GTEST_FILTER:-*SparseKGpu*:*DenseGpuTest*}" \
  >"$OUT/gtest.log" 2>&1; echo "gtest rc=$?"; grep -E "FAILED|PASSED|rel_err.*[0-9]" "$OUT/gtest.log" | tail -15
install_package "$OUT/pip.log" || true  # the C++ results above stand on their own
(cd /tmp && python3 -m pytest -q -x "$OLDPWD/tests/python/test_sparsek_gpu.py" \
  "$OLDPWD/tests/python/test_sparsek_modules.py" >"$OUT/pytest.log" 2>&1); echo "pytest rc=$?"
tail -5 "$OUT/pytest.log"
[ -n "${BSK_SKIP_BENCH:-}" ] || python3 -m blackwell_sparsek.bench_sparsek --out "$OUT" ${BSK_BENCH_ARGS:-} 2>&1 | tail -30
