#!/usr/bin/env bash
# The lean call path (issue 5) on a GPU machine, offline, in one call: install, the host cost of
# each CUDA call a small attention call can make (bench/tune/host_costs.cu), then the `latency`
# suite with the layers of our call timed (`python -m blackwell_sparsek.bench_latency
# --breakdown`), on the default path (and, with BSK_LATENCY_SM80=1, with BSK_DENSE_PATH=sm80). Logs and results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/latency_check}
mkdir -p "$OUT"
export BSK_WHEELS=${BSK_WHEELS:-$PWD/.whl} PYTHONUNBUFFERED=1 BSK_CUDA_ARCHS=${BSK_CUDA_ARCHS:-80;90a}
source scripts/deps.sh
t0=$(date +%s)
[ -n "${BSK_SKIP_INSTALL:-}" ] || install_package "$OUT/pip.log" || exit 1
nvcc -O2 -std=c++17 -arch=native -o "$OUT/host_costs" bench/tune/host_costs.cu &&
  "$OUT/host_costs" | tee "$OUT/host_costs.txt"
rm -f "$OUT/host_costs"
(cd /tmp && python3 -m blackwell_sparsek.bench_latency --breakdown --out "$OUT" \
   ${BSK_LATENCY_ARGS:-}) 2>&1 | tail -45
if [ -n "${BSK_LATENCY_SM80:-}" ]; then  # the tier-1 path's C++ call, for comparison
  (cd /tmp && BSK_DENSE_PATH=sm80 python3 -m blackwell_sparsek.bench_latency --breakdown \
     --reps 200 --out "$OUT/sm80") 2>&1 | grep -A9 "layers at S=128, D=64"
fi
echo "total: $(( $(date +%s) - t0 )) s"
