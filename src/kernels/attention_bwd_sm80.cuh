// Attention backward (dense and SparseK, docs/SPARSEK_SPEC.md) on sm_80+ tensor cores.
//
// Per attended pair (row i, key j), with the forward's lse and delta_i = dO_i . O_i - dlse_i:
//   s = q_i.k_j, l = a s scale, P = exp(l - lse_i), dp = dO_i.v_j,
//   dl = P (c dp - delta_i), dv_j += P c dO_i, ds = dl a scale, dq_i += ds k_j, dk_j += ds q_i,
// where a / c are the logit / value weights of the gate mode (1 for dense and window keys), and
// the gate's own gradient is dm = dl s scale (when a is the gate) + P dp (when c is).
//
// Determinism without float atomics: two kernels, each summing in a fixed order.
//   - dk_dv_kernel: one CTA per group of 64 keys; it loops over every query head of the KV group
//     and every 64-row block of the rows that attend any of its keys, accumulating dK, dV and
//     the keys' first gate-gradient term in registers. The rows attending key j are one interval
//     [j, E_j): the window [j, j + w) and then the rows selecting j, which start at j + w and,
//     because the threshold only rises, end for good at e_j (E_j = max(j + w, e_j)). Keys are
//     grouped by (E_j / 2048, j) (plan_kernel + a radix sort), so the 64 intervals of a group
//     nearly coincide even though long-lived selected keys are scattered over the sequence.
//   - dq_kernel: the forward's CTA geometry and key blocks (selected list, then the window band),
//     accumulating dQ and, per row, the sum of dm over its fractional gates.
// The SPARSEK VJP g_u = s (g_m - (s . g_m) / |s|) is then finished per key: the first term comes
// from dk_dv_kernel; the second needs, for key j, the sum of mean_i = (s_i . g_m,i) / |s_i| over
// the rows i where j's gate is fractional. tau_i only rises, so those rows are one interval
// F_j = [fa_j, fb_j) (found by binary search in plan_kernel), and the sum is a difference of
// float64 prefix sums of mean_i (du_scan_kernel, du_finish_kernel). Candidates that are
// fractional but not selected count in |s_i| (the spec) and receive the second term only.
#pragma once

#include <cub/block/block_scan.cuh>

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/order_code.cuh"
#include "kernels/sm80_attention_tile.cuh"
#include "kernels/sparsek_fwd_sm80.cuh"

