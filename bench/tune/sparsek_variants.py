"""Where the fused SparseK kernel's time goes: the same sparsek-prefill inputs (default S=32768)
under variants that switch parts of the work off, plus the dense Hopper kernel on a problem of the
same CTA count and key blocks per CTA. Kernel durations from torch.profiler, median of 5 calls.

    python3 bench/tune/sparsek_variants.py [S] [name filter]

With a filter, only the variants whose name contains it run, one call each (for Nsight Compute).

Rows: key_value twice on persistent CTAs (A) and twice with a CTA per tile (B, the same kernel under
BSK_SPARSEK_PERSISTENT=0), value / none (gates), window-only (k=0, w=k+w: no list, no per-element
selection), dense non-causal Skv = 26 blocks (TMA loads, no gathers), dense causal S. Ends with the
attention kernel's time per variant against the dense non-causal one and the A/B means, the
same-run ratios to quote.
"""
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import blackwell_sparsek as bsk
from blackwell_sparsek.bench_sparsek import K, W, inputs

S = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
q, k, v, u = inputs(S, 0)


def kernel_us(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    per = {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        name = e.name.split("(")[0].split("<")[0][-40:]
        per.setdefault(name, []).append(e.device_time)
    return {n: statistics.median(t) for n, t in per.items() if len(t) >= reps}


def one_cta_per_tile(fn):
    """The fused kernel with a CTA per tile instead of persistent CTAs (the same kernel)."""
    def run():
        os.environ["BSK_SPARSEK_PERSISTENT"] = "0"
        try:
            return fn()
        finally:
            del os.environ["BSK_SPARSEK_PERSISTENT"]
    return run


skv = 26 * 128
kv = lambda: bsk.sparsek_attention(q, k, v, u, K, W, gate="key_value")  # noqa: E731
variants = {
    # A/B twice, interleaved: run-to-run clock drift on these GPUs is several percent.
    "sparsek key_value (A: persistent)": kv,
    "sparsek key_value (B: CTA per tile)": one_cta_per_tile(kv),
    "sparsek key_value (A again)": kv,
    "sparsek key_value (B again)": one_cta_per_tile(kv),
    "sparsek value": lambda: bsk.sparsek_attention(q, k, v, u, K, W, gate="value"),
    "sparsek none": lambda: bsk.sparsek_attention(q, k, v, u, K, W, gate="none"),
    "sparsek window-only (k=0, w=k+w)": lambda: bsk.sparsek_attention(q, k, v, u, 0, K + W),
    f"dense non-causal Skv={skv}": lambda: bsk.attention(q, k[:, :skv], v[:, :skv]),
    f"dense causal S={S}": lambda: bsk.attention(q, k, v, causal=True),
}
if len(sys.argv) > 2:
    for name, fn in variants.items():
        if sys.argv[2] in name:
            fn()
    torch.cuda.synchronize()
    sys.exit(0)
print(f"S={S} B=1 Hq=32 Hkv=8 D=128 bf16, k={K} w={W}; kernel us (median of 5)")
print("| variant | kernel | us |")
print("|---|---|---:|")
main_us = {}  # the attention kernel's time per variant (the fused SparseK or the dense kernel)
for name, fn in variants.items():
    for kern, us in sorted(kernel_us(fn).items(), key=lambda x: -x[1]):
        print(f"| {name} | {kern} | {us:.1f} |")
        if "sparsek_fwd" in kern or "dense_fwd" in kern:
            main_us[name] = us

# The same-run comparisons worth quoting (absolute times drift between runs; ratios less so).
anchor = main_us.get(f"dense non-causal Skv={skv}")
a = [main_us[n] for n in main_us if "(A" in n]
b = [main_us[n] for n in main_us if "(B" in n]
print()
print("| attention kernel | us | / dense non-causal (same tiles and blocks) |")
print("|---|---:|---:|")
for name, us in main_us.items():
    print(f"| {name} | {us:.1f} | {us / anchor:.3f} |" if anchor else f"| {name} | {us:.1f} | |")
if a and b:
    print(f"\nA/B: persistent {statistics.mean(a):.1f} us, CTA per tile {statistics.mean(b):.1f} us "
          f"({statistics.mean(b) / statistics.mean(a):.3f}x)")
