#!/usr/bin/env bash
# Nsight Compute over one B=1 decode step on the final tree (issue 7's evidence for the next session).
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
OUT=$OUT bash bench/tune/decode_ncu.sh 2>&1 | tail -30
ncu --import $OUT/b1.ncu-rep --page source --csv --print-source sass -k regex:decode_attention > /tmp/dec-sass.csv 2>&1; gzip -c /tmp/dec-sass.csv > $OUT/dec-sass.csv.gz
rm -f $OUT/b1.ncu-rep $OUT/pip.log
