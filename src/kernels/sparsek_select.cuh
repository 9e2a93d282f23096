// SparseK selection on the GPU (docs/SPARSEK_SPEC.md): for every candidate count m (query row
// i has m = i - w + 1 candidates, keys [0, m)), the k-th best candidate under the spec's order
// (its score and index: the threshold that defines S_i) and, for the soft gates, tau.
//
// Why it is linear and not quadratic: the scores of one (batch, KV head) are sorted once in the
// spec's order (larger u first, ties toward larger j). A candidate is "active" for m when j < m.
// As m grows by one, one key becomes active, and the threshold, like tau, only moves up the
// sorted order (the spec: tau is non-decreasing). So one thread can walk consecutive m with three
// cursors into the sorted array that only move up: the threshold position, and the two edges of
// tau's band (u >= tau + 1: gate 1; tau < u < tau + 1: fractional). The m range is cut into
// chunks (ChunkPlan); a block sets up its chunk's first state exactly by a parallel scan of the
// sorted array, then one thread walks the chunk.
//
// tau comes from the spec's closed form on the band: with U = #{u >= tau + 1} and W = #{u > tau}
// among the active keys, f(tau) = U + sum_band (u - tau) is linear between breakpoints (u and
// u - 1 of the keys), and the walk moves tau up breakpoint by breakpoint until f drops to k.
// Everything runs in float64 relative to an anchor (the chunk's first threshold score), so
// large scores keep their differences (tau is reported relative to the row's threshold score:
// gate = clip((u - thr) - tau_rel, 0, 1), exact for close scores by Sterbenz' lemma).
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/sparsek_chunk_plan.h"
#include "kernels/order_code.cuh"
#include "kernels/sparsek_layout.cuh"

namespace bsk::kernels::sparsek {


struct Scores {  // u: float32 [B, Hkv, Skv], element strides
  const float* u;
  int64_t sb, sh, sj;
  int heads_kv, seqlen_k;
  __device__ __forceinline__ float at(int seg, int j) const {
    return u[(seg / heads_kv) * sb + (seg % heads_kv) * sh + j * sj];
  }
};

// Checks every score is finite (flag: the first bad flat index + 1, smallest wins) and, when
// keys != null, writes the radix-sort input: key = (segment, order code) so that a descending
// sort groups segments in ascending order with scores descending; keys enter in decreasing j
// so the stable sort leaves ties in decreasing j, the spec's tie rule.
__global__ void encode_scores_kernel(Scores s, int num_segments, unsigned long long* keys,
                                     int* vals, unsigned long long* bad) {
  const int64_t n = static_cast<int64_t>(num_segments) * s.seqlen_k;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int seg = static_cast<int>(e / s.seqlen_k);
    const int j = s.seqlen_k - 1 - static_cast<int>(e % s.seqlen_k);
    const float x = s.at(seg, j);
    if (!isfinite(x)) atomicMin(bad, static_cast<unsigned long long>(seg) * s.seqlen_k + j + 1);
    if (keys != nullptr) {  // written for bad scores too (sorted, then the call raises)
      keys[e] = (static_cast<unsigned long long>(num_segments - 1 - seg) << 32) | order_code(x);
      vals[e] = j;
    }
  }
}

// The walk (walk_chunk) keeps its values relative to each chunk's first threshold in
// float64; across a span of 2^20 they keep about 2^-33 of absolute precision, ample for the
// gates, while a span like 1e17 would lose tau entirely. Wider spans are rejected (the CPU path
// takes any finite scores). Flag: the first segment over the limit + 1, smallest wins.
constexpr double kMaxScoreSpan = 1048576.0;  // 2^20
__global__ void check_span_kernel(const float* sorted_u, int num_segments, int n,
                                  unsigned long long* bad) {
  const int seg = blockIdx.x * blockDim.x + threadIdx.x;
  if (seg >= num_segments || n == 0) return;
  const float* su = sorted_u + static_cast<int64_t>(seg) * n;
  const double span = static_cast<double>(su[0]) - static_cast<double>(su[n - 1]);
  if (!(span <= kMaxScoreSpan)) atomicMin(bad, static_cast<unsigned long long>(seg) + 1);
}

