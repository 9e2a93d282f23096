"""One graph of 4 decode steps (B=1, sparsek-decode settings, 4 caches), replayed 3 times, under the
decode-trace.patch build: the kernels stamp globaltimer per CTA / group and a dump kernel prints the
stamps after each step (BSK_TRACE_DELAY_NS delays the attention's early loads). trace_an.py summarises.
"""
import os, sys, subprocess, re, statistics
import torch
from blackwell_sparsek.bench_decode import rotated_caches

L = 131072
def run():
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    pairs = rotated_caches(B, L, l2)
    for c, x in pairs:
        c.step(*x)
    torch.cuda.synchronize()
    print("MARK warm", flush=True)
    # one graph of 4 steps on 4 caches (the layers mode), replayed 3 times
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for c, x in pairs[:4]:
            c.step(*x)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for c, x in pairs[:4]:
            c.step(*x)
    torch.cuda.synchronize()
    print("MARK captured", flush=True)
    for i in range(3):
        g.replay()
        torch.cuda.synchronize()
        print(f"MARK replay {i}", flush=True)

if __name__ == "__main__":
    run()
