"""Fold A/B in one binary: BSK_SPARSEK_FOLD=1 (default) vs 0, interleaved; fused-kernel time
(torch.profiler, median of 5) and whole-call time (CUDA events, median), sparsek-prefill inputs."""
import os, statistics, sys
import torch
from torch.profiler import ProfilerActivity, profile
import blackwell_sparsek as bsk
from blackwell_sparsek.bench_sparsek import K, W, inputs

def kernel_us(fn, reps=5):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps): fn()
        torch.cuda.synchronize()
    t = [e.device_time for e in prof.events() if e.device_type.name == "CUDA" and "sparsek_fwd_sm90" in e.name]
    return statistics.median(t)

def call_ms(fn, reps):
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    fn(); torch.cuda.synchronize()
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)

for S in [int(x) for x in sys.argv[1:]] or [131072, 32768]:
    q, k, v, u = inputs(S, 0)
    fn = lambda: bsk.sparsek_attention(q, k, v, u, K, W, gate="key_value")
    outs = {}
    for f in ("1", "0"):
        os.environ["BSK_SPARSEK_FOLD"] = f
        outs[f] = fn().float()
    d = (outs["1"] - outs["0"]).abs().max().item()
    print(f"S={S} max |fold - nofold| = {d:.3e}", flush=True)
    reps = 30 if S >= 131072 else 100
    rows = []
    for rnd in range(int(os.environ.get("ROUNDS", "3"))):
        for f in ("1", "0"):
            os.environ["BSK_SPARSEK_FOLD"] = f
            rows.append((f, kernel_us(fn), call_ms(fn, reps)))
    for f in ("1", "0"):
        ks = [r[1] for r in rows if r[0] == f]; cs = [r[2] for r in rows if r[0] == f]
        print(f"S={S} fold={f} kernel us {' '.join(f'{x:.0f}' for x in ks)}  call ms {' '.join(f'{x:.3f}' for x in cs)}", flush=True)
    k1 = statistics.mean(r[1] for r in rows if r[0] == "1"); k0 = statistics.mean(r[1] for r in rows if r[0] == "0")
    c1 = statistics.mean(r[2] for r in rows if r[0] == "1"); c0 = statistics.mean(r[2] for r in rows if r[0] == "0")
    print(f"S={S} fold/nofold kernel {k1/k0:.4f}  call {c1/c0:.4f}", flush=True)
    os.environ.pop("BSK_SPARSEK_FOLD", None)