// After the sort: sorted scores as floats, and every key's position in its segment's order.
__global__ void finish_sort_kernel(const unsigned long long* sorted_keys, const int* sorted_j,
                                   int num_segments, int n, float* sorted_u, int* rank) {
  const int64_t total = static_cast<int64_t>(num_segments) * n;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    sorted_u[e] = from_order_code(static_cast<uint32_t>(sorted_keys[e]));
    const int64_t seg = e / n;
    rank[seg * n + sorted_j[e]] = static_cast<int>(e - seg * n);
  }
}

struct SelectParams {
  const float* sorted_u;  // [segments, n]
  const int* sorted_j;    // [segments, n]
  const int* rank;        // [segments, n]
  float* thr_u;           // [segments, n + 1], indexed by m
  int* thr_j;
  float* tau_rel;         // gate = clip((u - thr_u) - tau_rel, 0, 1); -inf: every gate 1
  int n;                  // Skv
  int segments;           // B * Hkv
  int k;                  // budget, >= 1
  int m_max;              // largest m any query row has
  bool soft;              // gates key_value / value (tau needed)
  int bisect;             // select_init's bisection steps: tau0 within 2^-bisect of tau
  ChunkPlan plan;
};

constexpr int kSelectThreads = 256;
constexpr int kItems = 16;  // consecutive positions per thread in block_compact
// Bisection steps for a chunk's first tau (SelectParams::bisect): each is a pass over the
// chunk's band and a block reduction, while the walk crosses the breakpoints left in the last
// bracket one by one. 8 measured best of 6, 8, 10, 14 on an H100 (bench/results/
// select-plan-sweep-bisect-h100.txt): init 346 -> 285 us at 131072, walk unchanged.
constexpr int kBisect = 8;

using BlockScanInt = cub::BlockScan<int, kSelectThreads>;

// Walks positions [start, n) (start a multiple of kItems) in tiles of kSelectThreads * kItems
// (kItems consecutive positions per thread, one block-wide scan per tile rather than per
// position), calling emit(pos, rank) for every kept position, rank = the number of kept
// positions before it; mask(p0) gives the bits of positions p0 .. p0 + kItems - 1 (bit i:
// p0 + i < n is kept). on_tile(t, seen) hears how many were kept before tile t. Stops after the
// tile in which `limit` kept positions are reached; returns how many it kept.
template <class Mask, class Emit, class OnTile>
__device__ __forceinline__ int block_compact_masks(int n, int limit, Mask&& mask, Emit&& emit,
                                                   OnTile&& on_tile,
                                                   BlockScanInt::TempStorage& tmp,
                                                   int start = 0) {
  int seen = 0;
  for (int base = start, t = 0; base < n && seen < limit; base += kSelectThreads * kItems, ++t) {
    on_tile(t, seen);
    const int p0 = base + threadIdx.x * kItems;
    const uint32_t bits = p0 < n ? mask(p0) : 0u;
    int before, total;
    BlockScanInt(tmp).ExclusiveSum(__popc(bits), before, total);
    int r = seen + before;
    for (uint32_t mm = bits; mm != 0; mm &= mm - 1) emit(p0 + __ffs(mm) - 1, r++);
    seen += total;
    __syncthreads();  // tmp is reused by the next tile
  }
  return seen;
}

// block_compact_masks keeping the positions where keep(pos) holds.
template <class Keep, class Emit>
__device__ __forceinline__ int block_compact(int n, int limit, Keep&& keep, Emit&& emit,
                                             BlockScanInt::TempStorage& tmp) {
  auto mask = [&](int p0) {
    uint32_t bits = 0;
#pragma unroll
    for (int i = 0; i < kItems; ++i)
      if (p0 + i < n && keep(p0 + i)) bits |= 1u << i;
    return bits;
  };
  return block_compact_masks(n, limit, mask, emit, [](int, int) {}, tmp);
}

