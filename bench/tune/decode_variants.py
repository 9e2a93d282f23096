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

from blackwell_sparsek.bench_decode import D, HKV, HQ, layers_ms, peer_call, rotated_caches

L = 131072


def main():
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for B in [int(x) for x in sys.argv[1:]] or [1, 64]:
        pairs = rotated_caches(B, L, l2)
        res = {}
        for name, fn in (("attend", lambda c, x: c.attend(x[0])),
                         ("append", lambda c, x: c.append(x[1], x[2], x[3])),
                         ("step", lambda c, x: c.step(*x))):
            res[name] = layers_ms([lambda c=c, x=x, fn=fn: fn(c, x) for c, x in pairs]) * 1e3
        for c, _ in pairs:
            c.check()
        # The same bytes as a dense cache of k + w rows: our dense decode and the peers' on it.
        if os.environ.get("DENSE_PEERS"):
            rows = pairs[0][0].k_cache.shape[2]
            q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            kvs = [(torch.randn(B, HKV, rows, D, device="cuda", dtype=torch.bfloat16),
                    torch.randn(B, HKV, rows, D, device="cuda", dtype=torch.bfloat16)) for _ in pairs]
            for name in ("ours-dense", "sdpa-cudnn", "sdpa-flash"):
                res[name] = layers_ms([peer_call(name, q, kc, vc) for kc, vc in kvs]) * 1e3
            del kvs
        print(f"B={B:3d} " + "  ".join(f"{k} {v:6.1f} us" for k, v in res.items()), flush=True)
        del pairs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
