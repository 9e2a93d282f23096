#!/usr/bin/env bash
# Nsight Compute over one B=1 decode step (cache append and attention kernels), on a GPU machine:
# install, kernel durations (decode_profile.py), then an ncu `--set full` report and its details
# page under $OUT. Offline: BSK_WHEELS holds the pinned wheels (scripts/deps.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/build/decode_ncu}
mkdir -p "$OUT"
export BSK_WHEELS=${BSK_WHEELS:-$PWD/.whl} BSK_CUDA_ARCHS=${BSK_CUDA_ARCHS:-90a} PYTHONUNBUFFERED=1
source scripts/deps.sh
set +e
root=$PWD
python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/pip.log" 2>&1 || tail -20 "$OUT/pip.log"
cd /tmp
python3 "$root/bench/tune/decode_profile.py" 1 >"$OUT/prof_b1.txt" 2>&1; cat "$OUT/prof_b1.txt"
ncu --clock-control none -k regex:"cache_append|decode_attention" --launch-skip 20 --launch-count 2 \
  --set full --import-source yes -o "$OUT/b1" python3 "$root/bench/tune/decode_profile.py" 1 >"$OUT/ncu_run.txt" 2>&1
ncu --import "$OUT/b1.ncu-rep" --page details >"$OUT/details.txt" 2>&1
grep -E "Duration|Registers Per|Achieved Occ|Memory Throughput|Issue Slots Busy|cache_append|decode_attention|Grid Size" "$OUT/details.txt" | head -40
