"""The selection's chunk plan (kernels::sparsek::ChunkPlan: `late` values of m per late chunk,
`travel` sorted positions per early chunk, and optionally select_init's bisection steps) against
the init and walk kernels' durations, on the sparsek-prefill inputs. Each plan runs twice (A/B
interleaved against clock drift); outputs are compared with the default plan's (they must agree
to rounding: the plan only cuts the walk).

    python3 bench/tune/select_plan_sweep.py [S,...] [late:travel[:bisect],...]
"""
import os
import statistics
import sys

import torch

import blackwell_sparsek as bsk
from blackwell_sparsek.bench_sparsek import K, W, inputs, selection_share

lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "32768,131072").split(",")]
plans = (sys.argv[2] if len(sys.argv) > 2 else
         "default,256:2048,512:2048,1024:2048,512:8192,1024:8192,2048:8192").split(",")
KERNELS = ("select_init", "select_kernel", "sparsek_fwd")  # select_kernel: the walks + the key lists

for S in lengths:
    q, k, v, u = inputs(S, 0)
    call = lambda: bsk.sparsek_attention(q, k, v, u, K, W, gate="key_value")  # noqa: E731
    os.environ.pop("BSK_SELECT_PLAN", None)
    ref = call()
    print(f"S={S} k={K} w={W}: kernel us (median of 3 profiled calls, two passes)")
    print("| plan | pass | " + " | ".join(KERNELS) + " | selection | max |diff| vs default |")
    print("|---|---|" + "---:|" * (len(KERNELS) + 2))
    for rep in range(2):
        for plan in plans:
            if plan == "default":
                os.environ.pop("BSK_SELECT_PLAN", None)
            else:
                os.environ["BSK_SELECT_PLAN"] = plan.replace(":", ",")
            runs = [selection_share(call) for _ in range(3)]
            per = {n: statistics.median(next((t for name, t in r[2].items() if n in name), 0.0)
                                        for r in runs) for n in KERNELS}
            sel = statistics.median(r[0] for r in runs)
            diff = (call().float() - ref.float()).abs().max().item()
            print(f"| {plan} | {rep} | " + " | ".join(f"{per[n]:.0f}" for n in KERNELS) +
                  f" | {sel:.0f} | {diff:.3g} |", flush=True)
    os.environ.pop("BSK_SELECT_PLAN", None)
    torch.cuda.empty_cache()
