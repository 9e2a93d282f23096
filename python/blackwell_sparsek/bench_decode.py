"""The `sparsek-decode` suite of docs/BENCHMARKS.md.

    python -m blackwell_sparsek.bench_decode [--out bench/results] [--batches 1,64] [--context 131072]

Hq=32, Hkv=8, D=128, bf16, k=2048, w=1024, gate key_value, one new token per sequence at logical
context L. Ours: one decode step of SparseKCache (append the new K/V/score, then attend), on a
cache built by a prefill of L tokens (random scores with the paper's recency slope; the prefill's
K/V are one random row per (sequence, KV head) broadcast along L, since a step's cost depends on
the cached rows, not on where they came from). Peers, in the same process: sdpa-cudnn and
sdpa-flash decoding (Sq = 1) over a full L-token K/V cache, and our dense attention on the same
cache ("ours-dense": the decode kernel behind bsk.attention when Sq = 1). Eager: CUDA events around each
Python call, back to back; graph: one CUDA graph replay per step (its GPU time includes the
host's launch of the graph where the step is shorter than that); layers: one graph of one step
per layer (ours: per cache; peers: 8 calls), the replay time over the steps: the GPU time of a
step inside a model's decode graph. Ours rotates over enough caches (layers) that the set is
>= 4x L2, so no step reads a cache left in L2 by the previous one. GB/s counts the bytes a step must read: the cached K/V rows in use and the candidate scores
(ours), the whole K/V cache (peers); the copy bandwidth (a 2 GiB device copy, read + write bytes
over time) is measured in the same run. Correctness: a reduced problem against the float64
reference. Writes <out>/sparsek-decode-<gpu>-<stamp>.*.
"""
import sys

import torch
import torch.nn.functional as F

from .bench import capture_env, capture_graphs, env_line, gpu_warmup, no_gpu, rel_err, save_suite, suite_parser, time_calls

HQ, HKV, D, K, W = 32, 8, 128, 2048, 1024


def copy_bandwidth():
    n = 1 << 30  # 2 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = time_calls([lambda: b.copy_(a)])
    del a, b
    torch.cuda.empty_cache()
    return 2 * 2 * n / (t["median_ms"] * 1e-3) / 1e9


