#!/usr/bin/env bash
# A/B/A: ping-pong between the consumer warpgroups on (tree) / off / on; outputs compared bitwise.
set -uo pipefail
export BSK_WHEELS=$PWD/.whl BSK_CUDA_ARCHS=90a PYTHONUNBUFFERED=1
source scripts/deps.sh > $OUT/deps.log 2>&1
f=src/kernels/sparsek_fwd_sm90.cuh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/env.txt
n=0
for pp in true false true; do
  n=$((n+1))
  sed -i -E "s/static constexpr bool kPingPong = (true|false);/static constexpr bool kPingPong = $pp;/" $f
  install_package $OUT/pip-$n.log || exit 1
  python3 -c "
import torch, blackwell_sparsek as bsk
from blackwell_sparsek.bench_sparsek import K, W, inputs
for S in (32768, 2000):
    q, k, v, u = inputs(S, 0)
    torch.save(bsk.sparsek_attention(q, k, v, u, K if S > 4000 else 256, W if S > 4000 else 128, gate='key_value').cpu(), '$OUT/out-$n-%d.pt' % S)
"
  for S in 131072 32768; do
    echo "== pingpong=$pp S=$S"
    python3 bench/tune/sparsek_variants.py $S > $OUT/variants-$n-$S.txt 2>&1
    tail -13 $OUT/variants-$n-$S.txt | grep -E "key_value|none|window|dense non|A/B"
  done
done 2>&1 | tee $OUT/pingpong.txt
python3 -c "
import torch
for S in (32768, 2000):
    a, b, c = (torch.load('$OUT/out-%d-%d.pt' % (i, S)) for i in (1, 2, 3))
    print(S, 'on==off', torch.equal(a, b), 'on==on', torch.equal(a, c))
" | tee -a $OUT/pingpong.txt
rm -f $OUT/*.pt
