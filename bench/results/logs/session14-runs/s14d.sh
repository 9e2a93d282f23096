#!/usr/bin/env bash
# Decode attention: the rewritten rows (changed) load with the counts after the wait (one L2 trip, not two):
# timing-only A/B against HEAD (5aeef9a)
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > /tmp/deps.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv
printf '#!/usr/bin/env bash\npython3 bench/tune/decode_variants.py 1 64 2>&1 | grep -v -i warn\npython3 bench/tune/decode_variants.py 1 2>&1 | grep -v -i warn\npython3 bench/tune/decode_variants.py 1 2>&1 | grep -v -i warn\n' > build/runs/dec14d.sh
scripts/ab_build.sh run bash build/runs/dec14d.sh
echo "=== NEW"; cat $OUT/ab-new.txt; echo "=== BASE"; cat $OUT/ab-base.txt
