"""Dense attention benchmarks, run as the rulebook docs/BENCHMARKS.md prescribes.

    python -m blackwell_sparsek.bench --suite seed|long [--out bench/results]
                                      [--peers ours,sdpa-flash,sdpa-cudnn] [--quick]

Each case is timed for every peer in the same process, with fresh random-normal inputs, and checked
once against PyTorch's math SDPA in float64. Writes <out>/<suite>-<gpu>-<stamp>.{json,md,png}.
Nothing here touches CUDA at import time, so the helpers can be imported and tested on a CPU.
"""
import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

PEERS = ("ours", "sdpa-flash", "sdpa-cudnn")
RATIO_PEERS = ("sdpa-cudnn", "sdpa-flash")
OTHER_LIBS = ("flash_attn_interface", "flashinfer")
CHECK_BUDGET = 2 ** 31          # max B*Hq*Sq*Skv for the float64 reference (chunked along queries)
REF_CHUNK_ELEMS = 2 ** 27       # score elements per reference chunk (1 GiB in float64)
TIMED_REGION = ("eager: CUDA events recorded right before and right after each Python call, so "
                "the region holds the whole call (argument checks, output allocation done inside "
                "the call through PyTorch's caching allocator, kernel launch(es) and the kernels); "
                "calls are issued back to back without a host sync, so host overhead counts only "
                "where it exceeds GPU time. Input allocation and the sdpa_kernel backend context "
                "are outside. graph: the same call captured once per input copy in a CUDAGraph; "
                "the region holds one replay (kernel time without Python launch overhead).")


# ---------------------------------------------------------------- cases and FLOPs
def make_case(suite, B, S, Hq, Hkv, D, causal, dtype):
    name = f"B{B}-S{S}-Hq{Hq}-Hkv{Hkv}-D{D}-{'causal' if causal else 'full'}"
    return dict(suite=suite, name=name, B=B, Sq=S, Skv=S, Hq=Hq, Hkv=Hkv, D=D, causal=causal,
                dtype=dtype)


