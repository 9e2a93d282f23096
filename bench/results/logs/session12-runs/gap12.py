"""Where the SparseK call's time outside kernels goes: whole call (CUDA events, bench method) with
and without the mid-call sync (BSK_DIAG_NOSYNC), kernel sums, and a CPU+CUDA profiler timeline."""
import json, os, statistics, sys
import torch
from torch.profiler import ProfilerActivity, profile
import blackwell_sparsek as bsk
from blackwell_sparsek.bench import time_calls
from blackwell_sparsek.bench_sparsek import K, W, inputs
out = sys.argv[1]
for S in (131072, 32768):
    q, k, v, u = inputs(S, 0)
    call = lambda: bsk.sparsek_attention(q, k, v, u, K, W, gate="key_value")
    def nosync():
        os.environ["BSK_DIAG_NOSYNC"] = "1"
        try:
            return call()
        finally:
            del os.environ["BSK_DIAG_NOSYNC"]
    for name, fn in (("normal", call), ("nosync", nosync), ("normal again", call), ("nosync again", nosync)):
        t = time_calls([fn])
        print(f"S={S} {name}: median {t['median_ms']:.3f} ms min {t['min_ms']:.3f} reps {t['reps']}")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            call()
        torch.cuda.synchronize()
    prof.export_chrome_trace(f"{out}/trace-{S}.json")
    ev = sorted([e for e in prof.events() if e.device_type.name == "CUDA"], key=lambda e: e.time_range.start)
    tot = sum(e.time_range.end - e.time_range.start for e in ev)
    span = ev[-1].time_range.end - ev[0].time_range.start
    print(f"S={S} profiler: 3 calls, kernel sum {tot/3:.1f} us/call, first-to-last span {span/3:.1f} us/call")
    for a, b in zip(ev, ev[1:]):
        gap = b.time_range.start - a.time_range.end
        if gap > 3:
            print(f"   gap {gap:8.1f} us  after {a.name[:50]}  before {b.name[:50]}")