namespace bsk::kernels::bwd {

constexpr int kGroupKeys = 64;      // keys per dk_dv_kernel CTA
constexpr int kGroupBucket = 2048;  // rows per E_j bucket when grouping keys

template <typename Elem>
struct BwdParams {
  const Elem* q;
  const Elem* k;
  const Elem* v;
  const Elem* dout;
  const float* lse;
  Elem* dq;
  Elem* dk;
  Elem* dv;
  int64_t q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, v_sb, v_ss, v_sh, do_sb, do_ss, do_sh;
  int64_t dq_sb, dq_ss, dq_sh, dk_sb, dk_ss, dk_sh, dv_sb, dv_ss, dv_sh;
  int64_t lse_sb, lse_sh, lse_ss;
  const float* delta;  // [B, Hq, Sq] contiguous
  int batch, seqlen_q, seqlen_k, heads_q, heads_kv, group;
  float scale, scale_log2;
  bool causal;  // false: every row attends every key (dense only)
  // SparseK; dense causal is window = Skv, budget = 0.
  int budget, window;
  int gate;  // 0 key_value, 1 value, 2 none (bsk::Gate)
  const float* u;
  int64_t u_sb, u_sh, u_sj;
  const float* thr_u;  // by candidate count m, [B*Hkv, Skv + 1]; null: no row selects
  const int* thr_j;
  const float* tau_rel;
  const int* list;
  const int* count;
  int list_cap, list_tiles, heads;  // heads: query heads per dq CTA
  const int* key_end;  // [B*Hkv, Skv]: E_j (null: dense, every key to the last row)
  const int* sel_end;  // e_j
  const int2* frac;    // F_j (null: no soft gate gradient)
  const int* perm;     // [B*Hkv, Skv] key order of dk_dv_kernel (null: identity)
  float* dm_row;       // [B, Hq, Sq] contiguous, or null
  float* du_key;       // [B*Hkv, Skv], or null
};

// delta = dO . O - dlse per query row, one warp per row (rows in (b, h, t) order of delta): the
// gradient of lse enters every dl_ij = P_ij (c dp_ij - delta_i) through delta alone, because
// d lse_i / d l_ij = P_ij.
template <typename Elem>
__global__ void delta_kernel(const Elem* out, int64_t o_sb, int64_t o_ss, int64_t o_sh,
                             const Elem* dout, int64_t do_sb, int64_t do_ss, int64_t do_sh,
                             const float* dlse, int64_t dl_sb, int64_t dl_sh, int64_t dl_ss,
                             int batch, int heads, int seqlen, int head_dim, float* delta) {
  const int64_t rows = static_cast<int64_t>(batch) * heads * seqlen;
  const int lane = threadIdx.x % 32;
  for (int64_t r = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32; r < rows;
       r += int64_t{gridDim.x} * blockDim.x / 32) {
    const int t = static_cast<int>(r % seqlen);
    const int h = static_cast<int>((r / seqlen) % heads);
    const int b = static_cast<int>(r / (int64_t{seqlen} * heads));
    const Elem* o = out + b * o_sb + t * o_ss + h * o_sh;
    const Elem* g = dout + b * do_sb + t * do_ss + h * do_sh;
    float acc = 0.f;
    for (int d = lane; d < head_dim; d += 32)
      acc += static_cast<float>(o[d]) * static_cast<float>(g[d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[r] = dlse ? acc - dlse[b * dl_sb + h * dl_sh + t * dl_ss] : acc;
  }
}

// Per key of a SparseK problem: E_j, e_j, F_j, its grouping sort key, and the +1/-1 marks of F_j
// in frac_diff (integer atomics: exact and order-free). Absolute positions i = 0 .. n-1 are rows.
struct PlanParams {
  const float* u;
  int64_t u_sb, u_sh, u_sj;
  int heads_kv, n, budget, window;
  bool soft;
  const float* thr_u;  // null: no row selects (every candidate is in)
  const int* thr_j;
  const float* tau_rel;
  int* key_end;
  int* sel_end;
  int2* frac;
  int* frac_diff;  // [segments, n + 1], zeroed
  unsigned long long* sort_key;
  int bits_j, bits_bucket;
  int segments;
};

__global__ void plan_kernel(const PlanParams p) {
  const int64_t total = static_cast<int64_t>(p.segments) * p.n;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int seg = static_cast<int>(e / p.n), j = static_cast<int>(e % p.n);
    const float uj = p.u[(seg / p.heads_kv) * p.u_sb + (seg % p.heads_kv) * p.u_sh + j * p.u_sj];
    const int64_t tb = static_cast<int64_t>(seg) * (p.n + 1);
    // Row i has m = i - w + 1 candidates; rows with m > k select (first such row: k + w).
    const int first_cand = j + p.window;  // first row where j is a candidate
    int sel = first_cand;                 // e_j (exclusive): selected rows [first_cand, sel)
    int fa = p.n, fb = p.n;
    if (first_cand < p.n) {
      if (p.budget == 0) {
        sel = first_cand;
      } else if (p.thr_u == nullptr) {
        sel = p.n;
      } else {
        const int lo = max(first_cand, p.budget + p.window);  // rows before lo select every candidate
        const unsigned long long key =
            (static_cast<unsigned long long>(sparsek::order_code(uj)) << 32) | uint32_t(j);
        auto selected = [&](int i) {
          const int m = i - p.window + 1;
          const unsigned long long thr =
              (static_cast<unsigned long long>(sparsek::order_code(p.thr_u[tb + m])) << 32) |
              uint32_t(p.thr_j[tb + m]);
          return key >= thr;
        };
        int a = lo, b = p.n;  // first i in [lo, n) not selected (monotone: true then false)
        while (a < b) {
          const int mid = a + (b - a) / 2;
          if (selected(mid)) a = mid + 1; else b = mid;
        }
        sel = a;
        if (p.soft && lo < p.n) {
          // x_i = (u - thr_i) - tau_i falls with i; fractional where 0 < x_i < 1.
          auto x = [&](int i) {
            const int m = i - p.window + 1;
            return (uj - p.thr_u[tb + m]) - p.tau_rel[tb + m];
          };
          int a1 = lo, b1 = p.n;
          while (a1 < b1) {
            const int mid = a1 + (b1 - a1) / 2;
            if (x(mid) >= 1.f) a1 = mid + 1; else b1 = mid;
          }
          int a2 = a1, b2 = p.n;
          while (a2 < b2) {
            const int mid = a2 + (b2 - a2) / 2;
            if (x(mid) > 0.f) a2 = mid + 1; else b2 = mid;
          }
          fa = a1, fb = a2;
          if (fa < fb) {
            atomicAdd(p.frac_diff + static_cast<int64_t>(seg) * (p.n + 1) + fa, 1);
            atomicAdd(p.frac_diff + static_cast<int64_t>(seg) * (p.n + 1) + fb, -1);
          } else {
            fa = fb = p.n;
          }
        }
      }
    }
    const int end = min(p.n, max(first_cand, sel));
    p.key_end[e] = end;
    p.sel_end[e] = sel;
    if (p.frac) p.frac[e] = make_int2(fa, fb);
    p.sort_key[e] = (((static_cast<unsigned long long>(seg) << p.bits_bucket) |
                      static_cast<unsigned long long>(end / kGroupBucket))
                     << p.bits_j) |
                    static_cast<unsigned long long>(j);
  }
}

// Sorted keys back to key indices.
__global__ void perm_kernel(const unsigned long long* sorted, int64_t total, int bits_j, int* perm) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x)
    perm[e] = static_cast<int>(sorted[e] & ((1ull << bits_j) - 1));
}

