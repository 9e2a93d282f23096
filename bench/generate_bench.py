#!/usr/bin/env python3
"""Greedy generation with a random-weight Llama: sdpa vs the dense "blackwell_sparsek" backend vs
SparseK attention with SparseKGenerationCache.

For each prompt length and configuration: prefill time (generate() start to the first token's
logits), decode tokens/s (the remaining new tokens over the time after that first token), peak
GPU memory (torch.cuda.max_memory_allocated, reset before each run) and the cache's bytes.
Configurations:

- ``sdpa``: attn_implementation="sdpa", generate()'s default DynamicCache;
- ``bsk-dense``: attn_implementation="blackwell_sparsek" (blackwell_sparsek.hf), DynamicCache;
- ``sparsek``: convert_to_sparsek(k_budget, window) and SparseKGenerationCache.

All three share the same random weights; the first two must generate nearly the same tokens (the
table says how many leading tokens match sdpa's), the third is a different attention. An error
or OOM is recorded for its (configuration, prompt) and the run goes on.

    python bench/generate_bench.py                       # H100: prompts 8192 and 32768
    python bench/generate_bench.py --device cpu --tiny   # seconds on a CPU: checks the code paths

Writes <out>/generate-<gpu>-<stamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback

import torch

CONFIGS = ("sdpa", "bsk-dense", "sparsek")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(tiny: bool, layers: int, max_len: int):
    from transformers import LlamaConfig
    if tiny:
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
    else:
        sizes = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=32000)
    # No EOS: every run generates exactly the requested number of tokens.
    return LlamaConfig(**sizes, max_position_embeddings=max_len, eos_token_id=None,
                       bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)


def build_model(cfg, device, dtype):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):  # initialize on the device: minutes faster than init-then-move
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def _cmd(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def capture_env(device):
    import transformers
    import blackwell_sparsek as bsk
    env = dict(device=str(device), torch=torch.__version__, transformers=transformers.__version__,
               blackwell_sparsek=getattr(bsk, "__version__", None), python=platform.python_version(),
               date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               commit=os.environ.get("BSK_GIT_COMMIT") or _cmd(["git", "-C", REPO, "rev-parse",
                                                                "HEAD"]))
    dirty = _cmd(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
    env["dirty"] = None if env["commit"] is None else bool(dirty)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda,
                   driver=_cmd(["nvidia-smi", "--query-gpu=driver_version",
                                "--format=csv,noheader"]))
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-") or "cpu"


class Clock:
    """A logits processor that notes when each step's logits exist (after a device sync) and, on
    CUDA, splits the peak memory into the prefill's and the decode's."""

    def __init__(self, sync, cuda):
        self.sync, self.cuda, self.times, self.prefill_peak = sync, cuda, [], None

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        if self.cuda and len(self.times) == 1:
            self.prefill_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return scores


def cache_bytes(cache):
    if cache is None:
        return None
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def prepare(name, model, args):
    """Puts the model in configuration `name`; returns a function making a fresh cache (or None
    for generate()'s default)."""
    if name == "sdpa":
        model.set_attn_implementation("sdpa")
        return lambda: None
    if name == "bsk-dense":
        import blackwell_sparsek.hf  # noqa: F401  (registers "blackwell_sparsek")
        model.set_attn_implementation("blackwell_sparsek")
        return lambda: None
    from blackwell_sparsek.hf_sparsek import SparseKGenerationCache, convert_to_sparsek
    if getattr(model.config, "_attn_implementation", None) != "blackwell_sparsek_sparsek":
        convert_to_sparsek(model, args.k_budget, args.window, args.gate)
    return lambda: SparseKGenerationCache(model)


def generate_once(model, ids, new_tokens, make_cache, sync, cuda=False):
    from transformers import LogitsProcessorList
    clock = Clock(sync, cuda)
    cache = make_cache()
    kwargs = {} if cache is None else {"past_key_values": cache}
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0,
                             logits_processor=LogitsProcessorList([clock]),
                             return_dict_in_generate=True, **kwargs)
    sync()
    end = time.perf_counter()
    decode_peak = torch.cuda.max_memory_allocated() if cuda else None
    return out, start, clock, end, decode_peak


