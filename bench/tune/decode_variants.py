"""Decode-step pieces timed on their own (sparsek-decode settings), GPU time per call.

    [DENSE_PEERS=1] python3 bench/tune/decode_variants.py [B ...]

Per batch: the attention alone (SparseKCache.attend), the cache append alone, and the fused
step (append + attention), each over caches rotated as in bench_decode (the set >= 4x L2, one
per layer of a model) and captured as ONE CUDA graph of one call per cache: the median replay
time over the number of calls is the GPU time per call, without the host's launch time (a graph
per call, as bench_decode times it, measures that launch too where the kernels are shorter).
DENSE_PEERS=1 adds dense decoding over k + w rows (the bytes of the SparseK cache) by our dense
kernel, sdpa-cudnn and sdpa-flash, timed the same way: what reading those bytes costs a peer.
"""
import os
import sys

import torch

from blackwell_sparsek.bench import time_calls
from blackwell_sparsek.bench_decode import graph_calls, make_cache, step_inputs

L = 131072


def main():
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for B in [int(x) for x in sys.argv[1:]] or [1, 64]:
        caches, xs = [], []
        while not caches or (len(caches) * caches[0].nbytes < 4 * l2 and len(caches) < 16):
            caches.append(make_cache(B, L, seed=len(caches)))
            xs.append(step_inputs(B, 100 + len(caches), L))
        pairs = list(zip(caches, xs))
        res = {}
        for name, fn in (("attend", lambda c, x: c.attend(x[0])),
                         ("append", lambda c, x: c.append(x[1], x[2], x[3])),
                         ("step", lambda c, x: c.step(*x))):
            def all_layers(fn=fn, pairs=pairs):
                for c, x in pairs:
                    fn(c, x)
            res[name] = time_calls(graph_calls([all_layers]))["median_ms"] * 1e3 / len(pairs)
        for c in caches:
            c.check()
        # The same bytes as a dense cache of k + w rows: our dense decode and the peers' on it.
        if os.environ.get("DENSE_PEERS"):
            import torch.nn.functional as F
            from torch.nn.attention import SDPBackend, sdpa_kernel
            import blackwell_sparsek as bsk
            rows = caches[0].k_cache.shape[2]
            kvs = [(torch.randn(B, 8, rows, 128, device="cuda", dtype=torch.bfloat16),
                    torch.randn(B, 8, rows, 128, device="cuda", dtype=torch.bfloat16)) for _ in pairs]
            q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
            for name, be in (("ours-dense", None), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                             ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
                def all_layers(be=be, kvs=kvs):
                    for kc, vc in kvs:
                        if be is None:
                            bsk.attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2))
                        else:
                            with sdpa_kernel([be]):
                                F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
                res[name] = time_calls(graph_calls([all_layers]))["median_ms"] * 1e3 / len(kvs)
            del kvs
        print(f"B={B:3d} " + "  ".join(f"{k} {v:6.1f} us" for k, v in res.items()), flush=True)
        del caches, xs, pairs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
