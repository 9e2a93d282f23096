"""Where the SparseK / dense backward's time goes (issue 9 tuning; not a suite).

    python bench/tune/bwd_profile.py [--lengths 32768,131072] [--dense]

Calls the library directly (the forward op, then _C.sparsek_attention_backward / attention_backward),
so autograd plays no part, and prints per-kernel durations from torch.profiler beside sdpa-cudnn's
dense causal forward + backward on the same inputs (sparsek-prefill settings).
"""
import argparse
import sys

import torch
from torch.utils.dlpack import to_dlpack as dl

import blackwell_sparsek as bsk
from blackwell_sparsek import _C, ops
from blackwell_sparsek.bench import gpu_warmup, time_calls
from blackwell_sparsek.bench_sparsek import K, W, cudnn_call, inputs, selection_share


def ours(q, k, v, u, dout, dense):
    grads = [torch.empty_like(t) for t in (q, k, v)] + [torch.empty_like(u)]
    stream = torch.cuda.current_stream().cuda_stream

    def fwd_bwd():
        if dense:
            out, lse = ops.attention_fwd(q, k, v, True, None)
            _C.attention_backward(dl(q), dl(k), dl(v), dl(out), dl(lse), dl(dout), dl(grads[0]),
                                  dl(grads[1]), dl(grads[2]), True, None, stream)
        else:
            out, lse = ops.sparsek_fwd(q, k, v, u, K, W, "key_value", None)
            _C.sparsek_attention_backward(dl(q), dl(k), dl(v), dl(u), dl(out), dl(lse), dl(dout),
                                          *(dl(g) for g in grads), K, W, "key_value", None, stream)
    return fwd_bwd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--once", action="store_true", help="one call, no timing (under ncu)")
    a = ap.parse_args()
    if a.once:
        for S in map(int, a.lengths.split(",")):
            q, k, v, u = inputs(S, S)
            ours(q, k, v, u, torch.randn_like(q), a.dense)()
            torch.cuda.synchronize()
        return
    gpu_warmup()
    for S in map(int, a.lengths.split(",")):
        q, k, v, u = inputs(S, S)
        dout = torch.randn_like(q)
        f = ours(q, k, v, u, dout, a.dense)
        t = time_calls([f])["median_ms"]
        _, tot, per = selection_share(f)
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
        c = cudnn_call(qg, kg, vg)
        dt = dout.transpose(1, 2)

        def cud():
            for x in (qg, kg, vg):
                x.grad = None
            c().backward(dt)
        tc = time_calls([cud])["median_ms"]
        print(f"S={S} {'dense' if a.dense else 'sparsek'} fwd+bwd {t:.2f} ms; sdpa-cudnn dense "
              f"causal fwd+bwd {tc:.2f} ms ({tc / t:.2f}x)")
        for name, us in sorted(per.items(), key=lambda x: -x[1]):
            print(f"    {us:9.0f} us  {name}")
        sys.stdout.flush()
        del q, k, v, u, dout, qg, kg, vg
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
