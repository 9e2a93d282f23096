// The SparseK decoding cache on the GPU (include/bsk/sparsek_cache.h): building it from a
// prefill and appending one token, one CTA per (sequence, KV head). The rules are those of the
// CPU implementation (reference/sparsek_cache_ref.cpp), which says why the cache stays small;
// tau comes from the shared walk (common/sparsek_tau_walk.h), one block-wide pass per piece.
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/sparsek_tau_walk.h"
#include "kernels/order_code.cuh"

namespace bsk::kernels::skcache {

using bsk::detail::TauPiece;

template <typename Elem>
struct CacheParams {
  Elem* k;  // [groups, rows, D], contiguous
  Elem* v;
  float* slot_u;  // [groups, rows]
  float* cand_u;  // [groups, cap]
  int* cand_pos;
  int* cand_row;
  double* tau;   // [groups]
  int* counts;   // [groups, 3]: tokens, cand entries, selected rows
  int* status;   // [2]
  int heads_kv, rows, head_dim, window, budget, cap;
  bool soft;
};

// A new (or prefill) K/V source: element (b, j, h, d) at base + b*sb + j*sj + h*sh + d.
template <typename Elem>
struct KVSource {
  const Elem* k;
  const Elem* v;
  int64_t k_sb, k_sj, k_sh, v_sb, v_sj, v_sh;
};

struct ScoreSource {  // float32 [B, Hkv, L]
  const float* u;
  int64_t sb, sh, sj;
  __device__ __forceinline__ float at(int b, int h, int j) const {
    return u[b * sb + h * sh + j * sj];
  }
};

// Copies one row of D elements (K and V) with 16-byte vectors; every thread of the block calls it.
template <typename Elem>
__device__ __forceinline__ void copy_row(const CacheParams<Elem>& p, int grp, int row,
                                         const Elem* k_src, const Elem* v_src) {
  const int vecs = p.head_dim / 8;
  const int64_t o = (static_cast<int64_t>(grp) * p.rows + row) * p.head_dim;
  for (int t = threadIdx.x; t < 2 * vecs; t += blockDim.x) {
    const bool is_v = t >= vecs;
    const int e = (is_v ? t - vecs : t) * 8;
    const uint4 x = *reinterpret_cast<const uint4*>((is_v ? v_src : k_src) + e);
    *reinterpret_cast<uint4*>((is_v ? p.v : p.k) + o + e) = x;
  }
}

// The worst selected entry (lowest in the spec's order) as an order key: u high, position low.
__device__ __forceinline__ unsigned long long entry_key(float u, int pos) {
  return (static_cast<unsigned long long>(sparsek::order_code(u)) << 32) |
         static_cast<unsigned int>(pos);
}

struct Scan0 {  // what the append's first pass over the entries finds
  TauPiece piece;
  unsigned long long worst;  // min key among selected entries
  int worst_at;              // its entry
  int free_at;               // first reusable entry (u <= tau, not selected)
  float zmin;
};
struct Scan0Op {
  __device__ Scan0 operator()(const Scan0& a, const Scan0& b) const {
    Scan0 r;
    r.piece = bsk::detail::tau_piece_merge(a.piece, b.piece);
    r.worst = a.worst < b.worst ? a.worst : b.worst;
    r.worst_at = a.worst < b.worst ? a.worst_at : b.worst_at;
    r.free_at = a.free_at < b.free_at ? a.free_at : b.free_at;
    r.zmin = fminf(a.zmin, b.zmin);
    return r;
  }
};
struct MinOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const { return b < a ? b : a; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const { return a < b ? b : a; }
};
struct PieceOp {
  __device__ TauPiece operator()(const TauPiece& a, const TauPiece& b) const {
    return bsk::detail::tau_piece_merge(a, b);
  }
};

// Wide blocks: the passes over the candidate entries are latency-bound at batch 1 (one block
// per KV head), so each thread should have few entries to load.
constexpr int kAppendThreads = 512;

// tau by the walk from lo (f(lo) >= k); `piece` describes the piece at lo when `have_piece`.
template <int kThreads>
__device__ double walk(const float* zu, int n, int k, double lo, TauPiece piece, bool have_piece) {
  using Reduce = cub::BlockReduce<TauPiece, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ TauPiece s_piece;
  double tau = lo;
  for (;;) {
    if (have_piece && bsk::detail::tau_piece_step(piece, k, lo, tau)) return tau;
    have_piece = true;
    TauPiece mine;
#pragma unroll 4
    for (int e = threadIdx.x; e < n; e += kThreads)
      bsk::detail::tau_piece_add(mine, static_cast<double>(zu[e]), lo);
    const TauPiece all = Reduce(tmp).Reduce(mine, PieceOp());
    if (threadIdx.x == 0) s_piece = all;
    __syncthreads();
    piece = s_piece;
    __syncthreads();
  }
}

// grid: B * Hkv. One new token per sequence: k_new/v_new [B, 1, Hkv, D], u_new [B, Hkv, 1].
template <typename Elem>
__global__ void __launch_bounds__(kAppendThreads)
    cache_append_kernel(const CacheParams<Elem> p, const KVSource<Elem> src, const ScoreSource un,
                        int batch) {
  using ReduceI = cub::BlockReduce<int, kAppendThreads>;
  using Reduce0 = cub::BlockReduce<Scan0, kAppendThreads>;
  __shared__ union {
    typename ReduceI::TempStorage ri;
    typename Reduce0::TempStorage r0;
  } tmp;
  __shared__ Scan0 s0;
  __shared__ int s_bad;

  const int grp = blockIdx.x, b = grp / p.heads_kv, h = grp % p.heads_kv;
  // Every load the step needs up front (latency, not bandwidth, bounds this kernel).
  const int status = p.status[0];
  int* cnt = p.counts + 3 * grp;
  const int pos = cnt[0], cpos = pos - p.window;
  int n = cnt[1], nsel = cnt[2];
  const double tau_old = p.tau[grp];
  const float unew = un.at(b, h, 0);
  const int64_t gbase = static_cast<int64_t>(grp) * p.rows;
  const int ring = p.window > 0 && cpos >= 0 ? cpos % p.window : 0;
  const float uc = p.window > 0 ? p.slot_u[gbase + ring] : unew;
  if (status != 0) return;  // sticky: a broken cache is left as it is
  // All or nothing: every block checks every new score, so a bad one changes no group.
  int bad = INT_MAX;
  for (int i = threadIdx.x; i < batch * p.heads_kv; i += kAppendThreads)
    if (!isfinite(un.at(i / p.heads_kv, i % p.heads_kv, 0))) bad = min(bad, i);
  bad = ReduceI(tmp.ri).Reduce(bad, MinOp());
  if (threadIdx.x == 0) s_bad = bad;
  __syncthreads();
  if (s_bad != INT_MAX) {
    if (grp == 0 && threadIdx.x == 0) {
      p.status[1] = s_bad;
      p.status[0] = 1;
    }
    return;
  }

  double tau = tau_old;
  const Elem* k_new = src.k + b * src.k_sb + h * src.k_sh;
  const Elem* v_new = src.v + b * src.v_sb + h * src.v_sh;
  float* zu = p.cand_u + static_cast<int64_t>(grp) * p.cap;
  int* zp = p.cand_pos + static_cast<int64_t>(grp) * p.cap;
  int* zr = p.cand_row + static_cast<int64_t>(grp) * p.cap;

  if (p.budget > 0 && cpos >= 0) {
    const Elem* kc = p.window > 0 ? p.k + (gbase + ring) * p.head_dim : k_new;
    const Elem* vc = p.window > 0 ? p.v + (gbase + ring) * p.head_dim : v_new;
    int take_row = -1;
    if (cpos + 1 <= p.budget) {  // at most k candidates: all selected, every gate 1
      take_row = p.window + nsel;
      if (threadIdx.x == 0) zu[n] = uc, zp[n] = cpos, zr[n] = take_row;
      ++n, ++nsel;
    } else if (!p.soft || static_cast<double>(uc) > tau_old) {
      Scan0 mine;
      mine.worst = ~0ull;
      mine.worst_at = -1;
      mine.free_at = INT_MAX;
      mine.zmin = INFINITY;
      const bool tau_known = tau_old > -INFINITY;
#pragma unroll 4
      for (int e = threadIdx.x; e < n; e += kAppendThreads) {
        const float z = zu[e];
        const int row = zr[e], zpos = zp[e];
        if (row >= 0) {
          const unsigned long long key = entry_key(z, zpos);
          if (key < mine.worst) mine.worst = key, mine.worst_at = e;
        } else if (static_cast<double>(z) <= tau_old && e < mine.free_at) {
          mine.free_at = e;
        }
        mine.zmin = fminf(mine.zmin, z);
        if (p.soft && tau_known) bsk::detail::tau_piece_add(mine.piece, static_cast<double>(z), tau_old);
      }
      const Scan0 all = Reduce0(tmp.r0).Reduce(mine, Scan0Op());
      if (threadIdx.x == 0) s0 = all;
      __syncthreads();
      const Scan0 sc = s0;
      const float u_worst = sparsek::from_order_code(static_cast<uint32_t>(sc.worst >> 32));
      const bool in = uc >= u_worst;  // ties go to the newer key
      const int worst = sc.worst_at;
      if (!p.soft) {
        if (in) {
          take_row = zr[worst];
          if (threadIdx.x == 0) zu[worst] = uc, zp[worst] = cpos;
        }
      } else {
        int at = sc.free_at;
        if (at == INT_MAX) {
          if (n == p.cap) {
            if (threadIdx.x == 0) {
              p.status[1] = grp;
              p.status[0] = 2;
            }
            return;
          }
          at = n++;
        }
        const int wrow = zr[worst];
        __syncthreads();  // every thread has read zr[worst] before it changes
        if (threadIdx.x == 0) {
          zu[at] = uc, zp[at] = cpos, zr[at] = in ? wrow : -1;
          if (in) zr[worst] = -1;
        }
        if (in) take_row = wrow;
        // tau: from the old tau, with the new score added to the piece found above; or, the
        // first time there are more than k candidates, from below every score.
        TauPiece piece = sc.piece;
        double lo = tau_old;
        if (tau_known) bsk::detail::tau_piece_add(piece, static_cast<double>(uc), lo);
        else lo = static_cast<double>(fminf(sc.zmin, uc)) - 1.0;
        __syncthreads();  // the new entry is visible to the walk's passes
        tau = walk<kAppendThreads>(zu, n, p.budget, lo, piece, tau_known);
      }
    }
    if (take_row >= 0) {
      copy_row(p, grp, take_row, kc, vc);
      if (threadIdx.x == 0) p.slot_u[gbase + take_row] = uc;
    }
  }
  __syncthreads();  // the leaving key is copied out before its ring row is overwritten
  if (p.window > 0) {
    const int row = pos % p.window;
    copy_row(p, grp, row, k_new, v_new);
    if (threadIdx.x == 0) p.slot_u[gbase + row] = unew;
  }
  if (threadIdx.x == 0) {
    cnt[0] = pos + 1;
    cnt[1] = n;
    cnt[2] = nsel;
    p.tau[grp] = tau;
  }
}

constexpr int kBuildThreads = 256;

// k-th largest 64-bit key among items [0, m) (key(j) gives item j's key; keys are distinct),
// one 8-bit digit per pass with a shared histogram.
template <class Key>
__device__ unsigned long long block_kth_largest(int m, int k, Key&& key) {
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long s_prefix;
  __shared__ int s_need;
  if (threadIdx.x == 0) s_prefix = 0, s_need = k;
  __syncthreads();
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const unsigned long long prefix = s_prefix;
    const unsigned long long high_mask = shift == 56 ? 0ull : (~0ull << (shift + 8));
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
      const unsigned long long x = key(j);
      if ((x & high_mask) == prefix) atomicAdd(&hist[(x >> shift) & 255], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int need = s_need, d = 255;
      for (; d > 0; --d) {
        if (static_cast<int>(hist[d]) >= need) break;
        need -= static_cast<int>(hist[d]);
      }
      s_need = need;
      s_prefix = prefix | (static_cast<unsigned long long>(d) << shift);
    }
    __syncthreads();
  }
  return s_prefix;
}

