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
#include "kernels/decode_trace.cuh"
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

// The worst selected entry (lowest in the spec's order) as an order key: u high, position low.
__device__ __forceinline__ unsigned long long entry_key(float u, int pos) {
  return (static_cast<unsigned long long>(sparsek::order_code(u)) << 32) |
         static_cast<unsigned int>(pos);
}

struct Scan0 {  // what the append's first pass over the entries finds
  TauPiece piece;
  unsigned long long worst;  // min key among selected entries
  int worst_at, worst_row;   // its entry and K/V row
  int free_at;               // first reusable entry (u <= tau, not selected)
  float zmin;
};
struct Scan0Op {
  __device__ Scan0 operator()(const Scan0& a, const Scan0& b) const {
    Scan0 r;
    r.piece = bsk::detail::tau_piece_merge(a.piece, b.piece);
    r.worst = a.worst < b.worst ? a.worst : b.worst;
    r.worst_at = a.worst < b.worst ? a.worst_at : b.worst_at;
    r.worst_row = a.worst < b.worst ? a.worst_row : b.worst_row;
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
// Breakpoints the fast walk may hold (see walk_listed).
constexpr int kWalkList = 256;
// Entries per thread loaded at once: a loop that loads one entry per iteration waits a full
// memory round trip per iteration (measured with clock64: 8 trips for 4K entries, half the
// append's time at batch 1); a tile of kPer predicated loads waits for one.
constexpr int kPer = 8;
// Candidate scores the append keeps in shared memory (32 KB) for the tau walk's passes, so that
// they read the block's own copy instead of global memory; more entries walk over global memory.
constexpr int kStagedScores = 8192;

// f(e, zu[e]) for every entry e < n of this thread, a tile of loads at a time.
template <class F>
__device__ __forceinline__ void for_each_score(const float* zu, int n, F&& f) {
  for (int base = 0; base < n; base += kPer * kAppendThreads) {
    float z[kPer];
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int e = base + j * kAppendThreads + static_cast<int>(threadIdx.x);
      z[j] = e < n ? zu[e] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int e = base + j * kAppendThreads + static_cast<int>(threadIdx.x);
      if (e < n) f(e, z[j]);
    }
  }
}

// Programmatic dependent launch (sm_90+): lets the decode step's attention kernel start its
// loads while this kernel runs (it waits for our writes before it uses them). A no-op on older
// GPUs and when the next kernel was not launched as a dependent.
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

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
    for_each_score(zu, n, [&](int, float z) { bsk::detail::tau_piece_add(mine, static_cast<double>(z), lo); });
    const TauPiece all = Reduce(tmp).Reduce(mine, PieceOp());
    if (threadIdx.x == 0) s_piece = all;
    __syncthreads();
    piece = s_piece;
    __syncthreads();
  }
}