// Per segment: |s_i| (scan of frac_diff) and the float64 prefix sums of mean_i over rows.
constexpr int kScanThreads = 512;
__global__ void __launch_bounds__(kScanThreads)
    du_scan_kernel(const int* frac_diff, const float* dm_row, int n, int seqlen_q, int heads_kv,
                   int group, double* prefix) {
  using ScanInt = cub::BlockScan<int, kScanThreads>;
  using ScanD = cub::BlockScan<double, kScanThreads>;
  __shared__ typename ScanInt::TempStorage ti;
  __shared__ typename ScanD::TempStorage td;
  __shared__ int carry_c;
  __shared__ double carry_p;
  const int seg = blockIdx.x, b = seg / heads_kv, hk = seg % heads_kv;
  const int diag = n - seqlen_q;
  const int* fd = frac_diff + static_cast<int64_t>(seg) * (n + 1);
  double* pre = prefix + static_cast<int64_t>(seg) * (n + 1);
  if (threadIdx.x == 0) carry_c = 0, carry_p = 0.0, pre[0] = 0.0;
  __syncthreads();
  for (int i0 = 0; i0 < n; i0 += kScanThreads) {
    const int i = i0 + threadIdx.x;
    int c = i < n ? fd[i] : 0, c_incl, c_total;
    ScanInt(ti).InclusiveSum(c, c_incl, c_total);
    c_incl += carry_c;
    double mean = 0.0;
    const int t = i - diag;
    if (i < n && t >= 0 && c_incl > 0) {
      float s = 0.f;  // fixed order over the group's heads
      for (int g = 0; g < group; ++g)
        s += dm_row[(static_cast<int64_t>(b) * heads_kv * group + hk * group + g) * seqlen_q + t];
      mean = static_cast<double>(s) / c_incl;
    }
    double p_incl, p_total;
    ScanD(td).InclusiveSum(mean, p_incl, p_total);
    p_incl += carry_p;
    if (i < n) pre[i + 1] = p_incl;
    __syncthreads();
    if (threadIdx.x == 0) carry_c += c_total, carry_p += p_total;
    __syncthreads();
  }
}

__global__ void du_finish_kernel(const float* du_key, const int2* frac, const double* prefix,
                                 int n, int segments, int heads_kv, float* du, int64_t du_sb,
                                 int64_t du_sh, int64_t du_sj) {
  const int64_t total = static_cast<int64_t>(segments) * n;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int seg = static_cast<int>(e / n), j = static_cast<int>(e % n);
    float g = 0.f;  // no soft gate with a selection: no gradient reaches u
    if (du_key != nullptr) {
      const int2 f = frac[e];
      const double* pre = prefix + static_cast<int64_t>(seg) * (n + 1);
      const double second = f.x < f.y ? pre[f.y] - pre[f.x] : 0.0;
      g = static_cast<float>(static_cast<double>(du_key[e]) - second);
    }
    du[(seg / heads_kv) * du_sb + (seg % heads_kv) * du_sh + j * du_sj] = g;
  }
}

// ---- dK, dV (and the keys' first gate-gradient term) --------------------------------------------