// grid: B * Hkv. The state a prefill of lengths[b] tokens leaves (see the CPU implementation).
template <typename Elem>
__global__ void __launch_bounds__(kBuildThreads)
    cache_prefill_kernel(const CacheParams<Elem> p, const KVSource<Elem> src, const ScoreSource us,
                         const int* lengths, int seqlen, unsigned long long* bad) {
  using ReduceP = cub::BlockReduce<TauPiece, kBuildThreads>;
  using ReduceD = cub::BlockReduce<double, kBuildThreads>;
  using ReduceF = cub::BlockReduce<float, kBuildThreads>;
  using ScanL = cub::BlockScan<long long, kBuildThreads>;
  __shared__ union {
    typename ReduceP::TempStorage rp;
    typename ReduceD::TempStorage rd;
    typename ReduceF::TempStorage rf;
    typename ScanL::TempStorage scan;
  } tmp;
  __shared__ double s_d;
  __shared__ float s_f;
  __shared__ TauPiece s_piece;

  const int grp = blockIdx.x, b = grp / p.heads_kv, h = grp % p.heads_kv;
  const int len = lengths != nullptr ? lengths[b] : seqlen;
  const int64_t gbase = static_cast<int64_t>(grp) * p.rows;
  const Elem* kb = src.k + b * src.k_sb + h * src.k_sh;
  const Elem* vb = src.v + b * src.v_sb + h * src.v_sh;

  // Scores of the whole prefix must be finite (flag: the first bad flat index + 1).
  for (int j = threadIdx.x; j < len; j += kBuildThreads)
    if (!isfinite(us.at(b, h, j)))
      atomicMin(bad, static_cast<unsigned long long>(grp) * seqlen + j + 1);

  // The window: the last min(w, len) tokens, position j in row j % w.
  const int w0 = max(0, len - p.window);
  const int vecs = p.head_dim / 8;
  for (int t = threadIdx.x; t < (len - w0) * vecs; t += kBuildThreads) {
    const int j = w0 + t / vecs, e = (t % vecs) * 8;
    const int64_t o = (gbase + j % p.window) * p.head_dim + e;
    *reinterpret_cast<uint4*>(p.k + o) = *reinterpret_cast<const uint4*>(kb + j * src.k_sj + e);
    *reinterpret_cast<uint4*>(p.v + o) = *reinterpret_cast<const uint4*>(vb + j * src.v_sj + e);
    if (e == 0) p.slot_u[gbase + j % p.window] = us.at(b, h, j);
  }

  const int m = p.budget > 0 ? w0 : 0;  // candidates: positions [0, m)
  const int k = p.budget;
  double tau = -INFINITY;
  unsigned long long kth = 0;  // selected: key >= kth (all when m <= k)
  if (m > k) {
    auto key = [&](int j) { return entry_key(us.at(b, h, j), j); };
    kth = block_kth_largest(m, k, key);
    if (p.soft) {
      // Bisect tau between min - 1 (f = m > k) and max (f = 0), then walk the last pieces.
      float zmin = INFINITY, zmax = -INFINITY;
      for (int j = threadIdx.x; j < m; j += kBuildThreads) {
        const float z = us.at(b, h, j);
        zmin = fminf(zmin, z), zmax = fmaxf(zmax, z);
      }
      zmin = ReduceF(tmp.rf).Reduce(zmin, MinOp());
      if (threadIdx.x == 0) s_f = zmin;
      __syncthreads();
      zmin = s_f;
      __syncthreads();
      zmax = ReduceF(tmp.rf).Reduce(zmax, MaxOp());
      if (threadIdx.x == 0) s_f = zmax;
      __syncthreads();
      zmax = s_f;
      __syncthreads();
      double lo = static_cast<double>(zmin) - 1.0, hi = static_cast<double>(zmax);
      for (int it = 0; it < 40; ++it) {
        const double mid = 0.5 * (lo + hi);
        double f = 0.0;
        for (int j = threadIdx.x; j < m; j += kBuildThreads)
          f += bsk::detail::clip_gate(static_cast<double>(us.at(b, h, j)) - mid);
        f = ReduceD(tmp.rd).Sum(f);
        if (threadIdx.x == 0) s_d = f;
        __syncthreads();
        if (s_d >= static_cast<double>(k)) lo = mid; else hi = mid;
        __syncthreads();
      }
      for (;;) {
        TauPiece mine;
        for (int j = threadIdx.x; j < m; j += kBuildThreads)
          bsk::detail::tau_piece_add(mine, static_cast<double>(us.at(b, h, j)), lo);
        const TauPiece all = ReduceP(tmp.rp).Reduce(mine, PieceOp());
        if (threadIdx.x == 0) s_piece = all;
        __syncthreads();
        const TauPiece piece = s_piece;
        __syncthreads();
        if (bsk::detail::tau_piece_step(piece, k, lo, tau)) break;
      }
    }
  }

  // Entries in position order: every kept candidate (selected, or u > tau), selected ones with
  // rows window + (their rank among the selected).
  float* zu = p.cand_u + static_cast<int64_t>(grp) * p.cap;
  int* zp = p.cand_pos + static_cast<int64_t>(grp) * p.cap;
  int* zr = p.cand_row + static_cast<int64_t>(grp) * p.cap;
  long long seen = 0;  // kept << 32 | selected, before this tile
  for (int base = 0; base < m; base += kBuildThreads) {
    const int j = base + threadIdx.x;
    bool keep = false, sel = false;
    float z = 0.f;
    if (j < m) {
      z = us.at(b, h, j);
      sel = m <= k || entry_key(z, j) >= kth;
      keep = sel || (p.soft && static_cast<double>(z) > tau);
    }
    long long before, total;
    ScanL(tmp.scan).ExclusiveSum((keep ? (1ll << 32) : 0ll) + (sel ? 1ll : 0ll), before, total);
    before += seen;
    const int e = static_cast<int>(before >> 32), s = static_cast<int>(before & 0xffffffff);
    if (keep && e < p.cap) {
      zu[e] = z, zp[e] = j, zr[e] = sel ? p.window + s : -1;
      if (sel) {
        const int64_t o = (gbase + p.window + s) * p.head_dim;
        for (int d = 0; d < p.head_dim; d += 8) {
          *reinterpret_cast<uint4*>(p.k + o + d) = *reinterpret_cast<const uint4*>(kb + j * src.k_sj + d);
          *reinterpret_cast<uint4*>(p.v + o + d) = *reinterpret_cast<const uint4*>(vb + j * src.v_sj + d);
        }
        p.slot_u[gbase + p.window + s] = z;
      }
    }
    seen += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const int kept = static_cast<int>(seen >> 32);
    if (kept > p.cap) atomicMin(bad + 1, static_cast<unsigned long long>(grp) + 1);
    p.counts[3 * grp] = len;
    p.counts[3 * grp + 1] = min(kept, p.cap);
    p.counts[3 * grp + 2] = static_cast<int>(seen & 0xffffffff);
    p.tau[grp] = tau;
  }
}

}  // namespace bsk::kernels::skcache