def suite_cases(suite, quick=False):
    """The rulebook's shapes; --quick keeps their form at fewer/smaller sizes."""
    if suite == "seed":
        heads = (8, 32) if quick else (8, 16, 32, 64, 96, 128)
        return [make_case(suite, 16, 512, h, h, 64, False, "float16") for h in heads]
    if suite == "long":
        tokens, lens = (8192, (1024, 4096)) if quick else (32768, (1024, 4096, 16384, 32768))
        return [make_case(suite, tokens // s, s, 32, hkv, 128, causal, "bfloat16")
                for hkv in (32, 8) for causal in (False, True) for s in lens]
    raise ValueError(f"unknown suite {suite!r}")


def attention_flops(B, Hq, Sq, Skv, D, causal):
    """Forward FLOPs 4*B*Hq*Sq*K_avg*D; K_avg = Skv, or (Skv+1)/2 when causal (Sq == Skv)."""
    if causal and Sq != Skv:
        raise ValueError("the causal FLOP count is defined for Sq == Skv only")
    k_avg = (Skv + 1) / 2 if causal else Skv
    return 4 * B * Hq * Sq * k_avg * D


def case_flops(case):
    c = case
    return attention_flops(c["B"], c["Hq"], c["Sq"], c["Skv"], c["D"], c["causal"])


def check_slice(case):
    """(batches, kv heads) kept for the float64 check: the last ones, whole if within budget."""
    B, Hq, Hkv, Sq, Skv = case["B"], case["Hq"], case["Hkv"], case["Sq"], case["Skv"]
    per_batch = Hq * Sq * Skv
    if B * per_batch <= CHECK_BUDGET:
        return B, Hkv
    if per_batch <= CHECK_BUDGET:
        return CHECK_BUDGET // per_batch, Hkv
    group = Hq // Hkv
    return 1, max(1, min(Hkv, CHECK_BUDGET // (group * Sq * Skv)))


# ---------------------------------------------------------------- peers
def peer_call(peer, case):
    """(fn(q, k, v) -> BSHD out, context manager factory held around all of this peer's work)."""
    causal = case["causal"]
    if peer == "ours":
        import blackwell_sparsek as bsk  # lazy: the extension may be absent on this machine
        return (lambda q, k, v: bsk.attention(q, k, v, causal=causal)), contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION,
               "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[peer]
    extra = {"enable_gqa": True} if case["Hkv"] != case["Hq"] else {}

    def fn(q, k, v):  # BSHD storage, BHSD views for SDPA; the transposes are free views
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=causal, **extra)
        return out.transpose(1, 2)
    return fn, (lambda: sdpa_kernel(backend))


def reason_of(exc, caught=()):
    msg = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    notes = [str(w.message).strip().splitlines()[0][:200] for w in caught if str(w.message).strip()]
    return msg + (f" (warnings: {' | '.join(notes[:3])})" if notes else "")


def other_libraries():
    """FlashAttention-3 / FlashInfer are noted, not timed (the rulebook: only if installable)."""
    out = {}
    for mod in OTHER_LIBS:
        try:
            m = importlib.import_module(mod)
            out[mod] = f"installed {getattr(m, '__version__', '')}, not timed by this script"
        except ModuleNotFoundError:
            out[mod] = "not installed"
        except Exception as exc:
            out[mod] = f"import failed: {reason_of(exc)}"
    return out


# ---------------------------------------------------------------- timing
def gpu_warmup(seconds=0.5):
    """Half a second of matrix products before the first case, so that case is not timed while
    the GPU's clocks are still ramping up from idle (the per-case warm-up is shorter)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def time_calls(calls, quick=False):
    """Warm up (>= 5 calls and >= 100 ms), then CUDA events around each call, rotating copies."""
    min_calls, min_s = (2, 0.02) if quick else (5, 0.1)
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - t0 < min_s:
        calls[n % len(calls)]()
        torch.cuda.synchronize()
        n += 1
    est_ms = (time.perf_counter() - t0) * 1e3 / n
    if quick:
        reps = 5
    else:
        reps = 5 if est_ms > 50 else max(20, min(200, int(1000 / max(est_ms, 1e-3))))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for i, (start, end) in enumerate(ev):
        start.record()
        calls[i % len(calls)]()
        end.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in ev]
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                reps=reps, warmup_calls=n)


def capture_graphs(fn, copies):
    """One CUDAGraph per input copy (after side-stream warm-up); returns replay callables."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in copies[:3]:
            fn(*c)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    replays, pool = [], None
    for c in copies:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            out = fn(*c)
        pool = g.pool()
        replays.append(lambda g=g, out=out: g.replay())  # the static output lives with its graph
    return replays


def n_copies(case, l2_bytes):
    """Input copies so the rotated (q, k, v, out) set is >= 4x L2, capped for memory."""
    el = torch.empty((), dtype=getattr(torch, case["dtype"])).element_size()
    B, D = case["B"], case["D"]
    ws = el * B * D * (2 * case["Sq"] * case["Hq"] + 2 * case["Skv"] * case["Hkv"])
    want = max(1, math.ceil(4 * l2_bytes / ws))
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(want, 64, int(0.3 * free) // ws)), ws


def make_inputs(case, copies, seed, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, case["dtype"])
    shp_q = (case["B"], case["Sq"], case["Hq"], case["D"])
    shp_kv = (case["B"], case["Skv"], case["Hkv"], case["D"])
    return [tuple(torch.randn(s, generator=gen, device=device, dtype=dt)
                  for s in (shp_q, shp_kv, shp_kv)) for _ in range(copies)]


# ---------------------------------------------------------------- correctness
def math_sdpa(q, k, v, causal, dtype):
    """PyTorch math SDPA in `dtype` on BSHD tensors, chunked along queries (rows independent)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    chunk = max(1, min(Sq, REF_CHUNK_ELEMS // (B * H * Skv)))
    outs = []
    with sdpa_kernel(SDPBackend.MATH):
        for a in range(0, Sq, chunk):
            qc, mask = q[:, :, a:a + chunk], None
            if causal:  # bottom-right aligned; Sq == Skv in these suites
                rows = torch.arange(a, a + qc.shape[2], device=q.device)[:, None] + (Skv - Sq)
                mask = torch.arange(Skv, device=q.device)[None, :] <= rows
            outs.append(F.scaled_dot_product_attention(qc, k, v, attn_mask=mask))
    return torch.cat(outs, 2).transpose(1, 2)


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def reference(case, q, k, v):
    """Float64 reference and the same-dtype math baseline on the check slice of copy 0."""
    b, hkv = check_slice(case)
    hq = hkv * (case["Hq"] // case["Hkv"])
    q, k, v = q[-b:, :, -hq:], k[-b:, :, -hkv:], v[-b:, :, -hkv:]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be real fp32
    try:
        ref = math_sdpa(q, k, v, case["causal"], torch.float64)
        base = rel_err(math_sdpa(q, k, v, case["causal"], q.dtype), ref)
        seed = case["suite"] == "seed"
        ref32 = math_sdpa(q, k, v, case["causal"], torch.float32) if seed else None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    where = dict(batches=f"[{case['B'] - b}, {case['B']})", q_heads=f"[{case['Hq'] - hq}, "
                 f"{case['Hq']})", full=(b == case["B"] and hkv == case["Hkv"]))
    return dict(ref=ref, ref32=ref32, baseline_err=base, b=b, hq=hq, where=where)


def check_output(out, refs):
    o = out[-refs["b"]:, :, -refs["hq"]:]
    err = rel_err(o, refs["ref"])
    limit = 2 * refs["baseline_err"] + 1e-6
    res = dict(rel_err=err, math_same_dtype_rel_err=refs["baseline_err"], limit=limit,
               checked=refs["where"], rel_err_ok=bool(err <= limit))
    if refs["ref32"] is not None:
        res["allclose_fp32_ok"] = bool(torch.allclose(o.float(), refs["ref32"], rtol=1e-3,
                                                      atol=2e-3))
    res["pass"] = res["rel_err_ok"] and res.get("allclose_fp32_ok", True)
    return res


# ---------------------------------------------------------------- metrics
def add_metrics(case, entry):
    """us/head and TFLOP/s for each timed mode of one peer entry."""
    fl = case_flops(case)
    for mode in ("eager", "graph"):
        m = entry.get(mode)
        if m and m.get("available"):
            m["us_per_head"] = m["median_ms"] * 1e3 / case["Hq"]
            m["tflops"] = fl / (m["median_ms"] * 1e-3) / 1e12


def add_ratios(result):
    """speedup_vs[X] = median(X) / median(this peer), same case, same mode, same run."""
    for mode in ("eager", "graph"):
        for entry in result["peers"].values():
            m = entry.get(mode)
            if not (m and m.get("available")):
                continue
            m["speedup_vs"] = {}
            for ref in RATIO_PEERS:
                r = result["peers"].get(ref, {}).get(mode)
                if r and r.get("available"):
                    m["speedup_vs"][ref] = r["median_ms"] / m["median_ms"]


# ---------------------------------------------------------------- one case
def timed_mode(make_calls, quick):
    """Time one mode; a failure (e.g. graph capture refused) makes the mode unavailable."""
    try:
        return dict(available=True, **time_calls(make_calls(), quick))
    except Exception as exc:
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return dict(available=False, reason=reason_of(exc))


def run_case(case, peers, idx, l2_bytes, quick):
    copies, ws = n_copies(case, l2_bytes)
    inputs = make_inputs(case, copies, seed=1000 + idx)
    refs = reference(case, *inputs[0])
    result = dict(case=case, flops=case_flops(case), input_copies=copies,
                  rotated_bytes=copies * ws, l2_bytes=l2_bytes, peers={})
    for peer in peers:
        entry = result["peers"][peer] = dict(available=False)
        try:
            fn, ctx = peer_call(peer, case)
        except Exception as exc:  # e.g. the extension is not built
            entry["reason"] = reason_of(exc)
            continue
        with ctx():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = fn(*inputs[0])
                    torch.cuda.synchronize()
                except Exception as exc:
                    entry["reason"] = reason_of(exc, caught)
                    continue
            entry["available"] = True
            try:
                entry["correctness"] = check_output(out, refs)
            except Exception as exc:  # wrong shape, dtype, ...
                entry["correctness"] = {"pass": False, "error": reason_of(exc)}
            del out
            entry["eager"] = timed_mode(lambda: [(lambda c=c: fn(*c)) for c in inputs], quick)
            entry["graph"] = timed_mode(lambda: capture_graphs(fn, inputs), quick)
        add_metrics(case, entry)
        torch.cuda.empty_cache()
    add_ratios(result)
    return result


# ---------------------------------------------------------------- environment
def _cmd(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def capture_env():
    dev = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(dev)
    env = dict(gpu=props.name, sm_count=props.multi_processor_count,
               l2_bytes=getattr(props, "L2_cache_size", None),
               cuda=torch.version.cuda, torch=torch.__version__,
               cudnn=torch.backends.cudnn.version(), python=sys.version.split()[0],
               date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    smi = _cmd(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,driver_version",
                "--format=csv,noheader"])
    env["nvidia_smi"] = smi
    fields = [f.strip() for f in smi.splitlines()[0].split(",")] if smi else []
    env["sm_clock"], env["sm_clock_max"], env["driver"] = (fields + [None] * 3)[:3]
    root = os.path.dirname(os.path.abspath(__file__))
    env["git_commit"] = os.environ.get("BSK_GIT_COMMIT") or _cmd(
        ["git", "-C", root, "rev-parse", "HEAD"])
    dirty = _cmd(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
    env["git_dirty"] = None if dirty is None else bool(dirty)
    try:
        import blackwell_sparsek as bsk
        env["blackwell_sparsek"] = getattr(bsk, "__version__", "unknown")
    except Exception as exc:
        env["blackwell_sparsek"] = f"import failed: {reason_of(exc)}"
    return env


def gpu_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


# ---------------------------------------------------------------- writers
def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def _checked(where):
    if not where:
        return "n/a"
    return "full" if where.get("full") else f"b{where['batches']} hq{where['q_heads']}"


def render_markdown(report):
    env, rows, fails, missing = report["env"], [], [], []
    for r in report["results"]:
        for peer, e in r["peers"].items():
            if not e.get("available"):
                missing.append(f"- {r['case']['name']} / {peer}: unavailable: {e.get('reason')}")
                continue
            ea, ga = e.get("eager", {}), e.get("graph", {})
            sv = ea.get("speedup_vs", {})
            c = e.get("correctness", {})
            ok = "PASS" if c.get("pass") else "**FAIL**"
            if not c.get("pass"):
                fails.append(f"{r['case']['name']} / {peer}")
            if not ga.get("available"):
                missing.append(f"- {r['case']['name']} / {peer}: graph mode unavailable: "
                               f"{ga.get('reason')}")
            rows.append("| " + " | ".join([
                r["case"]["name"], peer, _fmt(ea.get("median_ms"), ".4f"),
                _fmt(ea.get("us_per_head"), ".2f"), _fmt(ea.get("tflops"), ".1f"),
                _fmt(sv.get("sdpa-cudnn"), ".2f"), _fmt(sv.get("sdpa-flash"), ".2f"),
                _fmt(ga.get("median_ms"), ".4f"), _fmt(ga.get("tflops"), ".1f"),
                _fmt(c.get("rel_err"), ".2e"), _fmt(c.get("limit"), ".2e"),
                _checked(c.get("checked")), ok]) + " |")
    lines = [f"# `{report['suite']}` suite: {env.get('gpu')}", ""]
    if report.get("quick"):
        lines += ["**QUICK SMOKE RUN: reduced sizes and reps, not quotable.**", ""]
    if fails:
        lines += [f"**CORRECTNESS FAILURES ({len(fails)}): {', '.join(fails)}**", ""]
    lines += [f"GPU {env.get('gpu')}, SM clock {env.get('sm_clock')} at start and "
              f"{env.get('sm_clock_after_run')} right after the run "
              f"(max {env.get('sm_clock_max')}), driver {env.get('driver')}, "
              f"CUDA {env.get('cuda')}, PyTorch {env.get('torch')}, "
              f"cuDNN {env.get('cudnn')}, commit {env.get('git_commit')}"
              f"{' (dirty)' if env.get('git_dirty') else ''}, {env.get('date_utc')}.", "",
              f"Headline: **{report['method']['headline']}**. Timed region: "
              f"{report['method']['timed_region']}", "",
              "x cudnn / x flash = that peer's eager median / this row's (> 1: this row faster). "
              "rel err vs float64 math SDPA; limit = 2x PyTorch math SDPA in the input dtype.", "",
              "| case | peer | eager ms | us/head | TFLOP/s | x cudnn | x flash | graph ms | "
              "graph TFLOP/s | rel err | limit | checked on | check |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"] + rows
    if missing:
        lines += ["", "Unavailable:"] + missing
    others = report.get("other_libraries", {})
    if others:
        lines += ["", "Other libraries: " + ", ".join(f"{k}: {v}" for k, v in others.items())]
    return "\n".join(lines) + "\n"


def write_plot(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the plot")
        return False
    peers = [p for p in PEERS if any(p in r["peers"] for r in report["results"])]

    def val(r, p, key):
        e = r["peers"].get(p, {})
        return e.get("eager", {}).get(key) if e.get("available") else None
    fig, ax = plt.subplots(figsize=(10, 5))
    res = report["results"]
    if report["suite"] == "seed":
        for p in peers:
            pts = [(r["case"]["Hq"], val(r, p, "us_per_head")) for r in res]
            pts = [pt for pt in pts if pt[1] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ax.set_xlabel("heads H (B=16, S=512, D=64, fp16)")
        ax.set_ylabel("us/head (eager, whole call)")
    else:
        width = 0.8 / max(1, len(peers))
        for i, p in enumerate(peers):
            ys = [val(r, p, "tflops") or 0.0 for r in res]
            ax.bar([j + i * width for j in range(len(res))], ys, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(res))])
        ax.set_xticklabels([r["case"]["name"] for r in res], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("TFLOP/s (eager, whole call)")
    quick = " (QUICK, not quotable)" if report.get("quick") else ""
    ax.set_title(f"{report['suite']}: {report['env'].get('gpu')}, "
                 f"{report['env'].get('date_utc')}{quick}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_outputs(report, out_dir, stamp):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{report['suite']}-{gpu_slug(report['env'].get('gpu', ''))}-"
                                 f"{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    md = render_markdown(report)
    with open(base + ".md", "w") as f:
        f.write(md)
    plotted = write_plot(report, base + ".png")
    return base, md, plotted


def env_line(env):
    """One line naming what a suite ran on (the header of the SparseK suites' tables)."""
    return (f"commit {env.get('git_commit')}, {env.get('date_utc')}, torch {env.get('torch')}, "
            f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, SM clock after run "
            f"{env.get('sm_clock_after_run')}")


def save_suite(report, out_dir, render, plot=None):
    """Notes the SM clock after the run in report["env"], then writes
    <out_dir>/<suite>-<gpu>-<stamp>.json and .md (rendered by `render`) and, given `plot`, .png.
    Returns the markdown."""
    smi = _cmd(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader"])
    report["env"]["sm_clock_after_run"] = smi.splitlines()[0].strip() if smi else None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{report['suite']}-{gpu_slug(report['env'].get('gpu', ''))}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    md = render(report)
    with open(base + ".md", "w") as f:
        f.write(md)
    if plot is not None:
        plot(report, base + ".png")
    return md


# ---------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m blackwell_sparsek.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", required=True, choices=("seed", "long"))
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer sizes and reps")
    args = ap.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in args.peers if p not in PEERS]
    if bad or not args.peers:
        ap.error(f"unknown peer(s) {bad}; choose from {','.join(PEERS)}")
    return args


def method_info(quick):
    low = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    return dict(
        headline="eager", timed_region=TIMED_REGION,
        warmup="2 calls and 20 ms (quick)" if quick else ">= 5 calls and >= 100 ms",
        reps="5 (quick)" if quick else "median of 20..200 (about 1 s); 5 when a call is > 50 ms",
        rotation="input copies so that (q,k,v,out) bytes >= 4x L2; at most 64 copies and 30% of "
                 "free memory; one copy when a single set is already >= 4x L2",
        flops="4*B*Hq*Sq*K_avg*D, K_avg = Skv, or (Skv+1)/2 when causal",
        speedup_vs="median(X) / median(this row), same case, mode and run; > 1: this row faster",
        correctness="rel err vs float64 math SDPA on the checked slice (last batches/heads of the "
                    "timed output) <= 2x that of math SDPA in the input dtype + 1e-6; seed also "
                    "allclose(out, fp32 math SDPA, rtol=1e-3, atol=2e-3). Math SDPA in fp16/bf16 "
                    f"with low-precision reduction: {low}")


def suite_parser(module, doc):
    """The command line every suite module's main starts from: its usage text and --out."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join("bench", "results"))
    return ap


def no_gpu():
    """True, said on stderr, when there is no CUDA GPU to benchmark on (main then returns 2)."""
    if torch.cuda.is_available():
        return False
    print("no CUDA GPU: benchmarks need one", file=sys.stderr)
    return True


def main(argv=None):
    args = parse_args(argv)
    if no_gpu():
        return 2
    env = capture_env()
    l2 = env["l2_bytes"] or 50 * 2 ** 20
    cases = suite_cases(args.suite, args.quick)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    report = dict(suite=args.suite, quick=args.quick, quotable=not args.quick, env=env,
                  method=method_info(args.quick), peers=args.peers,
                  other_libraries=other_libraries(), results=[])
    gpu_warmup()
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case['name']}", file=sys.stderr, flush=True)
        report["results"].append(run_case(case, args.peers, i, l2, args.quick))
    # The clock read at start is usually the idle one; this one is read right after the last
    # timed case, while the GPU is still at its working clock.
    smi = _cmd(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader"])
    env["sm_clock_after_run"] = smi.splitlines()[0].strip() if smi else None
    base, md, plotted = write_outputs(report, args.out, stamp)
    print(md)
    print(f"wrote {base}.json, {base}.md" + (f", {base}.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
