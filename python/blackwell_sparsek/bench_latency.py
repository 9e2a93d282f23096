"""The `latency` suite of docs/BENCHMARKS.md: one small call at a time on an idle GPU.

    python -m blackwell_sparsek.bench_latency [--out bench/results] [--reps 400] [--breakdown]

Shapes: B=1, Sq=Skv=S in {1, 128}, H=8, D in {64, 128}, fp16, non-causal. Each repetition
synchronizes the device (so nothing is queued), then times one call with the host clock: `host`
is the time until the call returns, `total` the time until a synchronize after it returns (the
call plus its kernels). The peers take turns inside every repetition, so they share the GPU's
and the host's state; medians (and 90th percentiles) over the repetitions.

Rows: `ours` (`blackwell_sparsek.attention`, BSHD, what a FlashAttention user calls), `ours-sdpa`
(`blackwell_sparsek.sdpa`, BHSD, the drop-in for torch's), `sdpa-flash` and `sdpa-cudnn`
(torch's SDPA with that backend forced; the backend context is entered before the clock starts
and left after it stops). With --breakdown, the layers of our call are timed the same way: the torch op, the
CUDA implementation behind it (which the front door calls directly when nothing watches
calls, ops.direct_call_ok), the output allocation, the DLPack capsules and the C++ call.
"""
import contextlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import blackwell_sparsek as bsk

from . import _C, ops
from .bench import capture_env, env_line, gpu_warmup, math_sdpa, no_gpu, rel_err, save_suite, suite_parser

SHAPES = [(S, D) for S in (1, 128) for D in (64, 128)]
B, H = 1, 8


