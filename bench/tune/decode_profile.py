"""Kernel durations of one SparseK decode step (sparsek-decode settings), by torch.profiler.

    python3 bench/tune/decode_profile.py [B ...]

Per kernel name: mean duration (us) over the profiled steps, and the step's wall time per call.
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from blackwell_sparsek.bench_decode import make_cache, step_inputs

L = 131072
for B in [int(x) for x in sys.argv[1:]] or [1, 64]:
    caches = [make_cache(B, L, seed=i) for i in range(4 if B == 1 else 1)]
    xs = [step_inputs(B, 50 + i, L) for i in range(len(caches))]
    for _ in range(5):
        for c, x in zip(caches, xs):
            c.step(*x)
    torch.cuda.synchronize()
    steps = 40
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            caches[i % len(caches)].step(*xs[i % len(xs)])
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e6
    per = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per.setdefault(e.name[:90], []).append(e.device_time)
    print(f"B={B}: wall per step {wall:.1f} us (host-bound if larger than the kernels' sum)")
    for name, ts in sorted(per.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {sum(ts) / steps:8.1f} us/step  {len(ts) / steps:4.1f}/step  {name}")
    for c in caches:
        c.check()
    print(f"  candidates kept per group: mean {caches[0].counts[..., 1].float().mean().item():.0f}, "
          f"max {caches[0].counts[..., 1].max().item()}")
    del caches
    torch.cuda.empty_cache()
