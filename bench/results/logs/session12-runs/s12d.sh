#!/usr/bin/env bash
# DIAG variants of the fused SparseK kernel (patch build/runs/diag12.diff), then Nsight Compute on it.
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > $OUT/deps.log 2>&1
git apply build/runs/diag12.diff || exit 1
install_package $OUT/pip.log || exit 1
python3 build/runs/diag12.py 131072 2>&1 | grep -v Warn | tee $OUT/diag-131072.txt
python3 build/runs/diag12.py 32768 2>&1 | grep -v Warn | tee $OUT/diag-32768.txt
timeout 200 ncu --clock-control none --set full --import-source yes -k regex:sparsek_fwd_sm90 --launch-count 1 \
  -o $OUT/sk32k python3 bench/tune/sparsek_profile.py 32768 > $OUT/ncu.log 2>&1; echo "ncu rc=$?"
ncu --import $OUT/sk32k.ncu-rep --page details > $OUT/ncu-details.txt 2>&1
ncu --import $OUT/sk32k.ncu-rep --page source --csv --print-source sass > $OUT/ncu-sass.csv 2>&1; echo "src rc=$? $(wc -c < $OUT/ncu-sass.csv)"
gzip -k $OUT/ncu-sass.csv; rm -f $OUT/sk32k.ncu-rep