// a[p0 .. p0 + kItems - 1] into x (INT_MAX past n), with 16-byte loads where `a` is 16-byte
// aligned (p0 is a multiple of kItems): the scans of the sorted order are most of the
// selection's memory traffic, and 4 vector loads per thread replace 16.
__device__ __forceinline__ void load_items(const int* a, int p0, int n, int (&x)[kItems]) {
  if (p0 + kItems <= n && (reinterpret_cast<uintptr_t>(a) & 15) == 0) {
#pragma unroll
    for (int i = 0; i < kItems / 4; ++i) {
      const int4 v = reinterpret_cast<const int4*>(a + p0)[i];
      x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kItems; ++i) x[i] = p0 + i < n ? a[p0 + i] : INT_MAX;
  }
}

// The mask of block_compact_masks for "a[pos] < bound" (the active keys of a sorted segment:
// sorted_j < m; bound < INT_MAX, so positions past n are never kept).
__device__ __forceinline__ uint32_t below_mask(const int* a, int p0, int n, int bound) {
  int x[kItems];
  load_items(a, p0, n, x);
  uint32_t bits = 0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) bits |= (x[i] < bound ? 1u : 0u) << i;
  return bits;
}

// The first position in [lo, hi] where a monotone predicate holds (false ... false true ...
// true; hi when it never does), by every thread of the block: each round samples kSelectThreads
// evenly spaced positions and narrows the range to one gap, so 131072 positions take 3 rounds
// of one load per thread instead of a binary search's 17 dependent loads.
template <class Pred>
__device__ __forceinline__ int block_search(int lo, int hi, Pred&& pred) {
  while (lo < hi) {
    const int step = (hi - lo + kSelectThreads - 1) / kSelectThreads;
    const int pos = lo + static_cast<int>(threadIdx.x) * step;
    // Samples before the answer form a prefix of the samples.
    const int c = __syncthreads_count(pos < hi && !pred(pos));
    const int next_lo = c == 0 ? lo : lo + (c - 1) * step + 1;
    hi = min(hi, lo + c * step);
    lo = next_lo;
    if (step == 1) break;  // every position of the range was sampled: lo is the answer
  }
  return lo;
}

// Active band keys a chunk's tau bisection keeps in shared memory (the sparsek-prefill suite's
// scores have at most ~7,000 within 1 of a threshold); more fall back to passes over global.
constexpr int kBandCap = 8192;
// Tiles of the threshold scan whose counts select_init keeps (positions up to 4M).
constexpr int kPrefixTiles = 1024;

// The walk's state at the first m of a chunk, found by select_init_kernel.
struct ChunkState {
  double ref;    // the anchor: the threshold score at m_begin; values below are relative to it
  double tau0;   // a lower bound of tau at m_begin, within 2^-bisect of it
  double band;   // sum over active keys in the band of (u - ref)
  long long U, W;
  int ck, pa, pe;  // threshold position; first positions with u < tau + 1 and with u <= tau
  int m_begin, m_end;
};

