// One query position per sequence against a list of cached K/V rows (decoding), split across
// CTAs along the rows when there are few (sequence, KV head) groups (flash-decoding), with a
// deterministic combine. Memory-bound: every cached row is read once per KV group, for all the
// query heads of the group at once (GQA), with tensor-core products.
//
// The rows of group (b, g) are a "virtual" list: rows [0, nA) weigh 1, and rows [nA, nA + nB)
// are SparseK's selected keys, stored from physical row `window` on, each gated by
// m = clip(u - tau, 0, 1) (docs/SPARSEK_SPEC.md, Output). Dense decoding is nA = Skv, nB = 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include <cute/arch/copy_sm80.hpp>

#include "common/sparsek_tau_walk.h"
#include "kernels/decode_trace.cuh"
#include "kernels/sm80_primitives.cuh"

namespace bsk::kernels::decode {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 16 * kWarps;  // rows per pipeline stage: one 16-row mma tile per warp
constexpr int kStages = 3;
constexpr int kHeads = 8;  // query heads per CTA: the mma's n = 8
// Splits per group at most (their combine weights live in the tiles' shared memory).
constexpr int kMaxSplits = 256;

template <typename Elem>
struct DecodeParams {
  const Elem* q;  // q[b, 0, hq, :] at q + b * q_sb + hq * q_sh
  int64_t q_sb, q_sh;
  const Elem* k;  // row r of (b, g) at k + b * k_sb + r * k_sr + g * k_sh
  const Elem* v;
  int64_t k_sb, k_sr, k_sh, v_sb, v_sr, v_sh;
  Elem* out;  // out[b, 0, hq, :]
  int64_t o_sb, o_sh;
  float* lse;  // lse[b, hq, 0] or null
  int64_t l_sb, l_sh;
  // Rows: dense (counts == null): rows_dense rows, weight 1. Cache: counts[(b*Hkv+g)*3 + {0,2}]
  // = tokens seen, selected rows; the window holds min(window, tokens) rows from row 0, the
  // selected ones start at row `window` and are gated by slot_u / tau.
  int rows_dense;
  const int* counts;
  const float* slot_u;  // [B * Hkv, slot_rows]
  const double* tau;    // [B * Hkv]
  const int* status;    // non-zero: the cache is broken, outputs are NaN
  int window, slot_rows;
  int gate;  // 0 key_value, 1 value, 2 none
  int batch, heads_q, heads_kv, group, head_chunks;
  float scale_log2;  // softmax_scale * log2(e)
  int split_rows, splits;
  float* part_o;   // [splits, B, Hq, D] (splits > 1)
  float* part_ml;  // [splits, B, Hq, 2]: running max (log2 domain), denominator
  int* counters;   // [B, Hkv * head_chunks], zero at launch (splits > 1)
  // Fused decode step (launched as a programmatic dependent of the cache append): per group the
  // two rows the append rewrites (skcache::StepLink); null otherwise. See the kernel.
  const int* changed;
};

// Waits for the kernel this one depends on (programmatic dependent launch, sm_90+): its writes
// are visible after it. Returns at once when there is none.
__device__ __forceinline__ void wait_for_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// float -> the element type, round to nearest.
template <typename Elem>
struct Round;
template <>
struct Round<__half> {
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Round<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// A head's final values from its merged numerator o (one dim) and denominator den at max mx (log2
// units): out = o / den (0 for a head that saw no key), LSE in natural log; NaN for a group whose
// cache is broken (the step reports it).
template <typename Elem>
__device__ __forceinline__ Elem final_out(float o, float den, bool broken) {
  return Round<Elem>::from_float(broken ? __int_as_float(0x7fc00000) : (den > 0.f ? o / den : 0.f));
}
__device__ __forceinline__ float final_lse(float mx, float den, bool broken) {
  return broken ? __int_as_float(0x7fc00000)
                : (den > 0.f ? (mx + log2f(den)) * 0.69314718055994531f : -INFINITY);
}

struct GroupRows {
  int na, nb;  // ungated rows, gated rows
  double tau;
};

template <typename Elem>
__device__ __forceinline__ GroupRows group_rows(const DecodeParams<Elem>& p, int grp) {
  if (p.counts == nullptr) return {p.rows_dense, 0, -INFINITY};
  const int* c = p.counts + 3 * grp;
  return {min(p.window, c[0]), c[2], p.tau[grp]};
}

template <int kD, typename Elem>
struct DecodeSmem {
  static constexpr int kStageElems = 2 * kChunk * kD;  // K rows, then V rows (swizzled)
  static constexpr int kBytes = kStages * kStageElems * static_cast<int>(sizeof(Elem));
};

// The final output of heads [h0, h0 + nh) from `splits` partials, in split order. The split
// weights come first, into shared memory (one L2 load per (split, head), all in parallel), so
// each output element then sums independent loads instead of walking two dependent chains.
template <typename Elem, int kD>
__device__ void combine_partials(const DecodeParams<Elem>& p, int b, int h0, int nh, bool broken,
                                 float (*s_w)[kHeads], float* s_den, float* s_mx) {
  const int64_t stride = static_cast<int64_t>(p.batch) * p.heads_q;
  const int64_t bh0 = static_cast<int64_t>(b) * p.heads_q + h0;
  float(*s_l)[kHeads] = s_w + kMaxSplits;  // the splits' denominators
  for (int i = threadIdx.x; i < p.splits * nh; i += kThreads) {
    const int sp = i / nh, h = i % nh;
    const float2 ml = __ldcg(reinterpret_cast<const float2*>(p.part_ml + 2 * (sp * stride + bh0 + h)));
    s_w[sp][h] = ml.x, s_l[sp][h] = ml.y;  // the split's max (a weight soon) and denominator
  }
  __syncthreads();
  BSK_TRACE_CTA(kCombinePairs);
  if (threadIdx.x < nh) {
    const int h = threadIdx.x;
    float mx = -INFINITY;
    for (int sp = 0; sp < p.splits; ++sp) mx = fmaxf(mx, s_w[sp][h]);
    const float ref = mx == -INFINITY ? 0.f : mx;
    float den = 0.f;
    for (int sp = 0; sp < p.splits; ++sp) {
      const float w = exp2f(s_w[sp][h] - ref);
      s_w[sp][h] = w;
      den = fmaf(s_l[sp][h], w, den);
    }
    s_den[h] = den, s_mx[h] = mx;
  }
  __syncthreads();
  BSK_TRACE_CTA(kCombineWeights);
  // Four dims per thread (float4): every split's load is in flight at once.
  for (int idx = threadIdx.x; idx < nh * kD / 4; idx += kThreads) {
    const int h = idx / (kD / 4), d = idx % (kD / 4) * 4, hq = h0 + h;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int sp = 0; sp < p.splits; ++sp) {
      const float4 x = __ldcg(reinterpret_cast<const float4*>(p.part_o + (sp * stride + bh0 + h) * kD + d));
      const float w = s_w[sp][h];
      o.x = fmaf(x.x, w, o.x), o.y = fmaf(x.y, w, o.y), o.z = fmaf(x.z, w, o.z), o.w = fmaf(x.w, w, o.w);
    }
    const float den = s_den[h];
    const float ox[4] = {o.x, o.y, o.z, o.w};
    Elem* dst = p.out + b * p.o_sb + hq * p.o_sh + d;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      dst[j] = final_out<Elem>(ox[j], den, broken);
    if (d == 0 && p.lse != nullptr) p.lse[b * p.l_sb + hq * p.l_sh] = final_lse(s_mx[h], den, broken);
  }
}

// grid: (splits, Hkv * head_chunks, B); kHeads = 8 query heads of one KV group per CTA (one mma
// n-tile; larger groups take several CTAs). Rows stream through a kStages-deep cp.async pipeline
// of kChunk-row K/V tiles. The products run on tensor cores with the rows as the M dimension:
// S^T = K Q^T (each warp one 16-row tile, Q^T as the B operand in registers) and
// O^T += V^T P^T (each warp its own 16 rows, all D output dims; P^T transposed in registers from
// the S^T accumulators), so the per-row work is a few mma instructions instead of a dot product
// and a shuffle reduction per head (which made an earlier CUDA-core version issue-bound at ~55%
// of the copy bandwidth). With splits > 1 the last CTA of a group to finish combines the
// partials, in split order (deterministic); `counters` (zeroed per launch) count the arrivals.
template <typename Elem, int kD>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const DecodeParams<Elem> p) {
  using sm80::ldsm_x4;
  using sm80::ldsm_x4_trans;
  using sm80::swizzle;
  constexpr int kVecs = kChunk * kD / 8;  // 16-byte vectors per K (or V) tile
  constexpr int kDimTiles = kD / 16;  // output m-tiles (16 dims): every warp holds all D dims
  const int split = blockIdx.x;
  const int g = blockIdx.y / p.head_chunks;
  const int h0 = g * p.group + (blockIdx.y % p.head_chunks) * kHeads;
  const int nh = min(kHeads, g * p.group + p.group - h0);
  const int b = blockIdx.z;
  const int grp = b * p.heads_kv + g;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gq = lane / 4, tq = lane % 4;
  BSK_TRACE_CTA_BEGIN();

  extern __shared__ uint4 smem_raw[];
  Elem* tiles = reinterpret_cast<Elem*>(smem_raw);
  __shared__ float s_u[kStages][kChunk];  // scores of the gated rows, staged with their K/V
  __shared__ float s_wm[kWarps][kHeads], s_wl[kWarps][kHeads];  // per warp: max, denominator
  __shared__ float s_max[kHeads], s_den[kHeads];  // the combine's scratch
  __shared__ bool s_last;

  const Elem* kb = p.k + b * p.k_sb + g * p.k_sh;
  const Elem* vb = p.v + b * p.v_sb + g * p.v_sh;
  // Plain locals, not captures of p: taking the address of a kernel parameter (a lambda
  // capturing p by reference, or copying it) puts it in local memory.
  const int window = p.window, gate = p.gate;
  const int64_t k_sr = p.k_sr, v_sr = p.v_sr;
  const float* su = p.slot_u + static_cast<int64_t>(grp) * p.slot_rows;
  const int r_begin = split * p.split_rows;
  int na = 0, r_end = 0, chunks = 0;
  auto set_rows = [&](int na_, int nb_) {
    na = na_;
    r_end = min(na_ + nb_, r_begin + p.split_rows);
    chunks = r_end > r_begin ? (r_end - r_begin + kChunk - 1) / kChunk : 0;
  };
  auto physical = [&](int r) { return r < na ? r : window + (r - na); };

  auto load_chunk = [&](int c) {
    Elem* st = tiles + (c % kStages) * DecodeSmem<kD, Elem>::kStageElems;
    const int c0 = r_begin + c * kChunk;
#pragma unroll
    for (int t = tid; t < 2 * kVecs; t += kThreads) {
      const bool is_v = t >= kVecs;
      const int e = is_v ? t - kVecs : t, i = e / (kD / 8), col = (e % (kD / 8)) * 8;
      const bool valid = c0 + i < r_end;
      const int pr = valid ? physical(c0 + i) : 0;
      const Elem* src = (is_v ? vb + pr * v_sr : kb + pr * k_sr) + col;
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(src),
          *reinterpret_cast<cute::uint128_t*>(st + (is_v ? kChunk * kD : 0) + swizzle<kD>(i, col)),
          valid);
    }
    // The gated rows' scores ride in the same cp.async group.
    for (int i = tid; i < kChunk; i += kThreads) {
      const int r = c0 + i;
      if (r < r_end && r >= na && gate != 2)
        cute::SM80_CP_ASYNC_CACHEALWAYS<uint32_t>::copy(
            *reinterpret_cast<const uint32_t*>(su + physical(r)),
            *reinterpret_cast<uint32_t*>(&s_u[c % kStages][i]));
    }
  };
  auto prologue = [&] {
#pragma unroll
    for (int c = 0; c < kStages - 1; ++c) {
      if (c < chunks) load_chunk(c);
      cute::cp_async_fence();
    }
  };
  // Fused step: the append that precedes this kernel may still be running. In the steady state
  // (window full, k rows selected: every row in use, in physical order) the rows' places do not
  // depend on it, and it rewrites two of them, so the first stages load now and those two rows
  // are reloaded once it has finished; any other state loads after it.
  const int steady_nb = p.slot_rows - window;
  const bool speculate = p.changed != nullptr && steady_nb >= 0;
  if (speculate) {
    set_rows(window, steady_nb);
    prologue();
  }
  BSK_TRACE_CTA(kEarlyLoads);
  wait_for_primary();
  BSK_TRACE_CTA(kWaited);
  // The rewritten rows load with the counts (one round trip after the wait, not two).
  int changed0 = -1, changed1 = -1;
  if (speculate) changed0 = __ldcg(p.changed + 2 * grp), changed1 = __ldcg(p.changed + 2 * grp + 1);
  const GroupRows gr = group_rows(p, grp);
  const bool broken = p.status != nullptr && p.status[0] != 0;
  const bool patch = speculate && gr.na == window && gr.nb == steady_nb;
  if (patch) {
    // The rewritten rows among the early loads (the first kStages - 1 chunks): reload them once
    // those loads have landed.
    const int early_end = min(r_end, r_begin + (kStages - 1) * kChunk);
    const bool hit0 = changed0 >= r_begin && changed0 < early_end;
    const bool hit1 = changed1 >= r_begin && changed1 < early_end;
    if (hit0 || hit1) {
      cute::cp_async_wait<0>();
      __syncthreads();
      for (int t = tid; t < 4 * (kD / 8); t += kThreads) {
        const int r = t < 2 * (kD / 8) ? changed0 : changed1;
        if (!(t < 2 * (kD / 8) ? hit0 : hit1)) continue;
        const int c = (r - r_begin) / kChunk, i = (r - r_begin) % kChunk;
        const bool is_v = (t % (2 * (kD / 8))) >= kD / 8;
        const int col = (t % (kD / 8)) * 8;
        Elem* st = tiles + (c % kStages) * DecodeSmem<kD, Elem>::kStageElems;
        const uint4 x = __ldcg(reinterpret_cast<const uint4*>((is_v ? vb + r * v_sr : kb + r * k_sr) + col));
        *reinterpret_cast<uint4*>(st + (is_v ? kChunk * kD : 0) + swizzle<kD>(i, col)) = x;
        if (col == 0 && !is_v && r >= na && gate != 2) s_u[c % kStages][i] = __ldcg(su + r);
      }
      __syncthreads();
    }
  } else {
    if (speculate) {  // wrong guess: drop those loads
      cute::cp_async_wait<0>();
      __syncthreads();
    }
    set_rows(gr.na, gr.nb);
    prologue();
  }

  BSK_TRACE_CTA(kRowsKnown);
  // Q^T as the B operand of S^T = K Q^T: b0 = (dims 2t, 2t+1), b1 = (dims 2t+8, 2t+9) of head gq
  // for each 16-dim k-step; heads past nh are zero.
  uint32_t qb[kD / 16][2];
  {
    const uint32_t* qrow = reinterpret_cast<const uint32_t*>(p.q + b * p.q_sb + (h0 + gq) * p.q_sh);
#pragma unroll
    for (int ks = 0; ks < kD / 16; ++ks) {
      qb[ks][0] = gq < nh ? qrow[(ks * 16 + 2 * tq) / 2] : 0u;
      qb[ks][1] = gq < nh ? qrow[(ks * 16 + 2 * tq + 8) / 2] : 0u;
    }
  }
  // Each warp runs its own online softmax over its 16 rows of every chunk (per head: the max
  // across the warp, the sum per thread until the end) and accumulates O^T for all D dims of
  // the 8 heads, so a chunk needs one barrier (the stage ring) and no shared-memory round trip
  // of the logits: at batch 1 the kernel is bound by each warp's instruction latency, not by
  // the bandwidth. The warps' partial outputs merge once, after the last chunk.
  float acc[kDimTiles][4];
