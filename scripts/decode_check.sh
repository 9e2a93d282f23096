#!/usr/bin/env bash
# SparseK decoding (and the Hugging Face integration) on a GPU machine, offline, in one call:
# install, the cache's and HF's GPU tests, compute-sanitizer memcheck and racecheck over a subset
# of the cache's CUDA tests, then the sparsek-decode benchmark. Logs under $OUT; ends with a table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/decode_check}
mkdir -p "$OUT"
export BSK_WHEELS=${BSK_WHEELS:-$PWD/.whl} PYTHONUNBUFFERED=1 BSK_CUDA_ARCHS=${BSK_CUDA_ARCHS:-80;90a}
source scripts/deps.sh
t0=$(date +%s)
install_package "$OUT/pip.log" || exit 1
root=$PWD
tests="$root/tests/python/test_sparsek_cache.py"
tests="$tests $root/tests/python/test_hf.py $root/tests/python/test_hf_sparsek.py"
(cd /tmp && python3 -m pytest -q $tests ${BSK_PYTEST_ARGS:-} >"$OUT/pytest.log" 2>&1); echo "pytest rc=$?"
grep -E "passed|failed|error" "$OUT/pytest.log" | tail -3; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
if [ -z "${BSK_SKIP_SANITIZER:-}" ]; then
  sel='cuda and (nonfinite or overflow or B1_H4x4 or B2_H4x1_D128_k24_w16_value or B1_H4x2_D128_k30_w0 or (fused and ramp))'
  for tool in memcheck racecheck; do
    (cd /tmp && compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -x \
       "$root/tests/python/test_sparsek_cache.py" -k "$sel" >"$OUT/$tool.log" 2>&1)
    echo "$tool rc=$? ($(grep -cE '^=+ (Invalid|Race|Error)' "$OUT/$tool.log") reports)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/$tool.log" | tail -3
  done
fi
[ -n "${BSK_SKIP_BENCH:-}" ] || python3 -m blackwell_sparsek.bench_decode --out "$OUT" ${BSK_BENCH_ARGS:-} 2>&1 | tail -25
echo "total: $(( $(date +%s) - t0 )) s"
