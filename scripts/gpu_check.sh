#!/usr/bin/env bash
# Everything a GPU machine must show, in one call and offline: build, every test (GPU included),
# compute-sanitizer memcheck + racecheck on the GPU tests, the fuzz suite with its "gpu" profile
# (and a sample under memcheck), the seed benchmark, a summary table.
# Logs go to $OUT (default build/gpu_check). Wheels for missing Python packages are taken from
# BSK_WHEELS (default .whl), GoogleTest sources from BSK_GTEST_SOURCE_DIR (default .deps/googletest).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
OUT=${OUT:-$root/build/gpu_check}
logs=$OUT/logs
mkdir -p "$logs"
export BSK_WHEELS=${BSK_WHEELS:-$root/.whl}
[ -d "$BSK_WHEELS" ] || unset BSK_WHEELS
export BSK_GTEST_SOURCE_DIR=${BSK_GTEST_SOURCE_DIR:-$root/.deps/googletest}
[ -d "$BSK_GTEST_SOURCE_DIR" ] || unset BSK_GTEST_SOURCE_DIR
export BSK_CUDA_ARCHS=${BSK_CUDA_ARCHS:-80;90a}
export PYTHONUNBUFFERED=1
suites=${BSK_BENCH_SUITES:-seed sparsek-prefill}
export BSK_CMAKE_ARGS="${BSK_CMAKE_ARGS:-} -DBSK_BUILD_TUNING=ON"

source scripts/step.sh

step env bash -c 'nvidia-smi; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv; nvcc --version; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())"'
step deps bash -c 'source scripts/deps.sh'
build=build/cmake
# BSK_SKIP_TESTS=1: build and install only, then the benchmarks (a run that must fit the
# device's per-call limit can split tests and benchmarks).
if [ -n "${BSK_SKIP_TESTS:-}" ]; then
  step build bash -c "cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBSK_CUDA_ARCHS='$BSK_CUDA_ARCHS' -DBSK_BUILD_TESTS=OFF $BSK_CMAKE_ARGS && \
    cmake --build $build -j$(nproc) && python3 -m pip install -q --no-build-isolation --no-deps ."
else
step test bash scripts/test.sh
# What the fat binary carries: SASS per listed arch plus PTX for the newest generic one.
step fatbin bash -c "cuobjdump --list-elf --list-ptx $build/libbsk.a | sed -E 's/.*\\.(sm_[0-9a]+|compute_[0-9a]+)\\..*/\\1/' | sort | uniq -c"
if [ -x $build/tests/cpp/bsk_tests ]; then
  step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
    $build/tests/cpp/bsk_tests --gtest_filter='*DenseGpu*:*SparseKGpu*'
  step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
    $build/tests/cpp/bsk_tests --gtest_filter='*DenseGpuTest*/Seed*:*DenseGpuTest*/S17*:*DenseGpuTest*/D128*:*SparseKGpuTest*/Basic*:*SparseKGpuTest*/Chunks*:*SparseKGpuTest*/GQA*:*SparseKGpuTest*/SqLtSkv*:*SparseKGpuTest*/ManyTiles*'
fi
# The fuzz suite's CUDA tests with 30x the examples of the "ci" profile (the test step above ran
# the whole file with "ci"), then a few of them again under memcheck (compute-sanitizer slows every
# kernel a hundredfold).
step fuzz_gpu env BSK_HYPOTHESIS_PROFILE=gpu python3 -m pytest -q -rs -p no:cacheprovider \
  --hypothesis-show-statistics tests/python/test_fuzz.py -k cuda
# --report-api-errors no: torch probes the CUDA API at start-up and expects some calls to fail;
# memory errors in kernels are still reported and fail the step.
step fuzz_memcheck env BSK_HYPOTHESIS_PROFILE=sanitizer compute-sanitizer --tool memcheck \
  --report-api-errors no --error-exitcode 1 python3 -m pytest -q -rs -p no:cacheprovider \
  --hypothesis-show-statistics tests/python/test_fuzz.py -k cuda
[ -x $build/bsk_dense_tune ] && [ -z "${BSK_SKIP_TUNE:-}" ] && step tune $build/bsk_dense_tune
fi
for s in $suites; do
  if [ "$s" = sparsek-prefill ]; then
    step "bench_$s" python3 -m blackwell_sparsek.bench_sparsek --out "$OUT/bench"
  else
    step "bench_$s" python3 -m blackwell_sparsek.bench --suite "$s" --out "$OUT/bench"
  fi
done

echo
echo "================ summary ================"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
grep -h -E "passed|failed|tests passed|SKIPPED" "$logs/test.log" | tail -n 4 | tee -a "$OUT/summary.txt"
[ -f "$logs/tune.log" ] && cat "$logs/tune.log"
for md in "$OUT"/bench/*.md; do [ -f "$md" ] && grep -E '^\|' "$md"; done
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$logs"
# One archive for the benchmark files: the device returns at most 8 files per call.
if [ -d "$OUT/bench" ]; then tar -C "$OUT" -czf "$OUT/bench.tar.gz" bench && rm -rf "$OUT/bench"; fi