def run_one(name, model, ids, args, make_cache, device):
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row = dict(config=name, prompt=ids.shape[1], batch=ids.shape[0], new_tokens=args.new_tokens)
    try:
        if args.simulate_oom == name:
            raise torch.cuda.OutOfMemoryError("simulated by --simulate-oom")
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated() if cuda else None
        best = None
        for _ in range(args.repeats):
            out, start, clock, end, decode_peak = generate_once(model, ids, args.new_tokens,
                                                               make_cache, sync, cuda)
            times = clock.times
            cache = out.past_key_values
            if hasattr(cache, "check"):
                cache.check()  # a score-capacity overflow would have written NaN
            steps = out.sequences.shape[1] - ids.shape[1]
            run = dict(prefill_s=times[0] - start, decode_s=end - times[0], generated=steps,
                       cache_bytes=cache_bytes(cache),
                       tokens=out.sequences[0, ids.shape[1]:].tolist())
            if cuda:
                peak = max(clock.prefill_peak, decode_peak)
                run.update(weights_bytes=base, peak_bytes=peak, peak_over_weights_bytes=peak - base,
                           prefill_peak_bytes=clock.prefill_peak, decode_peak_bytes=decode_peak,
                           decode_peak_over_weights_bytes=decode_peak - base)
            del out, cache  # nothing of this run may stay allocated during the next
            if best is None or run["decode_s"] < best["decode_s"]:
                best = run
        steps, decode = best["generated"], best["decode_s"]
        best.update(decode_tokens_per_s=(steps - 1) / decode if steps > 1 and decode > 0 else None,
                    decode_ms_per_token=1e3 * decode / (steps - 1) if steps > 1 else None)
        row.update(best)
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"OOM: {str(e).splitlines()[0] if str(e) else 'out of memory'}"
    except Exception as e:  # noqa: BLE001  (recorded, the other configurations still run)
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=6)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def _fmt(x, spec, scale=1.0):
    return "n/a" if x is None else format(x * scale, spec)


