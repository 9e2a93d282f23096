"""The `sparsek-prefill` suite of docs/BENCHMARKS.md.

    python -m blackwell_sparsek.bench_sparsek [--out bench/results] [--lengths 8192,32768,131072]

B=1, Hq=32, Hkv=8, D=128, bf16, k=2048, w=1024, gate key_value, causal. For every length, in one
process and on the same inputs: ours (the whole call, scores given, to output), sdpa-cudnn dense
causal, and flex attention (torch.compile(flex_attention)) with a block mask of the same key
budget: per 128-query block, the blocks of its causal window band plus the 16 earlier blocks with
the largest mean score. The selection stage alone (score check, sort, thresholds, key lists) is
the sum of its kernels' durations from torch.profiler over the same call. Correctness: a reduced
problem (S=2048) against the float64 reference. Writes <out>/sparsek-prefill-<gpu>-<stamp>.*.
"""
import sys

import torch
import torch.nn.functional as F

from .bench import capture_env, env_line, gpu_warmup, no_gpu, rel_err, save_suite, suite_parser, time_calls

B, HQ, HKV, D, K, W, BLK = 1, 32, 8, 128, 2048, 1024, 128
# select_kernel runs the walks and builds the key lists (src/kernels/sparsek_select.cuh).
SELECT_KERNELS = ("encode_scores", "RadixSort", "finish_sort", "select_init", "select_kernel")


def flops(S, k=K, w=W):
    """4 * B * Hq * sum over rows of the keys each row attends (min(i+1, k+w), window first)."""
    total = 0
    for i in range(S):
        win = min(w, i + 1)
        total += win + min(k, max(0, i + 1 - w))
    return 4 * B * HQ * total * D


