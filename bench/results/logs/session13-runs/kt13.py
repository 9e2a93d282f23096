"""Kernel times for an A/B of the Hopper consumers (scripts/ab_build.sh): the fused SparseK kernel
(sparsek-prefill inputs) and the dense sm90 kernel at long/seed shapes; torch.profiler, median of
5 calls, 3 rounds."""
import statistics
import torch
from torch.profiler import ProfilerActivity, profile
import blackwell_sparsek as bsk
from blackwell_sparsek.bench_sparsek import K, W, inputs

def kernel_us(fn, key, reps=5):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps): fn()
        torch.cuda.synchronize()
    return statistics.median(e.device_time for e in prof.events()
                             if e.device_type.name == "CUDA" and key in e.name)

cases = {}
for S in (131072, 32768):
    q, k, v, u = inputs(S, 0)
    cases[f"sparsek S={S}"] = (lambda q=q, k=k, v=v, u=u: bsk.sparsek_attention(q, k, v, u, K, W, gate="key_value"), "sparsek_fwd_sm90")
def dense(B, S, H, D, causal, dt):
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dt, generator=g) for _ in range(3))
    return (lambda: bsk.attention(q, k, v, causal=causal)), "dense_fwd_sm90"
cases["dense B1 S32768 H32 D128 causal"] = dense(1, 32768, 32, 128, True, torch.bfloat16)
cases["dense B8 S4096 H32 D128 full"] = dense(8, 4096, 32, 128, False, torch.bfloat16)
cases["dense B32 S1024 H32 D128 causal"] = dense(32, 1024, 32, 128, True, torch.bfloat16)
cases["dense B16 S512 H96 D64 full fp16"] = dense(16, 512, 96, 64, False, torch.float16)
res = {n: [] for n in cases}
for rnd in range(3):
    for n, (fn, key) in cases.items():
        res[n].append(kernel_us(fn, key))
for n, t in res.items():
    print(f"{n:36s} kernel us {' '.join(f'{x:9.1f}' for x in t)}  mean {statistics.mean(t):9.1f}", flush=True)