def peer_fns(q, k, v):
    """name -> (fn() -> BSHD out, context factory entered around each of that peer's calls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return {
        "ours": (lambda: bsk.attention(q, k, v), contextlib.nullcontext),
        "ours-sdpa": (lambda: bsk.sdpa(qh, kh, vh).transpose(1, 2), contextlib.nullcontext),
        "sdpa-flash": (lambda: F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2),
                       lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
        "sdpa-cudnn": (lambda: F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2),
                       lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION)),
    }


def breakdown_fns(q, k, v):
    """The layers of our call, outermost first (host time is what they differ in)."""
    from torch.utils.dlpack import to_dlpack as dl

    op = torch.ops.blackwell_sparsek.attention_fwd_nograd
    stream = ops.stream_of(q)
    out, lse = ops._outputs(q, k, v)

    def c_call():  # capsules are single-use, so they are made per call, outside the clock
        caps = [dl(t) for t in (q, k, v, out, lse)]
        t0 = time.perf_counter_ns()
        _C.attention_forward(*caps, False, None, stream)
        return time.perf_counter_ns() - t0

    return {
        "front door (blackwell_sparsek.attention)": lambda: bsk.attention(q, k, v),
        "torch op (attention_fwd_nograd)": lambda: op(q, k, v, False, None),
        "CUDA implementation (ops.attention_cuda)": lambda: ops.attention_cuda(q, k, v, False, None),
        "direct-call check (ops.direct_call_ok)": lambda: ops.direct_call_ok(q, k, v),
        "outputs (empty_like + new_empty)": lambda: ops._outputs(q, k, v),
        "5 DLPack capsules": lambda: [dl(t) for t in (q, k, v, out, lse)],
        "current stream (ops.stream_of)": lambda: [ops.stream_of(q)],
        "_C.attention_forward (capsules ready)": c_call,
    }


def time_round_robin(fns, reps):
    """{name: {"host": [ns], "total": [ns]}} for {name: fn or (fn, context factory)}; the fns
    take turns inside every repetition. A context is entered before the clock starts and left
    after it stops. A fn that returns an int reports its own host time (ns)."""
    samples = {n: {"host": [], "total": []} for n in fns}
    for r in range(reps + 20):
        for name, fc in fns.items():
            fn, ctx = fc if isinstance(fc, tuple) else (fc, contextlib.nullcontext)
            with ctx():
                torch.cuda.synchronize()
                t0 = time.perf_counter_ns()
                inner = fn()
                t1 = time.perf_counter_ns()
                torch.cuda.synchronize()
                t2 = time.perf_counter_ns()
            if r < 20:
                continue  # warm-up: allocator pools, cuDNN plans, lazy module loading
            host = inner if type(inner) is int else t1 - t0
            samples[name]["host"].append(host)
            samples[name]["total"].append(t2 - t0)
    return samples


def summarize(ns):
    s = sorted(ns)
    return dict(median_us=statistics.median(s) / 1e3, p90_us=s[int(0.9 * (len(s) - 1))] / 1e3)


def run_shape(S, D, reps, breakdown, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, generator=gen, device="cuda", dtype=torch.float16)
               for _ in range(3))
    ref = math_sdpa(q, k, v, False, torch.float64)
    limit = 2 * rel_err(math_sdpa(q, k, v, False, torch.float16), ref) + 1e-6
    rows = []
    fns = peer_fns(q, k, v)
    timed = {}
    for name, (fn, ctx) in fns.items():
        try:
            with ctx():
                err = rel_err(fn(), ref)
            timed[name] = (fn, ctx)
            rows.append(dict(peer=name, rel_err=err, limit=limit, ok=bool(err <= limit)))
        except Exception as exc:  # a peer that cannot run this shape says why
            rows.append(dict(peer=name, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
    samples = time_round_robin(timed, reps)
    for row in rows:
        if row["peer"] in samples:
            row["host"] = summarize(samples[row["peer"]]["host"])
            row["total"] = summarize(samples[row["peer"]]["total"])
    layers = []
    if breakdown:
        bs = time_round_robin(breakdown_fns(q, k, v), reps)
        layers = [dict(layer=n, host=summarize(s["host"])) for n, s in bs.items()]
    return dict(B=B, S=S, H=H, D=D, dtype="float16", causal=False, rows=rows, breakdown=layers)


def render(report):
    lines = [f"# `latency` suite: {report['env'].get('gpu')}", "", env_line(report["env"]), "",
             "B=1, Sq=Skv=S, H=8, fp16, non-causal; one call at a time on an idle GPU "
             f"(synchronize before each), {report['reps']} repetitions, peers taking turns; "
             "host = until the call returns, total = until the GPU is done; microseconds, "
             "median (p90).", "",
             "| S | D | peer | host us | total us | rel err (limit) |",
             "|---:|---:|---|---:|---:|---|"]
    for r in report["results"]:
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {r['S']} | {r['D']} | {row['peer']} | - | - | {row['error']} |")
                continue
            h, t = row["host"], row["total"]
            lines.append(f"| {r['S']} | {r['D']} | {row['peer']} | {h['median_us']:.1f} "
                         f"({h['p90_us']:.1f}) | {t['median_us']:.1f} ({t['p90_us']:.1f}) | "
                         f"{row['rel_err']:.2e} ({row['limit']:.2e}){'' if row['ok'] else ' FAIL'} |")
    for r in report["results"]:
        if r["breakdown"]:
            lines += ["", f"Our call's layers at S={r['S']}, D={r['D']} (host us, median (p90)):", ""]
            lines += [f"- {b['layer']}: {b['host']['median_us']:.1f} ({b['host']['p90_us']:.1f})"
                      for b in r["breakdown"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = suite_parser("blackwell_sparsek.bench_latency", __doc__)
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--breakdown", action="store_true", help="also time the layers of our call")
    args = ap.parse_args(argv)
    if no_gpu():
        return 2
    report = dict(suite="latency", reps=args.reps, env=capture_env(), results=[])
    gpu_warmup(0.2)
    for i, (S, D) in enumerate(SHAPES):
        report["results"].append(run_shape(S, D, args.reps, args.breakdown, seed=100 + i))
    print(save_suite(report, args.out, render))
    failed = [(r["S"], r["D"], row["peer"]) for r in report["results"] for row in r["rows"]
              if row["peer"].startswith("ours") and not row.get("ok", False)]
    if failed:
        print(f"FAILED accuracy or did not run: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
