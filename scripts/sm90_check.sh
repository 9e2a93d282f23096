#!/usr/bin/env bash
# One GPU call for the Hopper dense kernel: build (sm_90a only, the C++ tests and the tuning
# harness), the C++ dense GPU tests on both kernel families, compute-sanitizer memcheck and
# racecheck on the sm90 cases (last: the slowest), bsk_dense_tune (float64 CPU check + sm80 vs
# sm90 timings) before them.
# Logs under $OUT (default build/sm90_check); a short table last.
# Env: BSK_WHEELS, BSK_GTEST_SOURCE_DIR as for gpu_check.sh; SM90_SKIP_SANITIZER=1 skips the
# sanitizer steps; SM90_NCU=1 adds one Nsight Compute pass (clocks left alone).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/sm90_check}
mkdir -p "$OUT"
logs=$OUT STEP_TAIL=15
source scripts/step.sh
step env bash -c 'nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv; nvcc --version | tail -2; date -u'
step deps bash -c 'source scripts/deps.sh'
inc=$(python3 -c "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include'))")
b=build/sm90
step configure cmake -S . -B $b -G Ninja -DBSK_CUDA_ARCHS=90a -DBSK_BUILD_TESTS=ON \
  -DBSK_BUILD_TUNING=ON -DBSK_CUTLASS_INCLUDE_DIR="$inc" ${BSK_GTEST_SOURCE_DIR:+-DBSK_GTEST_SOURCE_DIR=$BSK_GTEST_SOURCE_DIR}
step build cmake --build $b --target bsk_tests bsk_dense_tune -j 16
step tests $b/tests/cpp/bsk_tests --gtest_filter='*DenseGpu*'
step tune $b/bsk_dense_tune paths
if [ "${SM90_SKIP_SANITIZER:-0}" != 1 ]; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 $b/tests/cpp/bsk_tests \
    --gtest_filter='*DenseGpuTest*_sm90'
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $b/tests/cpp/bsk_tests \
    --gtest_filter='*DenseGpuTest*/Seed*_sm90:*DenseGpuTest*/S17*_sm90:*DenseGpuTest*/D128*_sm90:*DenseGpuTest*/ManyTiles_SqGtSkv*_sm90'
fi
# One ncu pass over one launch per shape (SM90_NCU=1): where the sm90 kernel's time goes.
if [ "${SM90_NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
  step ncu ncu --clock-control none -k regex:dense_fwd_sm90 --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    $b/bsk_dense_tune profile
fi
echo
echo "================ summary ================"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
grep -E "tests ran|PASSED|FAILED" "$OUT/tests.log" | head -30
grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT"/memcheck.log "$OUT"/racecheck.log 2>/dev/null
cat "$OUT/tune.log"