// The walk from `lo` (piece known there) over the breakpoints listed in `bz` (score z; enter:
// the breakpoint is z - 1, where z joins the band, else z, where it leaves), which must hold
// every breakpoint in (lo, hi]. The passes over all entries collapse into steps over this short
// list, run by one warp: at each breakpoint only counts change (every entry that leaves there
// has z = bp and every one that enters has z = bp + 1), so S moves by counts times bp and the
// order of the list (filled by atomics) cannot change the result. Returns false where the list
// cannot decide (the root lies past hi, or f is flat at k and its end lies past hi); `lo` is then
// a point with f(lo) >= k to walk on from.
__device__ __forceinline__ bool walk_listed(const float* bz, const unsigned char* enter, int m, long long k,
                                   double hi, double& lo, TauPiece piece, double& tau) {
  const int lane = threadIdx.x % 32;
  for (;;) {
    // piece.nb is exact while it is <= hi; beyond, the next breakpoint is unknown.
    const bool known = piece.nb <= hi;
    if (piece.W == piece.U) {
      if (piece.U == k) {
        if (!known) return false;
        tau = piece.nb;
        return true;
      }
    } else {
      const double t = (static_cast<double>(piece.U - k) + piece.S) /
                       static_cast<double>(piece.W - piece.U);
      if (t < fmin(piece.nb, hi)) {
        tau = fmax(t, lo);
        return true;
      }
    }
    if (!known) {
      // f >= k up to hi (linear there, root not before hi), so the walk may go on from hi.
      if (piece.W != piece.U || piece.U > k) lo = fmax(lo, hi);
      return false;
    }
    lo = piece.nb;
    int n_enter = 0, n_leave = 0;
    double nb = INFINITY;
    for (int i = lane; i < m; i += 32) {
      const double bp = enter[i] ? static_cast<double>(bz[i]) - 1.0 : static_cast<double>(bz[i]);
      if (bp == lo) {
        if (enter[i]) ++n_enter; else ++n_leave;
      } else if (bp > lo) {
        nb = fmin(nb, bp);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      n_enter += __shfl_xor_sync(0xffffffffu, n_enter, off);
      n_leave += __shfl_xor_sync(0xffffffffu, n_leave, off);
      nb = fmin(nb, __shfl_xor_sync(0xffffffffu, nb, off));
    }
    piece.U -= n_enter;
    piece.W -= n_leave;
    piece.S += static_cast<double>(n_enter) * (lo + 1.0) - static_cast<double>(n_leave) * lo;
    piece.nb = nb;
  }
}

// tau after an append, from the old tau `lo` and the piece there (the new score included). Most
// steps move tau across a few breakpoints only: list those up to a guess hi (four times the
// piece's reach, and at least its end) and walk over the list (walk_listed); the passes over
// every entry (walk) remain for what the list cannot decide. Every thread of the block calls it.
__device__ inline double walk_on(const float* zu, int n, int k, double lo, const TauPiece& piece) {
  __shared__ float s_bz[kWalkList];
  __shared__ unsigned char s_enter[kWalkList];
  __shared__ int s_m;
  __shared__ double s_walk[2];  // tau, or where to walk on from; 1 when the list decided
  const double f_lo = static_cast<double>(piece.U) + piece.S -
                      static_cast<double>(piece.W - piece.U) * lo;
  const double reach = piece.W > piece.U ? (f_lo - static_cast<double>(k)) /
                                               static_cast<double>(piece.W - piece.U)
                                         : 0.0;
  const double hi = fmax(lo + 4.0 * fmax(reach, 0.0), piece.nb);
  if (threadIdx.x == 0) s_m = 0;
  __syncthreads();
  if (hi < INFINITY) {
    for_each_score(zu, n, [&](int, float zf) {
      const double z = static_cast<double>(zf);
      const bool leave = z > lo && z <= hi, enter = z - 1.0 > lo && z - 1.0 <= hi;
      if (leave || enter) {
        const int slot = atomicAdd(&s_m, static_cast<int>(leave) + static_cast<int>(enter));
        if (leave && slot < kWalkList) s_bz[slot] = zf, s_enter[slot] = 0;
        const int s2 = slot + static_cast<int>(leave);
        if (enter && s2 < kWalkList) s_bz[s2] = zf, s_enter[s2] = 1;
      }
    });
  }
  __syncthreads();
  BSK_TRACE_GROUP(kListed);
  if (threadIdx.x < 32) {
    double t = lo, l = lo;
    bool done = false;
    if (hi < INFINITY && s_m <= kWalkList) done = walk_listed(s_bz, s_enter, s_m, k, hi, l, piece, t);
    if (threadIdx.x == 0) s_walk[0] = done ? t : l, s_walk[1] = done ? 1.0 : 0.0;
    BSK_TRACE_GROUP_VALUE(kWalkList, static_cast<unsigned long long>(s_m) << 1 | (done ? 1u : 0u));
  }
  __syncthreads();
  const double at = s_walk[0];
  if (s_walk[1] != 0.0) return at;
  // The piece is known only where the list walk did not move.
  return walk<kAppendThreads>(zu, n, k, at, piece, at == lo);
}

// What a fused decode step (dispatch: sparsek_cache_step) passes from the append to the
// attention kernel, which starts before the append ends (allow_dependents): per group, the two
// K/V rows the append rewrites (-1: none), so that rows it loaded early can be reloaded; and the
// attention's split counters, zeroed here (no memset node in the step).
struct StepLink {
  int* changed;   // [B * Hkv, 2] or null
  int* counters;  // [B * Hkv * counters_per_group] or null
  int counters_per_group;
};

// grid: B * Hkv. One new token per sequence: k_new/v_new [B, 1, Hkv, D], u_new [B, Hkv, 1].
// 96 registers (one block per SM): the tiles of kPer loads need them; at 64 ptxas spills.
template <typename Elem>
__global__ void __launch_bounds__(kAppendThreads, 1)
    cache_append_kernel(const CacheParams<Elem> p, const KVSource<Elem> src, const ScoreSource un,
                        int batch, const StepLink link) {
  using ReduceI = cub::BlockReduce<int, kAppendThreads>;
  using Reduce0 = cub::BlockReduce<Scan0, kAppendThreads>;
  __shared__ union {
    typename ReduceI::TempStorage ri;
    typename Reduce0::TempStorage r0;
  } tmp;
  __shared__ __align__(16) unsigned char s0_raw[sizeof(Scan0)];  // raw: Scan0 has initializers
  Scan0& s0 = *reinterpret_cast<Scan0*>(s0_raw);

  __shared__ float s_z[kStagedScores];

  BSK_TRACE_GROUP_BEGIN();
  allow_dependents();
  const int grp = blockIdx.x, b = grp / p.heads_kv, h = grp % p.heads_kv;
  if (link.counters != nullptr)
    for (int i = threadIdx.x; i < link.counters_per_group; i += kAppendThreads)
      link.counters[grp * link.counters_per_group + i] = 0;
  // Latency, not bandwidth, bounds this kernel (one block per group, a chain of memory round
  // trips and block-wide steps), so every load the step needs is issued as early as what it
  // depends on allows: one trip for the group's counts and the new scores, one for the rows and
  // the candidate entries; the walk then reads the entries from shared memory.
  const int status = p.status[0];
  int* cnt = p.counts + 3 * grp;
  const int pos = cnt[0], cpos = pos - p.window;
  int n = cnt[1], nsel = cnt[2];
  const double tau_old = p.tau[grp];
  const float unew = un.at(b, h, 0);
  // All or nothing: every block checks every new score, so a bad one changes no group.
  const int n_new = batch * p.heads_kv;
  bool any_bad = false;
  for (int i = threadIdx.x; i < n_new; i += kAppendThreads)
    any_bad |= !isfinite(un.at(i / p.heads_kv, i % p.heads_kv, 0));
  const int64_t gbase = static_cast<int64_t>(grp) * p.rows;
  const int ring = p.window > 0 && cpos >= 0 ? cpos % p.window : 0;
  const float uc = p.window > 0 ? p.slot_u[gbase + ring] : unew;
  const Elem* k_new = src.k + b * src.k_sb + h * src.k_sh;
  const Elem* v_new = src.v + b * src.v_sb + h * src.v_sh;
  // The leaving key's row (thread t < 2 * vecs) and the new token's (2 * vecs <= t < 4 * vecs),
  // loaded now, stored at the end.
  const int vecs = p.head_dim / 8;
  uint4 row_vec = make_uint4(0, 0, 0, 0);
  {
    const int t = threadIdx.x, which = t / (2 * vecs), e = (t % (2 * vecs)) % vecs * 8;
    const bool is_v = (t % (2 * vecs)) >= vecs;
    const Elem* src_row = nullptr;
    if (which == 0 && p.budget > 0 && cpos >= 0)
      src_row = p.window > 0 ? (is_v ? p.v : p.k) + (gbase + ring) * p.head_dim
                             : (is_v ? v_new : k_new);
    else if (which == 1 && p.window > 0)
      src_row = is_v ? v_new : k_new;
    if (src_row != nullptr) row_vec = *reinterpret_cast<const uint4*>(src_row + e);
  }
  // Plain locals, not captures of the parameters (a lambda taking their address puts them in
  // local memory).
  int* const changed = link.changed;
  const int ring_row = p.window > 0 ? pos % p.window : -1;
  auto publish = [changed, ring_row, grp](int take) {
    if (changed != nullptr && threadIdx.x == 0) {
      changed[2 * grp] = ring_row;
      changed[2 * grp + 1] = take;
    }
  };
  if (status != 0) {  // sticky: a broken cache is left as it is
    publish(-1);
    return;
  }
  if (__syncthreads_or(any_bad)) {
    int bad = INT_MAX;
    for (int i = threadIdx.x; i < n_new; i += kAppendThreads)
      if (!isfinite(un.at(i / p.heads_kv, i % p.heads_kv, 0))) bad = min(bad, i);
    bad = ReduceI(tmp.ri).Reduce(bad, MinOp());
    if (grp == 0 && threadIdx.x == 0) {
      p.status[1] = bad;
      p.status[0] = 1;
    }
    publish(-1);
    return;
  }

  BSK_TRACE_GROUP(kAppendLoads);
  double tau = tau_old;
  float* zu = p.cand_u + static_cast<int64_t>(grp) * p.cap;
  int* zp = p.cand_pos + static_cast<int64_t>(grp) * p.cap;
  int* zr = p.cand_row + static_cast<int64_t>(grp) * p.cap;

  int take_row = -1;
  if (p.budget > 0 && cpos >= 0) {
    if (cpos + 1 <= p.budget) {  // at most k candidates: all selected, every gate 1
      take_row = p.window + nsel;
      if (threadIdx.x == 0) zu[n] = uc, zp[n] = cpos, zr[n] = take_row;
      ++n, ++nsel;
    } else if (!p.soft || static_cast<double>(uc) > tau_old) {
      // The walk's copy of the scores (one entry may be added below).
      const bool staged = p.soft && n < kStagedScores;
      Scan0 mine;
      mine.worst = ~0ull;
      mine.worst_at = mine.worst_row = -1;
      mine.free_at = INT_MAX;
      mine.zmin = INFINITY;
      const bool tau_known = tau_old > -INFINITY;
      for (int base = 0; base < n; base += kPer * kAppendThreads) {
        float z[kPer];
        int row[kPer], zpos[kPer];
        // Positions (the worst's ties) load with the rest: one round trip, not two.
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int e = base + j * kAppendThreads + static_cast<int>(threadIdx.x);
          z[j] = e < n ? zu[e] : 0.f;
          row[j] = e < n ? zr[e] : -1;
          zpos[j] = e < n ? zp[e] : 0;
        }
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int e = base + j * kAppendThreads + static_cast<int>(threadIdx.x);
          if (e >= n) continue;
          if (staged) s_z[e] = z[j];
          if (row[j] >= 0) {
            const unsigned long long key = entry_key(z[j], zpos[j]);
            if (key < mine.worst) mine.worst = key, mine.worst_at = e, mine.worst_row = row[j];
          } else if (static_cast<double>(z[j]) <= tau_old && e < mine.free_at) {
            mine.free_at = e;
          }
          mine.zmin = fminf(mine.zmin, z[j]);
          if (p.soft && tau_known)
            bsk::detail::tau_piece_add(mine.piece, static_cast<double>(z[j]), tau_old);
        }
      }
      BSK_TRACE_GROUP(kScanned);
      const Scan0 all = Reduce0(tmp.r0).Reduce(mine, Scan0Op());
      if (threadIdx.x == 0) s0 = all;
      __syncthreads();
      const Scan0 sc = s0;
      BSK_TRACE_GROUP(kReduced);
      const float u_worst = sparsek::from_order_code(static_cast<uint32_t>(sc.worst >> 32));
      const bool in = uc >= u_worst;  // ties go to the newer key
      const int worst = sc.worst_at;
      if (!p.soft) {
        if (in) {
          take_row = sc.worst_row;
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
            publish(-1);
            return;
          }
          at = n++;
        }
        const int wrow = sc.worst_row;
        if (threadIdx.x == 0) {
          zu[at] = uc, zp[at] = cpos, zr[at] = in ? wrow : -1;
          if (in) zr[worst] = -1;
          if (staged) s_z[at] = uc;
        }
        if (in) take_row = wrow;
        // tau: from the old tau, with the new score added to the piece found above; or, the
        // first time there are more than k candidates, from below every score.
        const float* zw = staged ? s_z : zu;
        TauPiece piece = sc.piece;
        double lo = tau_old;
        if (tau_known) {
          bsk::detail::tau_piece_add(piece, static_cast<double>(uc), lo);
          tau = walk_on(zw, n, p.budget, lo, piece);  // syncs first: the new entry is in place
        } else {
          lo = static_cast<double>(fminf(sc.zmin, uc)) - 1.0;
          __syncthreads();  // the new entry is visible to the walk's passes
          tau = walk<kAppendThreads>(zw, n, p.budget, lo, piece, false);
        }
      }
    }
    BSK_TRACE_GROUP(kWalked);
    if (take_row >= 0) {
      const int t = threadIdx.x;
      if (t < 2 * vecs) {
        const bool is_v = t >= vecs;
        *reinterpret_cast<uint4*>((is_v ? p.v : p.k) + (gbase + take_row) * p.head_dim +
                                  (t % vecs) * 8) = row_vec;
      }
      if (t == 0) p.slot_u[gbase + take_row] = uc;
    }
  }
  __syncthreads();  // the leaving key is copied out before its ring row is overwritten
  if (p.window > 0) {
    const int row = pos % p.window, t = threadIdx.x;
    if (t >= 2 * vecs && t < 4 * vecs) {
      const bool is_v = t - 2 * vecs >= vecs;
      *reinterpret_cast<uint4*>((is_v ? p.v : p.k) + (gbase + row) * p.head_dim +
                                (t % vecs) * 8) = row_vec;
    }
    if (t == 0) p.slot_u[gbase + row] = unew;
  }
  BSK_TRACE_GROUP(kAppendEnd);
  publish(take_row);
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