// One block per (chunk of m values, segment), m in [k + 1, m_max] (m <= k needs no selection:
// every candidate is in, with gate 1): the chunk's first state, exactly, by parallel scans.
__global__ void __launch_bounds__(kSelectThreads) select_init_kernel(const SelectParams p,
                                                                     ChunkState* states) {
  using ReduceI = cub::BlockReduce<int, kSelectThreads>;
  using ReduceD = cub::BlockReduce<double, kSelectThreads>;
  __shared__ union {
    BlockScanInt::TempStorage scan;
    typename ReduceI::TempStorage ri;
    typename ReduceD::TempStorage rd;
  } tmp;
  __shared__ int s_pos;

  const int seg = blockIdx.y;
  const ChunkPlan& plan = p.plan;
  ChunkState st{};
  st.m_begin = plan.begin(blockIdx.x);
  st.m_end = max(st.m_begin, plan.begin(blockIdx.x + 1));
  ChunkState* out = states + static_cast<int64_t>(seg) * gridDim.x + blockIdx.x;
  if (st.m_begin >= st.m_end) {
    if (threadIdx.x == 0) *out = st;
    return;
  }
  const float* su = p.sorted_u + static_cast<int64_t>(seg) * p.n;
  const int* sj = p.sorted_j + static_cast<int64_t>(seg) * p.n;
  const int m = st.m_begin;

  // Position of the k-th active key (j < m) in sorted order; the active keys before each tile of
  // that scan, so that counting those above the band below rescans one tile, not the prefix.
  __shared__ int s_before[kPrefixTiles];
  block_compact_masks(
      p.n, p.k, [&](int p0) { return below_mask(sj, p0, p.n, m); },
      [&](int pos, int r) { if (r == p.k - 1) s_pos = pos; },
      [&](int t, int seen) { if (threadIdx.x == 0 && t < kPrefixTiles) s_before[t] = seen; },
      tmp.scan);
  st.ck = s_pos;  // exists: m > k keys are active
  st.ref = su[st.ck];

  // tau lies in [thr - 1, thr). Bisect it to within 2^-kBisect in parallel, so the walk starts
  // right below it: starting at thr - 1 instead, one thread would cross every breakpoint of the
  // band one at a time (thousands at long lengths). f(t) = #active keys with u >= thr + 1 plus the
  // clipped sum over the active keys with thr - 1 < u < thr + 1 (positions [p_hi, p_lo)).
  // Then pa = first position with u < tau0 + 1, pe = first with u <= tau0, and U, W and the band
  // sum among active keys at tau0 (values relative to ref = thr).
  if (p.soft) {
    __shared__ float s_band[kBandCap];  // active keys of [p_hi, p_lo), in sorted order
    __shared__ double s_f;
    __shared__ int s_base;
    // First position in [lo, hi] whose u - ref is below `bound` (or at it, if inclusive), in the
    // walk's own relative arithmetic.
    auto first_below = [&](int lo, int hi, double bound, bool inclusive) {  // su descending
      return block_search(lo, hi, [&](int pos) {
        const double x = static_cast<double>(su[pos]) - st.ref;
        return inclusive ? x <= bound : x < bound;
      });
    };
    const int p_hi = first_below(0, p.n, 1.0, false);
    const int p_lo = first_below(p_hi, p.n, -1.0, true);
    // Active keys before p_hi (<= ck, so inside the scanned tiles): the count before p_hi's tile,
    // plus that tile's part.
    const int t_hi = p_hi / (kSelectThreads * kItems);
    const int from = t_hi < kPrefixTiles ? t_hi * kSelectThreads * kItems : 0;
    int above = 0;
    for (int pos = from + threadIdx.x; pos < p_hi; pos += kSelectThreads) above += sj[pos] < m;
    above = ReduceI(tmp.ri).Sum(above);
    if (threadIdx.x == 0) s_base = above + (t_hi < kPrefixTiles ? s_before[t_hi] : 0);
    __syncthreads();
    const int base = s_base;
    // The active keys of the band, once, so that the bisection and the counts below read shared
    // memory instead of making a pass over global memory each.
    // 16-byte loads of the sorted order (below_mask) from p_hi's 16-position group on; the
    // positions before p_hi are masked off.
    const int nb = block_compact_masks(
        p_lo, INT_MAX,
        [&](int p0) {
          const uint32_t bits = below_mask(sj, p0, p_lo, m);
          return p0 >= p_hi ? bits : bits & (~0u << (p_hi - p0));
        },
        [&](int pos, int r) { if (r < kBandCap) s_band[r] = su[pos]; }, [](int, int) {},
        tmp.scan, p_hi / kItems * kItems);
    const bool in_smem = nb <= kBandCap;
    // f(u - ref) for every active key of the band: from shared memory, or from global memory
    // where the band overflowed it.
    auto for_each_band = [&](auto&& f) {
      if (in_smem) {
        for (int i = threadIdx.x; i < nb; i += kSelectThreads)
          f(static_cast<double>(s_band[i]) - st.ref);
      } else {
        for (int pos = p_hi + threadIdx.x; pos < p_lo; pos += kSelectThreads)
          if (sj[pos] < m) f(static_cast<double>(su[pos]) - st.ref);
      }
    };
    __syncthreads();
    double lo = -1.0, hi = 0.0;  // f(lo) >= k > f(hi), relative to ref
    for (int it = 0; it < p.bisect; ++it) {
      const double mid = 0.5 * (lo + hi);
      double part = 0.0;
      for_each_band([&](double x) { part += fmin(fmax(x - mid, 0.0), 1.0); });
      __syncthreads();
      const double f = ReduceD(tmp.rd).Sum(part);
      if (threadIdx.x == 0) s_f = f + base;
      __syncthreads();
      if (s_f >= p.k) lo = mid; else hi = mid;
    }
    st.tau0 = lo;
    // -1 <= lo < 0: every key before p_hi is at or above lo + 1 and every key from p_lo on at or
    // below lo, so both cursors lie in [p_hi, p_lo].
    st.pa = first_below(p_hi, p_lo, lo + 1.0, false);
    st.pe = first_below(st.pa, p_lo, lo, true);
    // U, W and the band sum among the active keys at lo: the keys before p_hi count in U and W;
    // those of [p_hi, p_lo) by their relative score (the same comparisons that placed pa, pe).
    int u_part = 0, w_part = 0;
    double b_part = 0.0;
    for_each_band([&](double x) {
      const bool in_u = !(x < lo + 1.0), in_w = !(x <= lo);
      u_part += in_u;
      w_part += in_w;
      b_part += in_w && !in_u ? x : 0.0;
    });
    __syncthreads();
    st.U = base + ReduceI(tmp.ri).Sum(u_part);
    __syncthreads();
    st.W = base + ReduceI(tmp.ri).Sum(w_part);
    __syncthreads();
    st.band = ReduceD(tmp.rd).Sum(b_part);
  }
  if (threadIdx.x == 0) *out = st;
}

