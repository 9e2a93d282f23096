"""One SparseK prefill call at the sparsek-prefill shape (default S=32768), for Nsight Compute:
    ncu --clock-control none -k regex:sparsek --launch-count 3 python3 bench/tune/sparsek_profile.py
"""
import sys

import torch

import blackwell_sparsek as bsk
from blackwell_sparsek.bench_sparsek import K, W, inputs

S = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
q, k, v, u = inputs(S, 0)
bsk.sparsek_attention(q, k, v, u, K, W)
torch.cuda.synchronize()