template <class Cfg>  // kBlockM = kGroupKeys keys, kBlockN = 64 rows, 4 warps
struct DkDvSmem {
  using Elem = typename Cfg::Elem;
  static constexpr int kTile = Cfg::kBlockN * Cfg::kHeadDim;  // one row tile, elements
  static constexpr int kBytes = (2 * Cfg::kBlockM * Cfg::kHeadDim + 4 * kTile) * sizeof(Elem) +
                                2 * Cfg::kBlockN * 4 * sizeof(float);
};

struct KeySpan {
  int lo, hi, gate, flo, fhi;
  float u;
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    dk_dv_kernel(const __grid_constant__ BwdParams<typename Cfg::Elem> p) {
  using Elem = typename Cfg::Elem;
  using Tile = sm80::AttnTile<Cfg>;
  constexpr int D = Cfg::kHeadDim, BK = Cfg::kBlockM, BR = Cfg::kBlockN;
  constexpr int kThreads = Cfg::kThreads;
  static_assert(BK == kGroupKeys && Cfg::kRowTiles == 1);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* const sK = reinterpret_cast<Elem*>(smem_raw);
  Elem* const sV = sK + BK * D;
  Elem* const sQ0 = sV + BK * D;        // [2][BR * D]
  Elem* const sDo0 = sQ0 + 2 * BR * D;  // [2][BR * D]
  float* const sRow = reinterpret_cast<float*>(sDo0 + 2 * BR * D);  // [2][4][BR]
  __shared__ int sJ[BK];
  __shared__ KeySpan sSpan[BK];
  __shared__ int range_lo, range_hi;

  const int seg = blockIdx.y, b = seg / p.heads_kv, hk = seg % p.heads_kv;
  const int n = p.seqlen_k, diag = n - p.seqlen_q;
  const int64_t key0 = static_cast<int64_t>(seg) * n;
  const int g0 = blockIdx.x * BK;

  if (threadIdx.x == 0) range_lo = INT_MAX, range_hi = INT_MIN;
  __syncthreads();
  for (int c = threadIdx.x; c < BK; c += kThreads) {
    const int slot = g0 + c;
    const int j = slot < n ? (p.perm ? p.perm[key0 + slot] : slot) : -1;
    sJ[c] = j;
    if (j >= 0) {  // rows (as query indices t) attending j: [lo, hi)
      const int lo = p.causal ? max(0, j - diag) : 0;
      const int hi = p.causal ? min(p.seqlen_q, (p.key_end ? p.key_end[key0 + j] : n) - diag)
                              : p.seqlen_q;
      if (lo < hi) atomicMin(&range_lo, lo), atomicMax(&range_hi, hi);
    }
  }
  __syncthreads();
  const int t_lo = range_lo, t_hi = range_hi;
  const int row_blocks = t_lo < t_hi ? (t_hi - t_lo + BR - 1) / BR : 0;
  const int steps = row_blocks * p.group;

  const Elem* const kg = p.k + b * p.k_sb + hk * p.k_sh;
  const Elem* const vg = p.v + b * p.v_sb + hk * p.v_sh;
  sm80::gather_rows_async<BK, D, kThreads>(sK, kg, p.k_ss, [&](int r) { return sJ[r]; });
  sm80::gather_rows_async<BK, D, kThreads>(sV, vg, p.v_ss, [&](int r) { return sJ[r]; });
  sm80::cp_async_commit();

  // Each key slot as row intervals in absolute positions: attended [lo, hi), gated from `gate`
  // on, fractional (and selected) [flo, fhi). Kept in shared memory and read per step: held in
  // registers across the matrix products they made the kernel spill.
  for (int c = threadIdx.x; c < BK; c += kThreads) {
    const int j = sJ[c];
    KeySpan ks{INT_MAX, INT_MIN, INT_MAX, 0, 0, 0.f};  // an empty slot attends nothing
    if (j >= 0) {
      ks.lo = p.causal ? j : INT_MIN;
      ks.hi = p.causal ? (p.key_end ? p.key_end[key0 + j] : n) : n;
      ks.gate = p.causal && p.window < n ? j + p.window : INT_MAX;
      if (p.frac) {
        const int2 f = p.frac[key0 + j];
        ks.flo = max(f.x, ks.gate);
        ks.fhi = min(f.y, p.sel_end[key0 + j]);
      }
      ks.u = p.u ? p.u[b * p.u_sb + hk * p.u_sh + j * p.u_sj] : 0.f;
    }
    sSpan[c] = ks;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool soft = p.frac != nullptr;

  constexpr float kLog2e = 1.4426950408889634f;
  // Loads step s (head hk * group + s / row_blocks, rows t_lo + (s % row_blocks) * BR) into
  // stage s & 1: Q and dO tiles by cp.async, per-row lse (log2 units), delta, threshold, tau.
  auto load_step = [&](int s) {
    const int st = s & 1;
    const int h = hk * p.group + s / row_blocks, t0 = t_lo + (s % row_blocks) * BR;
    sm80::load_tile_async<BR, D, kThreads>(sQ0 + st * BR * D, p.q + b * p.q_sb + h * p.q_sh,
                                           p.q_ss, t0, p.seqlen_q);
    sm80::load_tile_async<BR, D, kThreads>(sDo0 + st * BR * D,
                                           p.dout + b * p.do_sb + h * p.do_sh, p.do_ss, t0,
                                           p.seqlen_q);
    sm80::cp_async_commit();
    float* const rows = sRow + st * 4 * BR;
    for (int r = threadIdx.x; r < BR; r += kThreads) {
      const int t = t0 + r;
      float l2 = 0.f, dl = 0.f, thr = 0.f, tau = -INFINITY;
      if (t < p.seqlen_q) {
        l2 = p.lse[b * p.lse_sb + h * p.lse_sh + t * p.lse_ss] * kLog2e;
        dl = p.delta[(static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + t];
        const int m = t + diag - p.window + 1;
        if (p.thr_u != nullptr && m > p.budget) {
          const int64_t o = static_cast<int64_t>(seg) * (n + 1) + m;
          thr = p.thr_u[o];
          tau = p.tau_rel[o];
        }
      }
      rows[r] = l2, rows[BR + r] = dl, rows[2 * BR + r] = thr, rows[3 * BR + r] = tau;
    }
  };

  typename Tile::OAcc dk, dv;
  typename Tile::RowStat unused_m, unused_l;
  Tile::init(dk, unused_m, unused_l);
  Tile::init(dv, unused_m, unused_l);
  float du_acc[2] = {0.f, 0.f};
  const bool logit_gate = p.gate == 0, value_gate = p.gate != 2;
  const typename Tile::QFrag no_frag{};

  if (steps > 0) load_step(0);
  for (int s = 0; s < steps; ++s) {
    const int st = s & 1;
    sm80::cp_async_wait<0>();
    __syncthreads();  // step s landed (and the keys); everyone is done with step s - 1
    if (s + 1 < steps) load_step(s + 1);
    const Elem* const sQ = sQ0 + st * BR * D;
    const Elem* const sDo = sDo0 + st * BR * D;
    const float* const rows = sRow + st * 4 * BR;
    const int t0 = t_lo + (s % row_blocks) * BR;

    typename Tile::SAcc sc, dp;
    Tile::qk(sc, no_frag, sK, sQ);   // S^T: keys x rows
    Tile::qk(dp, no_frag, sV, sDo);  // dP^T
    // Rows [i0, i0 + BR) of this step: when every pair of the warp is attended and ungated (the
    // window's interior, all of dense attention), the masks and gates are skipped.
    const int i0 = t0 + diag;
    KeySpan ks[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) ks[r] = sSpan[warp * 16 + lane / 4 + 8 * r];
    const bool plain = __all_sync(0xffffffffu, ks[0].lo <= i0 && ks[1].lo <= i0 &&
                                                   i0 + BR <= min(ks[0].hi, ks[1].hi) &&
                                                   i0 + BR <= min(ks[0].gate, ks[1].gate) &&
                                                   i0 + BR <= p.seqlen_k);
    if (plain) {
#pragma unroll
      for (int nt = 0; nt < BR / 8; ++nt) {
        // Columns 2 tq and 2 tq + 1 of the n-tile: one 8-byte load per row quantity.
        const int col = Tile::col_of(nt, 0);
        const float2 l2 = *reinterpret_cast<const float2*>(rows + col);
        const float2 dl2 = *reinterpret_cast<const float2*>(rows + BR + col);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pr = sm80::fast_exp2(sc[0][nt][e] * p.scale_log2 - ((e & 1) ? l2.y : l2.x));
          sc[0][nt][e] = pr * (dp[0][nt][e] - ((e & 1) ? dl2.y : dl2.x)) * p.scale;
          dp[0][nt][e] = pr;
        }
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < BR / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, col = Tile::col_of(nt, e);
          const int i = t0 + col + diag;
          const float x = sc[0][nt][e];
          float pc = 0.f, ds = 0.f;
          if (ks[r].lo <= i && i < ks[r].hi && i < p.seqlen_k) {
            const bool gated = i >= ks[r].gate;
            const float gv =
                gated ? __saturatef((ks[r].u - rows[2 * BR + col]) - rows[3 * BR + col]) : 1.f;
            const float a = logit_gate && gated ? gv : 1.f;
            const float c = value_gate && gated ? gv : 1.f;
            const float pr = sm80::fast_exp2(x * a * p.scale_log2 - rows[col]);
            const float dl = pr * (c * dp[0][nt][e] - rows[BR + col]);
            pc = pr * c;
            ds = dl * a * p.scale;
            if (soft && ks[r].flo <= i && i < ks[r].fhi)
              du_acc[r] += (logit_gate ? dl * x * p.scale : 0.f) + pr * dp[0][nt][e];
          }
          sc[0][nt][e] = ds;
          dp[0][nt][e] = pc;
        }
    }
    Tile::pv(dv, dp, sDo);
    Tile::pv(dk, sc, sQ);
  }
  sm80::cp_async_wait<0>();

  // Each key belongs to one group: plain stores, no reduction across CTAs.
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = sJ[warp * 16 + g + 8 * r];
    float d = du_acc[r];
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    d += __shfl_xor_sync(0xffffffffu, d, 2);
    if (j < 0) continue;
    if (p.du_key != nullptr && tq == 0) p.du_key[key0 + j] = d;
    Elem* const dkr = p.dk + b * p.dk_sb + hk * p.dk_sh + j * p.dk_ss;
    Elem* const dvr = p.dv + b * p.dv_sb + hk * p.dv_sh + j * p.dv_ss;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int col = dt * 8 + 2 * tq;
      *reinterpret_cast<uint32_t*>(dkr + col) = sm80::pack2<Elem>(dk[0][dt][2 * r], dk[0][dt][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(dvr + col) = sm80::pack2<Elem>(dv[0][dt][2 * r], dv[0][dt][2 * r + 1]);
    }
  }
}

// ---- dQ (and the rows' sums of dm over fractional gates) ----------------------------------------

template <class Cfg>
struct DqSmem {
  using Elem = typename Cfg::Elem;
  static constexpr int kBytes = 2 * Cfg::kBlockM * Cfg::kHeadDim * sizeof(Elem) +
                                4 * Cfg::kBlockN * Cfg::kHeadDim * sizeof(Elem) +
                                2 * Cfg::kBlockN * (2 * sizeof(int2) + sizeof(float)) +
                                Cfg::kBlockM * 4 * sizeof(float);
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    dq_kernel(const __grid_constant__ BwdParams<typename Cfg::Elem> p) {
  using Elem = typename Cfg::Elem;
  using Tile = sm80::AttnTile<Cfg>;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN, MT = Cfg::kRowTiles;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kChunkRows = 32;
  static_assert(BM == 128 && BM % kChunkRows == 0);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* const sQ = reinterpret_cast<Elem*>(smem_raw);
  Elem* const sDo = sQ + BM * D;
  Elem* const sK0 = sDo + BM * D;
  Elem* const sV0 = sK0 + 2 * BN * D;
  // Per column of a selected block: the rows selecting it [j + w, e_j), its fractional
  // (and selected) rows, its score.
  int2* const sSpan = reinterpret_cast<int2*>(sV0 + 2 * BN * D);  // [2][BN]
  int2* const sFrac = sSpan + 2 * BN;                              // [2][BN]
  float* const sU = reinterpret_cast<float*>(sFrac + 2 * BN);     // [2][BN]
  // Per row: lse (log2 units) and delta ([heads][positions]); per position: thr, tau.
  float* const sLse = sU + 2 * BN;
  float* const sDelta = sLse + BM;
  float* const sThr = sDelta + BM;
  float* const sTau = sThr + BM;

  // Geometry: the forward's (selected list blocks, then the window band); dense runs as a band
  // of every causal key (or every key when not causal).
  const int heads = p.heads, positions = BM / heads;
  const int h0 = blockIdx.y * heads, b = blockIdx.z, hk = h0 / p.group;
  const int seg = b * p.heads_kv + hk;
  const int n = p.seqlen_k, diag = n - p.seqlen_q;
  const int m0 = blockIdx.x * positions;
  const int t_last = min(m0 + positions, p.seqlen_q) - 1;
  const int i_first = m0 + diag, i_last = t_last + diag;
  int n_sel = 0;
  const int* list = nullptr;
  bool all_in = false;
  if (p.budget > 0) {
    const int lt = m0 / sparsek::kListRows;
    const int64_t li = static_cast<int64_t>(seg) * p.list_tiles + lt;
    n_sel = p.count[li];
    list = p.list ? p.list + li * p.list_cap : nullptr;
    // As in the forward: where the tile's first row has at most k candidates, its keys are the
    // contiguous [0, n_sel) and the list holds only the count.
    all_in = lt * sparsek::kListRows + diag - p.window + 1 <= p.budget;
  }
  const int sel_blocks = (n_sel + BN - 1) / BN;
  int win_first = 0, win_blocks = 0;
  if (!p.causal) {
    win_blocks = (n + BN - 1) / BN;
  } else if (p.window > 0 && i_last >= 0) {
    win_first = max(0, i_first - p.window + 1) / BN;
    win_blocks = min(i_last, n - 1) / BN - win_first + 1;
  }
  const int n_blocks = sel_blocks + win_blocks;

  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t thr0 = static_cast<int64_t>(seg) * (n + 1);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int t = m0 + r % positions, h = h0 + r / positions;
    float l2 = 0.f, dl = 0.f;
    if (t < p.seqlen_q) {
      l2 = p.lse[b * p.lse_sb + h * p.lse_sh + t * p.lse_ss] * kLog2e;
      dl = p.delta[(static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + t];
    }
    sLse[r] = l2, sDelta[r] = dl;
    if (r < positions) {
      const int m = t + diag - p.window + 1;
      float thr = 0.f, tau = -INFINITY;
      if (t < p.seqlen_q && p.thr_u != nullptr && m > p.budget) {
        thr = p.thr_u[thr0 + m];
        tau = p.tau_rel[thr0 + m];
      }
      sThr[r] = thr, sTau[r] = tau;
    }
  }

  const Elem* const kg = p.k + b * p.k_sb + hk * p.k_sh;
  const Elem* const vg = p.v + b * p.v_sb + hk * p.v_sh;
  const float* const ug = p.u ? p.u + b * p.u_sb + hk * p.u_sh : nullptr;
  auto key_row = [&](int nb, int slot) {
    if (nb < sel_blocks) {
      const int s = nb * BN + slot;
      return s >= n_sel ? -1 : (all_in ? s : __ldg(list + s));
    }
    const int j = (win_first + nb - sel_blocks) * BN + slot;
    return j < n ? j : -1;
  };
  auto load_block = [&](int nb) {
    const int st = nb & 1;
    Elem* const sK = sK0 + st * BN * D;
    Elem* const sV = sV0 + st * BN * D;
    if (nb < sel_blocks) {
      if (all_in) {
        sm80::load_tile_async<BN, D, kThreads>(sK, kg, p.k_ss, nb * BN, n_sel);
        sm80::load_tile_async<BN, D, kThreads>(sV, vg, p.v_ss, nb * BN, n_sel);
      } else {
        sm80::gather_tile_async<BN, D, kThreads>(sK, kg, p.k_ss, list, nb * BN, n_sel);
        sm80::gather_tile_async<BN, D, kThreads>(sV, vg, p.v_ss, list, nb * BN, n_sel);
      }
      for (int c = threadIdx.x; c < BN; c += kThreads) {
        const int j = key_row(nb, c);
        int2 span = make_int2(INT_MAX, INT_MIN), fr = make_int2(0, 0);
        float x = 0.f;
        if (j >= 0) {
          const int64_t e = static_cast<int64_t>(seg) * n + j;
          x = ug[j * p.u_sj];
          span = make_int2(j + p.window, p.sel_end[e]);
          if (p.frac) fr = make_int2(max(p.frac[e].x, span.x), min(p.frac[e].y, span.y));
        }
        sSpan[st * BN + c] = span;
        sFrac[st * BN + c] = fr;
        sU[st * BN + c] = x;
      }
    } else {
      const int n0 = (win_first + nb - sel_blocks) * BN;
      sm80::load_tile_async<BN, D, kThreads>(sK, kg, p.k_ss, n0, n);
      sm80::load_tile_async<BN, D, kThreads>(sV, vg, p.v_ss, n0, n);
    }
    sm80::cp_async_commit();
  };

  typename Tile::OAcc dq;
  typename Tile::RowStat unused_m, unused_l;
  Tile::init(dq, unused_m, unused_l);
  float dm_acc[MT][2] = {};
  const bool logit_gate = p.gate == 0;
  const typename Tile::QFrag no_frag{};

  if (n_blocks > 0) {
    for (int c = 0; c < BM / kChunkRows; ++c) {
      const int r0 = c * kChunkRows;
      const int h = h0 + r0 / positions;
      sm80::load_tile_async<kChunkRows, D, kThreads>(sQ + r0 * D, p.q + b * p.q_sb + h * p.q_sh,
                                                     p.q_ss, m0 + r0 % positions, p.seqlen_q);
      sm80::load_tile_async<kChunkRows, D, kThreads>(
          sDo + r0 * D, p.dout + b * p.do_sb + h * p.do_sh, p.do_ss, m0 + r0 % positions,
          p.seqlen_q);
    }
    load_block(0);
    for (int nb = 0; nb < n_blocks; ++nb) {
      const int st = nb & 1;
      sm80::cp_async_wait<0>();
      __syncthreads();
      if (nb + 1 < n_blocks) load_block(nb + 1);
      const Elem* const sK = sK0 + st * BN * D;
      const Elem* const sV = sV0 + st * BN * D;
      typename Tile::SAcc sc, dp;
      Tile::qk(sc, no_frag, sQ, sK);
      Tile::qk(dp, no_frag, sDo, sV);
      const bool selected = nb < sel_blocks;
      const int n0 = selected ? 0 : (win_first + nb - sel_blocks) * BN;
      // A window block inside every row's window (and rows all real) needs no mask.
      const bool plain = !selected && m0 + positions <= p.seqlen_q && n0 + BN <= n &&
                         (!p.causal || (n0 + BN - 1 <= i_first && n0 > i_last - p.window));
      const bool soft = p.frac != nullptr;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = Tile::row_of(mt, e), pos = row % positions;
          const int t = m0 + pos, i = t + diag;
          const float l2 = sLse[row], dlt = sDelta[row];
          const float thr = sThr[pos], tau = sTau[pos];
          const bool row_ok = t < p.seqlen_q;
#pragma unroll
          for (int nt = 0; nt < BN / 8; ++nt) {
            const int col = Tile::col_of(nt, e);
            const float x = sc[mt][nt][e];
            float ds;
            if (plain) {
              const float pr = sm80::fast_exp2(x * p.scale_log2 - l2);
              ds = pr * (dp[mt][nt][e] - dlt) * p.scale;
            } else if (selected) {
              const int2 span = sSpan[st * BN + col];
              ds = 0.f;
              if (row_ok && span.x <= i && i < span.y) {
                float a = 1.f, c = 1.f;
                if (p.gate != 2) {
                  const float gv = __saturatef((sU[st * BN + col] - thr) - tau);
                  a = logit_gate ? gv : 1.f;
                  c = gv;
                }
                const float pr = sm80::fast_exp2(x * a * p.scale_log2 - l2);
                const float dl = pr * (c * dp[mt][nt][e] - dlt);
                ds = dl * a * p.scale;
                if (soft) {
                  const int2 f = sFrac[st * BN + col];
                  if (f.x <= i && i < f.y)
                    dm_acc[mt][e >> 1] +=
                        (logit_gate ? dl * x * p.scale : 0.f) + pr * dp[mt][nt][e];
                }
              }
            } else {
              const int j = n0 + col;
              ds = 0.f;
              if (row_ok && j < n && (!p.causal || (j <= i && j > i - p.window))) {
                const float pr = sm80::fast_exp2(x * p.scale_log2 - l2);
                ds = pr * (dp[mt][nt][e] - dlt) * p.scale;
              }
            }
            sc[mt][nt][e] = ds;
          }
        }
      Tile::pv(dq, sc, sK);
    }
  }
  sm80::cp_async_wait<0>();

  const int lane = threadIdx.x % 32, tq = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = Tile::row_of(mt, 2 * r);
      const int t = m0 + row % positions, h = h0 + row / positions;
      float d = dm_acc[mt][r];
      d += __shfl_xor_sync(0xffffffffu, d, 1);
      d += __shfl_xor_sync(0xffffffffu, d, 2);
      if (t >= p.seqlen_q) continue;
      if (p.dm_row != nullptr && tq == 0)
        p.dm_row[(static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + t] = d;
      Elem* const dqr = p.dq + b * p.dq_sb + h * p.dq_sh + t * p.dq_ss;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(dqr + dt * 8 + 2 * tq) =
            sm80::pack2<Elem>(dq[mt][dt][2 * r], dq[mt][dt][2 * r + 1]);
    }
}

}  // namespace bsk::kernels::bwd
