#!/usr/bin/env bash
# ncu source-level stall samples of the B=1 decode step's kernels (HEAD): where the append's and
# the attention's latency chains wait.
export OUT
bash bench/tune/decode_ncu.sh > $OUT/decode_ncu.txt 2>&1; tail -25 $OUT/decode_ncu.txt
ncu --import "$OUT/b1.ncu-rep" --page source --csv --print-source sass > $OUT/source.csv 2>$OUT/source.err
echo "source rc=$? lines $(wc -l < $OUT/source.csv)"; head -c 600 $OUT/source.csv; head -5 $OUT/source.err
gzip -k $OUT/source.csv; rm -f $OUT/b1.ncu-rep.gz
ls -la $OUT