// One warp per (chunk, segment) walks the chunk's m values in order, on its first lane. The walk
// is a chain of data-dependent loops (tau's breakpoints, the threshold's next active key), so
// chunks sharing a warp serialize each other's divergent iterations: 1320 us at 131072 keys
// with a thread per chunk, 425 with a warp per chunk (bench/results/select-plan-sweep-*). The
// warps fit the GPU at once (a few thousand chunks at 131072 keys).
__device__ __forceinline__ void walk_chunk(const SelectParams& p, const ChunkState* states,
                                           int chunks, int idx) {
  const int seg = idx / chunks;
  ChunkState st = states[idx];
  if (st.m_begin >= st.m_end) return;
  const float* su = p.sorted_u + static_cast<int64_t>(seg) * p.n;
  const int* sj = p.sorted_j + static_cast<int64_t>(seg) * p.n;
  const int* rank = p.rank + static_cast<int64_t>(seg) * p.n;
  const int64_t out0 = static_cast<int64_t>(seg) * (p.n + 1);
  const double ref = st.ref;
  int ck = st.ck, pa = st.pa, pe = st.pe;
  // f at a trial t is U + band - (W - U) t; the walk keeps A = U + band - k and B = W - U (whole
  // numbers in A's and B's integer parts are exact in float64), so the crossing test is one FMA
  // and no 64-bit integer conversions sit in the chain of dependent steps.
  double A = static_cast<double>(st.U - p.k) + st.band;
  double B = static_cast<double>(st.W - st.U);

  double tau = st.tau0;  // relative to ref; f(tau) >= k holds here and after every activation
  // The walk is one thread's chain of dependent loads, so the values at the cursors are kept in
  // registers and reloaded only when a cursor moves, and the next key's rank and score are
  // loaded a step ahead (the arrays never change): a step that moves no cursor waits for no load.
  auto at_pe = [&] { return pe > 0 ? static_cast<double>(su[pe - 1]) - ref : INFINITY; };
  auto at_pa = [&] { return pa > 0 ? (static_cast<double>(su[pa - 1]) - ref) - 1.0 : INFINITY; };
  double ze = p.soft ? at_pe() : 0.0, za = p.soft ? at_pa() : 0.0;
  float thr = su[ck];
  int thr_j = sj[ck];
  int r_next = 0;
  float u_next = 0.f;
  if (st.m_begin + 1 < st.m_end) r_next = rank[st.m_begin], u_next = su[r_next];
  for (int m = st.m_begin; m < st.m_end; ++m) {
    if (p.soft) {
      // Raise tau breakpoint by breakpoint until f falls to k: exits at u (the key leaves the
      // band), un-saturations at u - 1 (the key enters the band from above).
      for (;;) {
        const double tn = fmin(ze, za);
        if (tn == INFINITY) break;  // unreachable with k < m; keeps the loop finite regardless
        if (fma(-B, tn, A) <= 0.0) {  // f(tn) <= k: the root is in [tau, tn]
          const double t = B > 0.0 ? A / B : tn;
          tau = fmin(fmax(t, tau), tn);
          break;
        }
        if (ze <= za) {  // the key at pe - 1 leaves the band (W - 1, band - u)
          --pe;
          if (sj[pe] < m) { B -= 1.0; A -= ze; }
          ze = at_pe();
        } else {  // the key at pa - 1 enters the band from above (U - 1, band + u)
          --pa;
          if (sj[pa] < m) { B += 1.0; A += (static_cast<double>(su[pa]) - ref) - 1.0; }
          za = at_pa();
        }
        tau = tn;
      }
    }
    p.thr_u[out0 + m] = thr;
    p.thr_j[out0 + m] = thr_j;
    p.tau_rel[out0 + m] =
        p.soft ? static_cast<float>(tau + (ref - static_cast<double>(thr))) : -INFINITY;

    // Key j = m becomes active for m + 1.
    if (m + 1 < st.m_end) {
      const int r = r_next;
      const float ur = u_next;  // su[r]
      if (m + 2 < st.m_end) r_next = rank[m + 1], u_next = su[r_next];
      if (r < ck) {  // one more active key above the threshold: it moves to the next one up
        int q = ck - 1;
        while (sj[q] > m) --q;
        ck = q;
        thr = su[ck];
        thr_j = sj[ck];
      }
      if (p.soft) {
        if (r < pa) A += 1.0;  // U + 1, W + 1
        else if (r < pe) { B += 1.0; A += static_cast<double>(ur) - ref; }  // W + 1, band + u
      }
    }
  }
}

