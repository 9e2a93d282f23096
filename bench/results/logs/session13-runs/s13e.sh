#!/usr/bin/env bash
# C++ GPU tests + memcheck + racecheck (sm_90a only), then the Python package for the next call.
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > $OUT/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv > $OUT/env.txt
t0=$SECONDS
cmake -S . -B build/cmake90 -G Ninja -DCMAKE_BUILD_TYPE=Release -DBSK_CUDA_ARCHS=90a \
  -DBSK_BUILD_TESTS=ON -DBSK_GTEST_SOURCE_DIR=$PWD/.deps/googletest > $OUT/build.log 2>&1 &&
  cmake --build build/cmake90 -j16 >> $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build $((SECONDS-t0)) s"
T=build/cmake90/tests/cpp/bsk_tests
$T --gtest_filter='*SparseK*:*DenseGpuTest*' > $OUT/cpp-gtest.txt 2>&1; echo "gtest rc=$?"; tail -3 $OUT/cpp-gtest.txt
compute-sanitizer --tool memcheck --error-exitcode 1 $T --gtest_filter='*SparseKGpu*' > $OUT/cpp-memcheck.txt 2>&1; echo "memcheck rc=$?"; tail -3 $OUT/cpp-memcheck.txt
compute-sanitizer --tool racecheck --error-exitcode 1 $T --gtest_filter='*SparseKGpuTest*/Basic*:*SparseKGpuTest*/Chunks*:*SparseKGpuTest*/GQA*:*SparseKGpuTest*/SqLtSkv*:*SparseKGpuTest*/Long*:*SparseKGpuTest*/ManyTiles*' > $OUT/cpp-racecheck.txt 2>&1; echo "racecheck rc=$?"; tail -3 $OUT/cpp-racecheck.txt
echo "total $((SECONDS-t0)) s"