def inputs(S, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, S, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    # The paper's scorer shape: a learned projection plus a recency slope.
    u = (torch.randn(B, HKV, S, device="cuda", generator=g)
         + 1e-4 * torch.arange(S, device="cuda").float())
    return q, k, v, u


def flex_call(q, k, v, u):
    """flex_attention with the same budget as a block mask (the rulebook's peer)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    S = q.shape[1]
    nb = S // BLK
    blk_score = u.view(B, HKV, nb, BLK).mean(-1).mean(1)[0]  # [nb], shared by heads
    qb = torch.arange(nb, device="cuda")
    win_blocks = W // BLK
    kb = torch.arange(nb, device="cuda")
    earlier = kb[None, :] < (qb[:, None] - win_blocks)
    scores = torch.where(earlier, blk_score[None, :], torch.tensor(-float("inf"), device="cuda"))
    top = scores.topk(min(16, nb), dim=1).indices
    allowed = torch.zeros(nb, nb, dtype=torch.bool, device="cuda")
    allowed.scatter_(1, top, True)
    allowed &= earlier  # rows with fewer than 16 earlier blocks keep what exists

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & ((kj > qi - W) | allowed[qi // BLK, kj // BLK])

    bm = create_block_mask(mask_mod, None, None, S, S, device="cuda", BLOCK_SIZE=BLK,
                           _compile=True)
    fa = torch.compile(flex_attention)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: fa(qt, kt, vt, block_mask=bm, enable_gqa=True)


def cudnn_call(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def fn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    return fn


def selection_share(call):
    """Kernel durations of one call from torch.profiler: (selection us, total kernel us,
    {kernel name: us})."""
    from torch.profiler import ProfilerActivity, profile
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    sel = tot = 0.0
    per = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        dur = e.device_time if hasattr(e, "device_time") else e.cuda_time
        tot += dur
        short = e.name.split("(")[0].split("<")[0][-60:]
        per[short] = per.get(short, 0.0) + dur
        if any(s in e.name for s in SELECT_KERNELS):
            sel += dur
    return sel, tot, per


def check_small():
    import blackwell_sparsek as bsk
    S, k, w = 2048, 256, 128
    q, kk, v, u = inputs(S, 7)
    q, kk, v = q[:, :, :4].contiguous(), kk[:, :, :1].contiguous(), v[:, :, :1].contiguous()
    u = u[:, :1].contiguous()
    out = bsk.sparsek_attention(q, kk, v, u, k, w)
    ref = bsk.reference.sparsek_attention(q, kk, v, u, k, w)
    err = rel_err(out.cpu().double(), ref)
    err_round = rel_err(ref.to(torch.bfloat16).double(), ref)
    return dict(S=S, k=k, w=w, Hq=4, Hkv=1, rel_err=err, rel_err_rounding=err_round,
                ok=bool(err <= 2 * err_round + 8e-3))


def time_peers(S, calls, fl, rows):
    """Times every call of `calls` ({peer: fn}) at length S and appends one row per peer (its
    median, or the error it raised; fl: the FLOPs a call does). Returns {peer: median ms}."""
    res = {}
    for name, fn in calls.items():
        try:
            t = time_calls([fn])
        except Exception as exc:  # reported, not hidden
            rows.append(dict(S=S, peer=name, error=f"{type(exc).__name__}: {exc}"))
            continue
        res[name] = t["median_ms"]
        rows.append(dict(S=S, peer=name, median_ms=t["median_ms"], reps=t["reps"],
                         tflops_sparse=fl / t["median_ms"] / 1e9))
        print(f"  {name}: {t['median_ms']:.2f} ms", file=sys.stderr, flush=True)
    return res


def annotate_ours(S, rows, res, **extra):
    """Adds `extra` and the speedups over the timed peers to our row at length S."""
    for r in rows:
        if r["S"] == S and r["peer"] == "ours":
            r.update(extra)
            for p in ("sdpa-cudnn", "flex"):
                if p in res and "ours" in res:
                    r[f"speedup_vs_{p}"] = res[p] / res["ours"]


def run(lengths, peers):
    import blackwell_sparsek as bsk
    rows = []
    for S in lengths:
        print(f"S={S}", file=sys.stderr, flush=True)
        q, k, v, u = inputs(S, S)
        calls = {"ours": lambda: bsk.sparsek_attention(q, k, v, u, K, W)}
        if "sdpa-cudnn" in peers:
            calls["sdpa-cudnn"] = cudnn_call(q, k, v)
        if "flex" in peers:
            try:
                calls["flex"] = flex_call(q, k, v, u)
            except Exception as exc:  # reported, not hidden
                rows.append(dict(S=S, peer="flex", error=f"{type(exc).__name__}: {exc}"))
        res = time_peers(S, calls, flops(S), rows)
        sel_us, tot_us, per = selection_share(calls["ours"])
        print(f"  kernels (us): {per}", file=sys.stderr, flush=True)
        annotate_ours(S, rows, res, selection_us=sel_us, kernels_us=tot_us,
                      selection_share=sel_us / tot_us if tot_us else None, kernels=per)
        del q, k, v, u, calls
        torch.cuda.empty_cache()
    return rows


def render(report):
    env = report["env"]
    lines = [f"# `sparsek-prefill` suite: {env.get('gpu')}", "",
             env_line(env), "",
             "B=1 Hq=32 Hkv=8 D=128 bf16 k=2048 w=1024 key_value causal; median ms of CUDA-event "
             "timed calls; TFLOP/s counts the keys each row attends (k + w).", "",
             "| S | peer | ms | TFLOP/s (sparse) | ours faster by | selection us (share) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['S']} | {r['peer']} | error: {r['error'][:80]} | | | |")
            continue
        sp = ", ".join(f"{r[k]:.2f}x vs {k[11:]}" for k in r if k.startswith("speedup_vs_"))
        sel = (f"{r['selection_us']:.0f} ({100 * r['selection_share']:.1f}%)"
               if r.get("selection_share") is not None else "")
        lines.append(f"| {r['S']} | {r['peer']} | {r['median_ms']:.3f} | "
                     f"{r['tflops_sparse']:.0f} | {sp} | {sel} |")
    c = report["check"]
    lines += ["", f"correctness (S={c['S']}, k={c['k']}, w={c['w']}): rel err {c['rel_err']:.2e}, "
                  f"rounding alone {c['rel_err_rounding']:.2e}: {'ok' if c['ok'] else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def write_plot(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for peer in ("ours", "sdpa-cudnn", "flex"):
        pts = [(r["S"], r["median_ms"]) for r in report["results"]
               if r.get("peer") == peer and "median_ms" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=peer)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("S (tokens)")
    ax.set_ylabel("ms per call")
    ax.set_title(f"sparsek-prefill: {report['env'].get('gpu')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = suite_parser("blackwell_sparsek.bench_sparsek", __doc__)
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--peers", default="sdpa-cudnn,flex")
    args = ap.parse_args(argv)
    if no_gpu():
        return 2
    env = capture_env()
    gpu_warmup()
    report = dict(suite="sparsek-prefill", env=env, check=check_small(),
                  results=run([int(s) for s in args.lengths.split(",")], args.peers.split(",")))
    md = save_suite(report, args.out, render, write_plot)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
