#!/usr/bin/env bash
# One GPU call: the Python package built for sm_90a, the seed, long and latency benchmark suites
# with peers (sdpa-flash, sdpa-cudnn) in the same process, once per dense path (BSK_DENSE_PATH), then
# the package's GPU tests (every test on both dense kernel families). Results under $OUT/bench.
# Env: BSK_WHEELS as for gpu_check.sh; SM90_BENCH_PATHS (default "sm90 sm80"); SM90_SUITES
# (default "seed long latency"); SM90_PEERS (default: all of the benchmark's peers); SM90_PYTEST_TIMEOUT
# (seconds, default 150).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/sm90_bench}
mkdir -p "$OUT/bench"
export PYTHONUNBUFFERED=1
source scripts/deps.sh
t0=$SECONDS
BSK_CUDA_ARCHS=90a install_package "$OUT/install.log" || exit 1
for path in ${SM90_BENCH_PATHS:-sm90 sm80}; do
  for suite in ${SM90_SUITES:-seed long latency}; do
    mkdir -p "$OUT/bench/$path"
    if [ "$suite" = latency ]; then  # its own module (one call at a time, its own peers)
      BSK_DENSE_PATH=$path python3 -m blackwell_sparsek.bench_latency --out "$OUT/bench/$path" \
        >"$OUT/bench_${path}_$suite.log" 2>&1
    else
      BSK_DENSE_PATH=$path python3 -m blackwell_sparsek.bench --suite "$suite" \
        ${SM90_PEERS:+--peers "$SM90_PEERS"} --out "$OUT/bench/$path" \
        >"$OUT/bench_${path}_$suite.log" 2>&1
    fi
    echo "== $path $suite rc=$? ($((SECONDS - t0))s)"
    grep -h -E '^\|' "$OUT"/bench/$path/$suite-*.md
  done
done
(cd tests/python && timeout "${SM90_PYTEST_TIMEOUT:-150}" python3 -m pytest -q -x test_gpu.py) \
  >"$OUT/pytest.log" 2>&1
echo "pytest rc=$?: $(tail -n 1 "$OUT/pytest.log")"