def make_cache(B, L, seed):
    import blackwell_sparsek as bsk
    g = torch.Generator(device="cuda").manual_seed(seed)
    k1 = torch.randn(B, 1, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v1 = torch.randn(B, 1, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    u = (torch.randn(B, HKV, L, device="cuda", generator=g)
         + 1e-4 * torch.arange(L, device="cuda").float())
    cache = bsk.SparseKCache.from_prefill(k1.expand(B, L, HKV, D), v1.expand(B, L, HKV, D), u,
                                          k_budget=K, window=W, score_capacity=16 * K)
    return cache


def step_inputs(B, seed, L):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, 1, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, 1, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, 1, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g)
    u = torch.randn(B, HKV, 1, device="cuda", generator=g) + 1e-4 * L
    return q, k, v, u


def bytes_read(cache):
    c = cache.counts.long()
    rows = c[..., 0].clamp(max=W) + c[..., 2]
    kv = (rows * D * 2 * 2).sum().item()
    cand = (c[..., 1] * 12).sum().item() + (rows * 4).sum().item()
    return kv + cand


def graph_calls(fns):
    """One CUDA graph per call (bench.capture_graphs: side-stream warm-up, shared pool)."""
    return capture_graphs(lambda f: f(), [(f,) for f in fns])


def layers_ms(fns):
    """Median ms per call of one CUDA graph that makes every call of fns in turn."""
    def all_calls():
        for f in fns:
            f()
    return time_calls(graph_calls([all_calls]))["median_ms"] / len(fns)


def rotated_caches(B, L, l2):
    """(cache, step inputs) pairs, one per layer, enough that their caches are >= 4x L2 (at most
    16): no step reads a cache the previous one left in L2."""
    pairs = []
    while not pairs or (len(pairs) * pairs[0][0].nbytes < 4 * l2 and len(pairs) < 16):
        pairs.append((make_cache(B, L, seed=len(pairs)), step_inputs(B, 101 + len(pairs), L)))
    return pairs


def peer_call(name, q, kc, vc):
    """One dense decoding call of peer `name` on q [B, Hq, 1, D] and a BHSD K/V cache."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import blackwell_sparsek as bsk
    if name == "ours-dense":  # our dense attention, Sq = 1, on the same BHSD cache (BSHD views)
        return lambda: bsk.attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2))
    backend = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa-flash": SDPBackend.FLASH_ATTENTION}[name]

    def fn():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
    return fn


def run_ours(B, L, l2):
    pairs = rotated_caches(B, L, l2)
    caches = [c for c, _ in pairs]
    fns = [lambda c=c, x=x: c.step(*x) for c, x in pairs]
    per_cache = caches[0].nbytes
    for c in caches:
        c.check()
    nbytes = bytes_read(caches[0])
    eager = time_calls(fns)
    graph = time_calls(graph_calls(fns))
    layers = layers_ms(fns)
    for c in caches:
        c.check()
    return dict(peer="ours", eager_ms=eager["median_ms"], graph_ms=graph["median_ms"], layers_ms=layers,
                bytes=nbytes, caches=len(caches), cache_bytes_per_seq_per_layer=per_cache // B,
                candidates_mean=caches[0].counts[..., 1].float().mean().item())


def run_peer(name, B, L):
    g = torch.Generator(device="cuda").manual_seed(1)
    kc = torch.empty(B, HKV, L, D, device="cuda", dtype=torch.bfloat16).normal_(generator=g)
    vc = torch.empty_like(kc).normal_(generator=g)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    fn = peer_call(name, q, kc, vc)
    try:
        eager = time_calls([fn])
        graph = time_calls(graph_calls([fn]))
        return dict(peer=name, eager_ms=eager["median_ms"], graph_ms=graph["median_ms"],
                    layers_ms=layers_ms([fn] * 8),
                    bytes=2 * kc.numel() * 2)
    except Exception as exc:  # reported, not hidden
        return dict(peer=name, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        del kc, vc
        torch.cuda.empty_cache()


def check_small():
    """A reduced problem: 4 decode steps after a 3000-token prefill against the reference."""
    import blackwell_sparsek as bsk
    g = torch.Generator(device="cuda").manual_seed(5)
    B, L, T, k, w = 2, 3000, 4, 256, 128
    q = torch.randn(B, L + T, HQ, D, device="cuda", generator=g).bfloat16()
    kk = torch.randn(B, L + T, HKV, D, device="cuda", generator=g).bfloat16()
    vv = torch.randn(B, L + T, HKV, D, device="cuda", generator=g).bfloat16()
    u = torch.randn(B, HKV, L + T, device="cuda", generator=g) + 1e-4 * torch.arange(L + T, device="cuda")
    c = bsk.SparseKCache.from_prefill(kk[:, :L], vv[:, :L], u[:, :, :L], k_budget=k, window=w)
    outs = [c.step(q[:, t:t + 1], kk[:, t:t + 1], vv[:, t:t + 1], u[:, :, t:t + 1])
            for t in range(L, L + T)]
    out = torch.cat(outs, 1).cpu().double()
    ref = bsk.reference.sparsek_attention(q[:, L:].cpu(), kk.cpu(), vv.cpu(), u.cpu(), k, w).double()
    err = rel_err(out, ref)
    rnd = rel_err(ref.bfloat16().double(), ref)
    return dict(B=B, L=L, steps=T, k=k, w=w, rel_err=err, rel_err_rounding=rnd,
                ok=err <= 2 * rnd + 8e-3)


def run(batches, L, peers):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for B in batches:
        print(f"B={B}", file=sys.stderr, flush=True)
        res = [run_ours(B, L, l2)]
        torch.cuda.empty_cache()
        res += [run_peer(p, B, L) for p in peers]
        base = {r["peer"]: r for r in res if "error" not in r}
        for r in res:
            r["B"], r["L"] = B, L
            if "error" in r:
                continue
            r["eager_GBps"] = r["bytes"] / (r["eager_ms"] * 1e-3) / 1e9
            r["graph_GBps"] = r["bytes"] / (r["graph_ms"] * 1e-3) / 1e9
        o = base["ours"]
        for p in peers:
            if p in base and p != "ours-dense":
                for mode in ("eager", "graph", "layers"):
                    o[f"speedup_{mode}_vs_{p}"] = base[p][f"{mode}_ms"] / o[f"{mode}_ms"]
        rows += res
    return rows


def render(report):
    env = report["env"]
    bw = report["copy_GBps"]
    lines = [f"# `sparsek-decode` suite: {env.get('gpu')}", "",
             f"{env_line(env)}; device copy bandwidth {bw:.0f} GB/s", "",
             "Hq=32 Hkv=8 D=128 bf16 k=2048 w=1024 key_value; one decode step (ours: cache "
             "append + attention; peers: attention over the full L-token cache); median ms.", "",
             "| B | L | peer | eager ms | graph ms | layers ms | GB/s (graph) | % of copy bw | ours faster (eager / graph / layers) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['B']} | {r['L']} | {r['peer']} | error: {r['error'][:80]} | | | | | |")
            continue
        sp = ", ".join(f"{r[f'speedup_eager_vs_{p}']:.1f}x / {r[f'speedup_graph_vs_{p}']:.1f}x / "
                       f"{r[f'speedup_layers_vs_{p}']:.1f}x vs {p}"
                       for p in ("sdpa-cudnn", "sdpa-flash") if f"speedup_eager_vs_{p}" in r)
        lines.append(f"| {r['B']} | {r['L']} | {r['peer']} | {r['eager_ms']:.4f} | "
                     f"{r['graph_ms']:.4f} | {r['layers_ms']:.4f} | {r['graph_GBps']:.0f} | {100 * r['graph_GBps'] / bw:.0f}% | {sp} |")
    ours = [r for r in report["results"] if r.get("peer") == "ours" and "error" not in r]
    if ours:
        lines += ["", f"cache: {ours[0]['cache_bytes_per_seq_per_layer'] / 2**20:.2f} MiB per sequence "
                      f"per layer (independent of L); mean candidate scores kept "
                      f"{ours[0]['candidates_mean']:.0f}"]
    c = report["check"]
    lines += ["", f"correctness (B={c['B']}, L={c['L']}, {c['steps']} steps, k={c['k']}, w={c['w']}): "
                  f"rel err {c['rel_err']:.2e}, rounding alone {c['rel_err_rounding']:.2e}: "
                  f"{'ok' if c['ok'] else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = suite_parser("blackwell_sparsek.bench_decode", __doc__)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--peers", default="sdpa-cudnn,sdpa-flash,ours-dense")
    args = ap.parse_args(argv)
    if no_gpu():
        return 2
    env = capture_env()
    gpu_warmup()
    report = dict(suite="sparsek-decode", env=env, check=check_small(), copy_GBps=copy_bandwidth(),
                  results=run([int(b) for b in args.batches.split(",")], args.context,
                              [p for p in args.peers.split(",") if p]))
    md = save_suite(report, args.out, render)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