#pragma unroll
  for (int mt = 0; mt < kDimTiles; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;
  float mx[2] = {-INFINITY, -INFINITY};  // running max (log2 domain) of heads 2tq, 2tq + 1
  float den[2] = {0.f, 0.f};             // this thread's rows' share of their denominators

  for (int c = 0; c < chunks; ++c) {
    cute::cp_async_wait<kStages - 2>();
    __syncthreads();  // chunk c has landed; chunk c - 1's stage is free
    if (c + kStages - 1 < chunks) load_chunk(c + kStages - 1);
    cute::cp_async_fence();
    if (c == 0) BSK_TRACE_CTA(kChunk0);
    const Elem* ks_tile = tiles + (c % kStages) * DecodeSmem<kD, Elem>::kStageElems;
    const Elem* vs_tile = ks_tile + kChunk * kD;
    const int c0 = r_begin + c * kChunk, n = min(kChunk, r_end - c0);
    // S^T for this warp's 16 rows: A = K rows (m = row, k = dim), ldmatrix without transpose.
    // sacc[e]: row warp*16 + gq + 8*(e>>1), head 2*tq + (e&1).
    float sacc[4] = {0.f, 0.f, 0.f, 0.f};
    {
      const int a_row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int a_col = ((lane >> 4) & 1) * 8;
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        uint32_t a[4];
        ldsm_x4(ks_tile + swizzle<kD>(a_row, ks * 16 + a_col), a);
        sm80::mma_16x8x16<Elem>(sacc, a, qb[ks][0], qb[ks][1]);
      }
    }
    // Gates of the thread's two rows, logits, the chunk's max per head across the warp.
    float g[2], x[4];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int i = warp * 16 + gq + 8 * hr;
      g[hr] = i < n ? 1.f : 0.f;
      if (i < n && c0 + i >= na && gate != 2)
        g[hr] = static_cast<float>(
            bsk::detail::clip_gate(static_cast<double>(s_u[c % kStages][i]) - gr.tau));
#pragma unroll
      for (int hc = 0; hc < 2; ++hc) {
        const float sv = sacc[2 * hr + hc] * p.scale_log2;
        x[2 * hr + hc] = i < n ? (gate == 0 ? g[hr] * sv : sv) : -INFINITY;
      }
    }
    float alpha[2], pw[4];
