"""select_kernel (walks + key lists in one grid) time by lists per block (BSK_SPARSEK_LISTS_PER_BLOCK),
one binary, interleaved; torch.profiler median of 5 calls."""
import os, statistics, torch
from torch.profiler import ProfilerActivity, profile
import blackwell_sparsek as bsk
from blackwell_sparsek.bench_sparsek import K, W, inputs

def us(fn, key):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5): fn()
        torch.cuda.synchronize()
    return statistics.median(e.device_time for e in prof.events() if e.device_type.name == "CUDA" and key in e.name)

for S in (32768, 131072, 8192):
    q, k, v, u = inputs(S, 0)
    fn = lambda: bsk.sparsek_attention(q, k, v, u, K, W, gate="key_value")
    res = {}
    for rnd in range(2):
        for g in ("1", "2", "4", "default"):
            if g == "default": os.environ.pop("BSK_SPARSEK_LISTS_PER_BLOCK", None)
            else: os.environ["BSK_SPARSEK_LISTS_PER_BLOCK"] = g
            res.setdefault(g, []).append(us(fn, "select_kernel"))
    print(f"S={S} select_kernel us by lists per block: " + "  ".join(f"{g}: {' '.join(f'{x:.0f}' for x in t)}" for g, t in res.items()), flush=True)