struct ListParams {
  const int* sorted_j;
  const float* sorted_u;
  Scores scores;
  int* list;     // [segments, tiles, cap]: per kListRows query positions
  int* count;    // [segments, tiles]
  int cap;       // min(k, n) + kListRows
  int n, seqlen_q, k, w, tiles;
  int group;     // lists per block, 1..kListsPerBlock
};

// The keys that a block of query rows may select: those beating the first row's threshold among
// its candidates (exactly k), plus the newer candidates of later rows that beat it too (the
// threshold only rises, so nothing else can be selected in the block). Per-row masks in the
// attention kernel take it from there.
//
// The first part is the first k active keys (j < m of the first row) of the sorted order, so the
// list needs nothing from the walk: its last key is the threshold, which then filters the newer
// candidates. That lets the lists run beside the walk (select_kernel). The scan of the sorted
// order, O(Skv) per list, is most of the lists' time (350 us at 131072 keys with a block per
// list): a block builds `group` (<= kListsPerBlock) consecutive lists from one pass, their counts
// per thread packed in 16-bit fields of one 64-bit value, so one block scan serves them all.
// Where lists are few a block per list keeps the GPU full (ListParams::group).
constexpr int kListsPerBlock = 4;
static_assert(kListsPerBlock * 16 <= 64 && kSelectThreads * kItems < 65536, "16-bit fields");
__device__ __forceinline__ void build_lists(const ListParams& p, int bx, int seg) {
  using ScanU64 = cub::BlockScan<unsigned long long, kSelectThreads>;
  __shared__ union {
    BlockScanInt::TempStorage i;
    typename ScanU64::TempStorage u;
  } tmp;
  __shared__ int s_thr[kListsPerBlock];  // sorted position of each list's k-th key
  const int tid = threadIdx.x;
  const int64_t so = static_cast<int64_t>(seg) * p.n;
  const int* sj = p.sorted_j + so;
  int m_first[kListsPerBlock], written[kListsPerBlock];
  bool scan = false;
#pragma unroll
  for (int g = 0; g < kListsPerBlock; ++g) {
    const int qt = bx * p.group + g;
    const bool mine = g < p.group && qt < p.tiles;
    const int t0 = qt * kListRows;
    m_first[g] = mine ? candidates_of_row(t0, p.seqlen_q, p.n, p.w) : 0;
    // Lists whose first row has at most k candidates take them all (no scan: k "written").
    written[g] = mine && m_first[g] > p.k ? 0 : p.k;
    scan |= written[g] < p.k;
  }
  auto list_of = [&](int g) {
    return p.list + (static_cast<int64_t>(seg) * p.tiles + bx * p.group + g) * p.cap;
  };
  // `written` is the same in every thread (block-wide totals), so the loop is uniform.
  for (int base = 0; scan && base < p.n; base += kSelectThreads * kItems) {
    const int p0 = base + tid * kItems;
    int j[kItems];
    load_items(sj, p0, p.n, j);  // INT_MAX past n: never active
    uint32_t bits[kListsPerBlock];
    unsigned long long packed = 0;
#pragma unroll
    for (int g = 0; g < kListsPerBlock; ++g) {
      bits[g] = 0;
      if (written[g] < p.k) {
#pragma unroll
        for (int i = 0; i < kItems; ++i) bits[g] |= (j[i] < m_first[g] ? 1u : 0u) << i;
      }
      packed |= static_cast<unsigned long long>(__popc(bits[g])) << (16 * g);
    }
    unsigned long long before, total;
    ScanU64(tmp.u).ExclusiveSum(packed, before, total);
    scan = false;
#pragma unroll
    for (int g = 0; g < kListsPerBlock; ++g) {
      int* out = list_of(g);
      int r = written[g] + static_cast<int>((before >> (16 * g)) & 0xffff);
      for (uint32_t mm = bits[g]; mm != 0 && r < p.k; mm &= mm - 1, ++r) {
        const int pos = p0 + __ffs(mm) - 1;
        out[r] = sj[pos];
        if (r == p.k - 1) s_thr[g] = pos;
      }
      written[g] = min(p.k, written[g] + static_cast<int>((total >> (16 * g)) & 0xffff));
      scan |= written[g] < p.k;
    }
    __syncthreads();  // tmp is reused by the next tile; s_thr is read below
  }
  // The newer candidates, list by list (unrolled: the per-list values stay in registers).
#pragma unroll
  for (int g = 0; g < kListsPerBlock; ++g) {
    const int qt = bx * p.group + g;
    if (g >= p.group || qt >= p.tiles) continue;
    const int t0 = qt * kListRows, t1 = min(t0 + kListRows, p.seqlen_q);
    const int m_last = candidates_of_row(t1 - 1, p.seqlen_q, p.n, p.w);
    const int mf = m_first[g];
    if (mf <= p.k) {  // every candidate of the block is in: the kernel reads [0, m_last)
      written[g] = m_last;
    } else {
      const int tpos = s_thr[g];
      const float tu = p.sorted_u[so + tpos];
      const int tj = sj[tpos];
      int* out_new = list_of(g) + written[g];
      written[g] += block_compact(
          m_last - mf, INT_MAX,
          [&](int x) {
            const float u = p.scores.at(seg, mf + x);
            return u > tu || (u == tu && mf + x >= tj);
          },
          [&](int x, int r) { out_new[r] = mf + x; }, tmp.i);
    }
    if (tid == 0) p.count[static_cast<int64_t>(seg) * p.tiles + qt] = written[g];
  }
}

// The walk and the key lists in one grid: blocks [0, walk_blocks) walk a chunk per warp (on one
// lane: a chain of dependent steps that leaves the GPU mostly idle for ~0.57 ms at 131072 keys),
// the rest build the lists (throughput work, ~0.2 ms on an otherwise idle GPU), which no longer
// depend on the walk and so run in its shadow.
constexpr int kWalkWarps = kSelectThreads / 32;  // chunks per walk block
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const SelectParams sp, const ChunkState* states, int chunks, int walk_blocks,
                  const ListParams lp, int list_blocks) {
  if (static_cast<int>(blockIdx.x) < walk_blocks) {
    const int idx = blockIdx.x * kWalkWarps + static_cast<int>(threadIdx.x) / 32;
    if (threadIdx.x % 32 == 0 && idx < chunks * sp.segments) walk_chunk(sp, states, chunks, idx);
    return;
  }
  const int lb = blockIdx.x - walk_blocks;
  build_lists(lp, lb % list_blocks, lb / list_blocks);
}

}  // namespace bsk::kernels::sparsek