#pragma unroll
    for (int hc = 0; hc < 2; ++hc) {
      float m = fmaxf(x[hc], x[2 + hc]);
#pragma unroll
      for (int off = 4; off < 32; off *= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      const float m_new = fmaxf(mx[hc], m);
      const float ref = m_new == -INFINITY ? 0.f : m_new;
      alpha[hc] = exp2f(mx[hc] - ref);
      mx[hc] = m_new;
      const float e0 = exp2f(x[hc] - ref), e1 = exp2f(x[2 + hc] - ref);
      den[hc] = den[hc] * alpha[hc] + (e0 + e1);
      pw[hc] = e0 * g[0], pw[2 + hc] = e1 * g[1];  // value weights: rows gq, gq + 8
    }
#pragma unroll
    for (int mt = 0; mt < kDimTiles; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][e] *= alpha[e & 1];
    // P^T as the B operand of O^T += V^T P^T (k = row, n = head): the (row, head) weights are
    // two 8 x 8 matrices in the accumulator's row layout; transposed in registers they are b0
    // (rows 0-7) and b1 (rows 8-15).
    const uint32_t b0 = sm80::transpose8x8(sm80::pack2<Elem>(pw[0], pw[1]));
    const uint32_t b1 = sm80::transpose8x8(sm80::pack2<Elem>(pw[2], pw[3]));
    // A = V^T (m = dim, k = row) by ldmatrix with transpose from this warp's 16 rows.
    // acc[mt][e]: dim mt*16 + gq + 8*(e>>1), head 2tq + (e&1).
    const int v_row = warp * 16 + (lane & 7) + ((lane >> 4) & 1) * 8, v_col = ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int mt = 0; mt < kDimTiles; ++mt) {
      uint32_t a[4];
      ldsm_x4_trans(vs_tile + swizzle<kD>(v_row, mt * 16 + v_col), a);
      sm80::mma_16x8x16<Elem>(acc[mt], a, b0, b1);
    }
  }
  BSK_TRACE_CTA(kLoopDone);
  cute::cp_async_wait<0>();
