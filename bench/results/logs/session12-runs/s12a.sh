#!/usr/bin/env bash
# Register split A/B/C of the SparseK sm90 kernel in one call: 56/224 (tree), 40/232, 24/240 (HEAD).
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > $OUT/deps.log 2>&1
f=src/kernels/sparsek_fwd_sm90.cuh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/env.txt
for split in "56 224" "40 232" "24 240" "56 224"; do
  set -- $split
  sed -i -E "s/kProducerRegs = [0-9]+, kConsumerRegs = [0-9]+;/kProducerRegs = $1, kConsumerRegs = $2;/" $f
  install_package $OUT/pip-$1.log || exit 1
  echo "== split $1/$2 S=131072"
  python3 bench/tune/sparsek_variants.py 131072 > $OUT/variants-$1-$RANDOM.txt 2>&1
  tail -14 $(ls -t $OUT/variants-$1-*.txt | head -1)
done 2>&1 | tee $OUT/splits.txt
