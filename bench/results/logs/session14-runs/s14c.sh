#!/usr/bin/env bash
# session 14: decode timeline trace, with stamps inside the last CTA's combine
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a CUDAFLAGS=-DBSK_DECODE_TRACE
source scripts/deps.sh
install_package $OUT/pip.log || exit 1
python3 build/runs/trace.py 1 > $OUT/trace-b1-combine.txt 2>&1; echo rc=$?
python3 build/runs/trace_an.py $OUT/trace-b1-combine.txt
