"""Design check for a parallel SparseK selection (docs/SPARSEK_GPU.md, "every m at once"): the
threshold and tau of every candidate count m computed from prefix queries over ONE sorted order,
against the float64 reference (CPU, numpy, a few seconds):

    python3 bench/tune/selection_prefix_check.py

- threshold of m: the k-th smallest of rank[0, m) (rank = position in the spec's order: larger u
  first, ties toward the larger index), compared with reference.topk_select's k-th winner;
- tau of m: a binary search over the active keys' breakpoints (u and u - 1) of
  f(t) = U + sum_band (u - t), where U, W and the band sum are prefix counts and prefix sums of
  (u - anchor) over the sorted order restricted to keys j < m (what a wavelet matrix over the
  sorted indices answers in O(log n) per query), compared with reference.sparsek_gates' tau.

The GPU would evaluate the prefix queries per m from the wavelet matrix; here they are masked
cumulative sums, whose float64 rounding is of the same kind (differences of prefix sums).
"""
import numpy as np
import torch

from blackwell_sparsek import reference as ref


def spec_order(u):
    return np.lexsort((-np.arange(len(u)), -u.astype(np.float64)))


def tau_from_prefixes(su, sj, m, k, anchor):
    act = sj < m
    cnt = np.concatenate([[0], np.cumsum(act)])
    sums = np.concatenate([[0.0], np.cumsum(np.where(act, su.astype(np.float64) - anchor, 0.0))])
    neg = -su.astype(np.float64)  # ascending, for searchsorted

    def parts(t):  # U = #{u >= t + 1}, W = #{u > t}, S = sum of u over the band, active keys
        p = np.searchsorted(neg, -t, side="left")
        p1 = np.searchsorted(neg, -(t + 1.0), side="right")
        u_cnt, w_cnt = cnt[p1], cnt[p]
        return u_cnt, w_cnt, sums[p] - sums[p1] + anchor * (w_cnt - u_cnt)

    def f(t):
        u_cnt, w_cnt, s = parts(t)
        return u_cnt + s - t * (w_cnt - u_cnt)

    au = su[act].astype(np.float64)
    bps = np.unique(np.concatenate([au, au - 1.0]))[::-1]  # breakpoints, descending
    lo, hi = 0, len(bps) - 1  # the largest breakpoint with f >= k (f falls as t rises)
    while lo < hi:
        mid = (lo + hi) // 2
        if f(bps[mid]) >= k:
            hi = mid
        else:
            lo = mid + 1
    b = bps[lo]
    up = bps[lo - 1] if lo > 0 else np.inf
    u_cnt, w_cnt, s = parts(b + 0.5 * (up - b) if np.isfinite(up) else b + 1.0)  # (b, up)
    if w_cnt > u_cnt:  # f is linear on (b, up): solve f(t) = k
        return min(max((u_cnt + s - k) / (w_cnt - u_cnt), b), up)
    return up  # f flat at k on (b, up): the largest valid tau


def scores(kind, n, g, outlier_span=0.0):
    if kind == "ties":  # many repeated values
        return (np.round(g.standard_normal(n) * 2) / 2).astype(np.float32)
    if kind == "flat":  # every key within 1 of every other: many fractional gates
        return (g.random(n) * 0.3).astype(np.float32)
    # The suite's scorer shape (N(0,1) plus a recency slope), plus rare far outliers.
    return (g.standard_normal(n) + 1e-4 * np.arange(n)
            + outlier_span * (g.random(n) < 0.001)).astype(np.float32)


def check(n, k, kind, seed, outlier_span=0.0):
    g = np.random.default_rng(seed)
    u = scores(kind, n, g, outlier_span)
    idx = spec_order(u)
    su, sj = u[idx], idx
    rank = np.empty(n, np.int64)
    rank[idx] = np.arange(n)
    worst, mismatches = 0.0, 0
    ms = sorted(set(g.integers(k + 1, n + 1, 40).tolist() + [k + 1, n]))
    for m in ms:
        kth = np.partition(rank[:m], k - 1)[k - 1]
        winners = ref.topk_select(torch.from_numpy(u[:m].copy()), k).numpy()
        mismatches += int(sj[kth] != winners[-1])
        _, tau = ref.sparsek_gates(torch.from_numpy(u[:m].copy()), k)
        worst = max(worst, abs(tau_from_prefixes(su, sj, m, k, float(su[0])) - float(tau)))
    print(f"n={n} k={k} {kind} (outliers at +{outlier_span:g}): {len(ms)} values of m, "
          f"threshold mismatches {mismatches}, max |tau - reference| {worst:.3e}")
    return mismatches == 0


if __name__ == "__main__":
    ok = [check(20000, 2048, "suite", 0), check(20000, 256, "suite", 1),
          check(20000, 2048, "suite", 2, 2.0**19), check(6000, 500, "ties", 3),
          check(6000, 500, "flat", 4)]
    raise SystemExit(0 if all(ok) else 1)