def render(report):
    env = report["env"]
    lines = [f"# Greedy generation: {env.get('gpu') or env.get('cpu')}", "",
             f"{report['model']}; batch {report['batch']}, {report['new_tokens']} new tokens; "
             f"SparseK k_budget={report['k_budget']}, window={report['window']}, "
             f"gate={report['gate']!r}.", "",
             f"torch {env['torch']}, transformers {env['transformers']}, blackwell_sparsek "
             f"{env['blackwell_sparsek']}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
             f"commit {env['commit']}{' (dirty)' if env.get('dirty') else ''}, "
             f"{env['date_utc']}.", "",
             "Prefill: generate() start to the first token's logits. Decode: the other new tokens "
             "over the time after that. Peak: torch.cuda.max_memory_allocated over the whole run, "
             "weights included; decode peak: over the decode phase only, less what was allocated "
             "before the run (weights, prompt). Cache: the cache's tensors at the end. Match: "
             "leading generated tokens equal to sdpa's.",
             "",
             "| prompt | config | prefill s | decode tok/s | ms/token | peak GiB "
             "| decode peak over weights GiB | cache MiB | match | error |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        lines.append(
            f"| {r['prompt']} | {r['config']} | {_fmt(r.get('prefill_s'), '.3f')} "
            f"| {_fmt(r.get('decode_tokens_per_s'), '.1f')} "
            f"| {_fmt(r.get('decode_ms_per_token'), '.2f')} "
            f"| {_fmt(r.get('peak_bytes'), '.2f', 2**-30)} "
            f"| {_fmt(r.get('decode_peak_over_weights_bytes'), '.3f', 2**-30)} "
            f"| {_fmt(r.get('cache_bytes'), '.2f', 2**-20)} "
            f"| {r.get('match_sdpa', 'n/a')} | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def leading_match(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="a minuscule model and prompts (a CPU check of the code paths)")
    p.add_argument("--prompts", default=None,
                   help="comma-separated prompt lengths (default 8192,32768; --tiny 48,96)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (--tiny 6)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--k-budget", type=int, default=None, help="default 2048 (--tiny 16)")
    p.add_argument("--window", type=int, default=None, help="default 1024 (--tiny 8)")
    p.add_argument("--gate", default="key_value")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--repeats", type=int, default=1, help="runs per point; the fastest decode "
                   "is kept")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--simulate-oom", default=None, help=argparse.SUPPRESS)  # tests the recording
    args = p.parse_args(argv)

    tiny = args.tiny
    prompts = [int(x) for x in (args.prompts or ("48,96" if tiny else "8192,32768")).split(",")]
    args.new_tokens = args.new_tokens or (6 if tiny else 128)
    args.k_budget = args.k_budget if args.k_budget is not None else (16 if tiny else 2048)
    args.window = args.window if args.window is not None else (8 if tiny else 1024)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: use --device cpu (with --tiny)")
    # The SparseK CPU path (float64 reference kernels, cache) needs float32 or wider.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    env = capture_env(device)
    cfg = model_config(tiny, args.layers, max(prompts) + args.new_tokens + 8)
    model = build_model(cfg, device, dtype)
    desc = (f"random-weight Llama: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, head dim "
            f"{cfg.head_dim}, vocab {cfg.vocab_size}, {str(dtype).replace('torch.', '')}, "
            f"{sum(x.numel() for x in model.parameters()) / 1e6:.0f}M parameters")
    print(desc, flush=True)
    report = dict(env=env, model=desc, batch=args.batch, new_tokens=args.new_tokens,
                  k_budget=args.k_budget, window=args.window, gate=args.gate, prompts=prompts,
                  configs=configs, repeats=args.repeats, argv=sys.argv[1:] if argv is None
                  else list(argv), results=[])

    g = torch.Generator().manual_seed(1)
    inputs = {n: torch.randint(1, cfg.vocab_size, (args.batch, n), generator=g).to(device)
              for n in prompts}
    # sparsek last: the conversion adds scorers and hooks that stay on the model.
    for name in sorted(configs, key=CONFIGS.index):
        try:
            make_cache = prepare(name, model, args)
            # Warm-up (kernel selection, allocator, lazy initialization), not recorded.
            generate_once(model, inputs[prompts[0]][:, :min(prompts[0], 64)], 2, make_cache,
                          torch.cuda.synchronize if device.type == "cuda" else (lambda: None),
                          device.type == "cuda")
        except Exception as e:  # noqa: BLE001
            for n in prompts:
                report["results"].append(dict(config=name, prompt=n, batch=args.batch,
                                              new_tokens=args.new_tokens,
                                              error=f"setup: {type(e).__name__}: {e}",
                                              traceback=traceback.format_exc(limit=6)))
            print(f"{name}: setup failed: {e}", flush=True)
            continue
        for n in prompts:
            row = run_one(name, model, inputs[n], args, make_cache, device)
            report["results"].append(row)
            print(f"{name} prompt={n}: " + ", ".join(
                f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                for k in ("prefill_s", "decode_tokens_per_s", "peak_bytes",
                          "decode_peak_over_weights_bytes", "cache_bytes", "error") if k in row),
                flush=True)

    ref = {r["prompt"]: r.get("tokens") for r in report["results"] if r["config"] == "sdpa"}
    for r in report["results"]:
        if r.get("tokens") is not None and ref.get(r["prompt"]) is not None:
            r["match_sdpa"] = leading_match(r["tokens"], ref[r["prompt"]])

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"generate-{slug(env.get('gpu'))}-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(render(report))
    print(render(report))
    print(f"wrote {base}.json and {base}.md", flush=True)
    return report


if __name__ == "__main__":
    main()