#pragma unroll
  for (int hc = 0; hc < 2; ++hc)
#pragma unroll
    for (int off = 4; off < 32; off *= 2) den[hc] += __shfl_xor_sync(0xffffffffu, den[hc], off);
  __syncthreads();  // every warp is done with the tiles: their space holds the warps' partials

  // The warps' partials merge in warp order (deterministic): s_po[w][h][d], s_wm / s_wl[w][h].
  float* s_po = reinterpret_cast<float*>(smem_raw);
  if (gq == 0)
#pragma unroll
    for (int hc = 0; hc < 2; ++hc) {
      s_wm[warp][2 * tq + hc] = mx[hc];
      s_wl[warp][2 * tq + hc] = den[hc];
    }
#pragma unroll
  for (int mt = 0; mt < kDimTiles; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      s_po[(warp * kHeads + 2 * tq + (e & 1)) * kD + mt * 16 + gq + 8 * (e >> 1)] = acc[mt][e];
  __syncthreads();
  for (int idx = tid; idx < nh * kD; idx += kThreads) {
    const int h = idx / kD, d = idx % kD, hq = h0 + h;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, s_wm[w][h]);
    const float ref = m_all == -INFINITY ? 0.f : m_all;
    float o = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float sc = exp2f(s_wm[w][h] - ref);
      o = fmaf(s_po[(w * kHeads + h) * kD + d], sc, o);
      l = fmaf(s_wl[w][h], sc, l);
    }
    if (p.splits == 1) {
      p.out[b * p.o_sb + hq * p.o_sh + d] = final_out<Elem>(o, l, broken);
      if (d == 0 && p.lse != nullptr) p.lse[b * p.l_sb + hq * p.l_sh] = final_lse(m_all, l, broken);
    } else {
      const int64_t row = (static_cast<int64_t>(split) * p.batch + b) * p.heads_q + hq;
      p.part_o[row * kD + d] = o;
      if (d == 0) p.part_ml[2 * row] = m_all, p.part_ml[2 * row + 1] = l;
    }
  }
  BSK_TRACE_CTA(kPartials);
  BSK_TRACE_CTA_CLOCK(kClockPartials);
  if (p.splits == 1) return;
  __threadfence();  // this CTA's partials are visible before it is counted
  __syncthreads();
  if (tid == 0) {
    int* counter = p.counters + b * gridDim.y + blockIdx.y;
    s_last = atomicAdd(counter, 1) == p.splits - 1;
    if (s_last) *counter = 0;
  }
  __syncthreads();
  BSK_TRACE_CTA(kCounted);
  if (!s_last) return;
  __threadfence();
  BSK_TRACE_CTA(kCombineFence);
  // The weights of up to kMaxSplits splits: the tiles' space is free now.
  combine_partials<Elem, kD>(p, b, h0, nh, broken, reinterpret_cast<float (*)[kHeads]>(smem_raw),
                             s_den, s_max);
  BSK_TRACE_CTA(kCombined);
}

}  // namespace bsk::kernels::decode
