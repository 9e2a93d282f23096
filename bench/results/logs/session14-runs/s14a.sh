#!/usr/bin/env bash
# session 14: decode timeline trace (instrumented build)
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a CUDAFLAGS=-DBSK_DECODE_TRACE
source scripts/deps.sh
install_package $OUT/pip.log || exit 1
for d in 0 1500 3000; do
  echo "=== prologue delay $d ns"
  BSK_TRACE_DELAY_NS=$d python3 build/runs/trace.py 1 > $OUT/trace-b1-d$d.txt 2>&1; echo rc=$?
  python3 build/runs/trace_an.py $OUT/trace-b1-d$d.txt
done
