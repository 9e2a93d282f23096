#!/usr/bin/env bash
# Nsight Compute over one launch of the fused SparseK kernel at S=32768 on the final tree
# (fold + lazy rescaling + lists in the walks' grid).
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
install_package /tmp/pip.log || exit 1
timeout 240 ncu --clock-control none --set full --import-source yes -k regex:sparsek_fwd_sm90 --launch-count 1 \
  -o /tmp/sk32k python3 bench/tune/sparsek_profile.py 32768 > $OUT/ncu.log 2>&1; echo "ncu rc=$?"
ncu --import /tmp/sk32k.ncu-rep --page details > $OUT/ncu-details.txt 2>&1
ncu --import /tmp/sk32k.ncu-rep --page raw --csv > $OUT/ncu-raw.csv 2>&1
ncu --import /tmp/sk32k.ncu-rep --page source --csv --print-source sass > /tmp/ncu-sass.csv 2>&1; echo "src rc=$? $(wc -c < /tmp/ncu-sass.csv)"
gzip -c /tmp/ncu-sass.csv > $OUT/ncu-sass.csv.gz
grep -E "Elapsed Cycles|Duration|Issue Slots Busy|Issued Ipc|No Eligible|Compute \(SM\) Throughput|Local|Registers Per|Achieved Occupancy|L2 Hit Rate" $OUT/ncu-details.txt | head -20
