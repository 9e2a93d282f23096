"""The `sparsek-train` benchmark of issue 9: forward + backward.

    python -m blackwell_sparsek.bench_train [--out bench/results] [--lengths 32768,131072]

The sparsek-prefill suite's settings (B=1, Hq=32, Hkv=8, D=128, bf16, k=2048, w=1024, gate
key_value, causal). Per length, in one process and on the same inputs, one training step of the
attention alone: the forward, then the backward of a fixed random upstream gradient, for
  - ours: ``blackwell_sparsek.sparsek_attention`` on leaves that require grad (q, k, v and u), then
    ``out.backward(dout)`` through the ops' autograd;
  - sdpa-cudnn: dense causal scaled_dot_product_attention forward + backward on cuDNN;
  - flex: torch.compile(flex_attention) with the sparsek-prefill block mask of the same key budget.
Gradients are set to None before every step so no accumulation kernel is timed. The per-kernel
split of our step comes from torch.profiler. Correctness: a reduced problem against the float64
reference backward. Writes <out>/sparsek-train-<gpu>-<stamp>.*.
"""
import sys

import torch

from .bench import capture_env, env_line, gpu_warmup, no_gpu, rel_err, save_suite, suite_parser
from .bench_sparsek import (K, W, annotate_ours, cudnn_call, flex_call, flops, inputs,
                            selection_share, time_peers)


def step(fwd, leaves, dout):
    def fn():
        for t in leaves:
            t.grad = None
        fwd().backward(dout)
    return fn


def check_small():
    """Reduced problem: our gradients against the float64 reference backward."""
    import blackwell_sparsek as bsk
    from . import _C
    S, k, w = 2048, 256, 128
    q, kk, v, u = inputs(S, 11)
    q, kk, v = q[:, :, :4].contiguous(), kk[:, :, :1].contiguous(), v[:, :, :1].contiguous()
    u = u[:, :1].contiguous()
    leaves = [t.clone().requires_grad_() for t in (q, kk, v, u)]
    dout = torch.randn_like(q)
    bsk.sparsek_attention(*leaves, k, w).backward(dout)
    cpu = [t.detach().cpu().double() for t in (q, kk, v)] + [u.cpu()]
    grads = [torch.empty_like(t) for t in cpu]
    from torch.utils.dlpack import to_dlpack as dl
    _C.sparsek_attention_backward_ref(dl(cpu[0]), dl(cpu[1]), dl(cpu[2]), dl(cpu[3]),
                                      dl(dout.cpu().double()), *(dl(g) for g in grads),
                                      k, w, "key_value", None)
    out = {}
    for name, leaf, ref in zip(("dq", "dk", "dv", "du"), leaves, grads):
        out[name] = rel_err(leaf.grad.cpu().double(), ref.double())
    return dict(S=S, k=k, w=w, Hq=4, Hkv=1, rel_err=out)


def run(lengths, peers):
    import blackwell_sparsek as bsk
    rows = []
    for S in lengths:
        print(f"S={S}", file=sys.stderr, flush=True)
        q, k, v, u = (t.requires_grad_() for t in inputs(S, S))
        dout = torch.randn_like(q)
        dout_t = dout.transpose(1, 2)  # the BHSD peers' output layout
        leaves = [q, k, v, u]
        calls = {"ours": step(lambda: bsk.sparsek_attention(q, k, v, u, K, W), leaves, dout)}
        if "sdpa-cudnn" in peers:
            calls["sdpa-cudnn"] = step(cudnn_call(q, k, v), leaves, dout_t)
        if "flex" in peers:
            try:
                calls["flex"] = step(flex_call(q, k, v, u.detach()), leaves, dout_t)
            except Exception as exc:
                rows.append(dict(S=S, peer="flex", error=f"{type(exc).__name__}: {exc}"))
        # forward + backward: 3.5x the forward's matrix products
        res = time_peers(S, calls, flops(S) * 3.5, rows)
        if "ours" in res:
            _, tot_us, per = selection_share(calls["ours"])
            print(f"  kernels (us): {per}", file=sys.stderr, flush=True)
            annotate_ours(S, rows, res, kernels_us=tot_us, kernels=per)
        del q, k, v, u, calls, leaves, dout, dout_t
        torch.cuda.empty_cache()
    return rows


def render(report):
    env = report["env"]
    lines = [f"# `sparsek-train` (forward + backward): {env.get('gpu')}", "",
             env_line(env), "",
             "B=1 Hq=32 Hkv=8 D=128 bf16 k=2048 w=1024 key_value causal; one forward + backward "
             "of the attention; median ms of CUDA-event timed steps; TFLOP/s counts 3.5x the "
             "forward's sparse matrix products.", "",
             "| S | peer | ms | TFLOP/s (sparse) | ours faster by |",
             "|---:|---|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['S']} | {r['peer']} | error: {r['error'][:80]} | | |")
            continue
        sp = ", ".join(f"{r[k]:.2f}x vs {k[11:]}" for k in r if k.startswith("speedup_vs_"))
        lines.append(f"| {r['S']} | {r['peer']} | {r['median_ms']:.3f} | "
                     f"{r['tflops_sparse']:.0f} | {sp} |")
    c = report["check"]
    errs = ", ".join(f"{k} {v:.2e}" for k, v in c["rel_err"].items())
    lines += ["", f"correctness (S={c['S']}, k={c['k']}, w={c['w']}, Hq=4, Hkv=1, bf16) vs the "
                  f"float64 reference backward: {errs}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = suite_parser("blackwell_sparsek.bench_train", __doc__)
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--peers", default="sdpa-cudnn,flex")
    args = ap.parse_args(argv)
    if no_gpu():
        return 2
    env = capture_env()
    gpu_warmup()
    report = dict(suite="sparsek-train", env=env, check=check_small(),
                  results=run([int(s) for s in args.lengths.split(",")], args.peers.split(",")))
    print(save_suite(report, args.out, render))
    return 0


if __name__ == "__main__":
    sys.exit(main())
