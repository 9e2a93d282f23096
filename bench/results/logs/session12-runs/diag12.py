"""DIAG timings of the fused SparseK kernel (wrong results on purpose) at one S, same process."""
import os, statistics, sys
import torch
from torch.profiler import ProfilerActivity, profile
import blackwell_sparsek as bsk
from blackwell_sparsek.bench_sparsek import K, W, inputs
S = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
q, k, v, u = inputs(S, 0)

def kern(fn, reps=5):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    t = [e.device_time for e in prof.events() if e.device_type.name == "CUDA" and ("sparsek_fwd" in e.name or "dense_fwd" in e.name)]
    return statistics.median(t)

def with_diag(d, gate="key_value", kk=K, ww=W):
    def f():
        os.environ["BSK_DIAG"] = str(d)
        try:
            return bsk.sparsek_attention(q, k, v, u, kk, ww, gate=gate)
        finally:
            del os.environ["BSK_DIAG"]
    return f

with_diag(4)(); torch.cuda.synchronize()
with_diag(4, "none")(); torch.cuda.synchronize()
rows = [("key_value", with_diag(0)), ("key_value diag1 TMA list", with_diag(1)),
        ("key_value diag2 no mask", with_diag(2)), ("key_value diag3 TMA+no mask", with_diag(3)),
        ("key_value again", with_diag(0)), ("none", with_diag(0, "none")),
        ("none diag3 TMA+no mask", with_diag(3, "none")),
        ("window-only k=0 w=k+w", with_diag(0, "key_value", 0, K + W)),
        ("dense non-causal Skv=3328", lambda: bsk.attention(q, k[:, :3328], v[:, :3328]))]
print(f"S={S}; attention kernel us, median of 5")
for name, fn in rows:
    print(f"| {name} | {kern(fn):.1f} |")
