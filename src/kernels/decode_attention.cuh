// One query position per sequence against a list of cached K/V rows (decoding), split across
// CTAs along the rows when there are few (sequence, KV head) groups (flash-decoding), with a
// deterministic combine. Memory-bound: every cached row is read once per KV group, for all the
// query heads of the group at once (GQA), in 16-byte vectors.
//
// The rows of group (b, g) are a "virtual" list: rows [0, nA) weigh 1, and rows [nA, nA + nB)
// are SparseK's selected keys, stored from physical row `gated_base` on, each gated by
// m = clip(u - tau, 0, 1) (docs/SPARSEK_SPEC.md, Output). Dense decoding is nA = Skv, nB = 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include <cute/arch/copy_sm80.hpp>

#include "common/sparsek_tau_walk.h"

namespace bsk::kernels::decode {

constexpr int kThreads = 128;
constexpr int kChunk = 64;  // rows per pipeline stage (K and V tiles)
constexpr int kStages = 3;

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
};

template <typename Elem>
struct Vec8;
template <>
struct Vec8<__half> {
  __device__ static void to_float(const uint4& r, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(h[i]);
      f[2 * i] = x.x, f[2 * i + 1] = x.y;
    }
  }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Vec8<__nv_bfloat16> {
  __device__ static void to_float(const uint4& r, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x, f[2 * i + 1] = x.y;
    }
  }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

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
  static constexpr int kStageElems = 2 * kChunk * kD;  // K rows, then V rows
  static constexpr int kBytes = kStages * kStageElems * static_cast<int>(sizeof(Elem));
};

// The final output of heads [h0, h0 + nh) from `splits` partials, in split order.
template <typename Elem, int kD>
__device__ void combine_partials(const DecodeParams<Elem>& p, int b, int h0, int nh, bool broken) {
  const int64_t stride = static_cast<int64_t>(p.batch) * p.heads_q;
  const float nan = __int_as_float(0x7fc00000);
  for (int idx = threadIdx.x; idx < nh * kD; idx += kThreads) {
    const int hq = h0 + idx / kD, d = idx % kD;
    const int64_t bh = static_cast<int64_t>(b) * p.heads_q + hq;
    float mx = -INFINITY;
    for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, __ldcg(p.part_ml + 2 * (s * stride + bh)));
    const float ref = mx == -INFINITY ? 0.f : mx;
    float den = 0.f, o = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      const int64_t row = s * stride + bh;
      const float w = exp2f(__ldcg(p.part_ml + 2 * row) - ref);
      den = fmaf(__ldcg(p.part_ml + 2 * row + 1), w, den);
      o = fmaf(__ldcg(p.part_o + row * kD + d), w, o);
    }
    p.out[b * p.o_sb + hq * p.o_sh + d] =
        Vec8<Elem>::from_float(broken ? nan : (den > 0.f ? o / den : 0.f));
    if (d == 0 && p.lse != nullptr)
      p.lse[b * p.l_sb + hq * p.l_sh] =
          broken ? nan : (den > 0.f ? (mx + log2f(den)) * 0.69314718055994531f : -INFINITY);
  }
}

// grid: (splits, Hkv * head_chunks, B); up to kMaxHeads query heads of one KV group per CTA (1, 4
// or 8: registers hold kMaxHeads x 8 query values and accumulators per thread). Rows stream
// through a kStages-deep cp.async pipeline of kChunk-row K/V tiles, so a CTA keeps loads in
// flight while it computes (the kernel is bound by memory bandwidth, or at batch 1 by latency).
// Each thread owns 8 consecutive dims of one row at a time: kLanes = D / 8 lanes per row,
// kThreads / kLanes rows at once. With splits > 1 the last CTA of a group to finish combines the
// partials, in split order (deterministic); `counters` (zeroed per launch) count the arrivals.
template <typename Elem, int kD, int kMaxHeads>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const DecodeParams<Elem> p) {
  constexpr int kLanes = kD / 8;
  constexpr int kRowsPar = kThreads / kLanes;
  constexpr int kVecs = kChunk * kLanes;  // 16-byte vectors per K (or V) tile
  const int split = blockIdx.x;
  const int g = blockIdx.y / p.head_chunks;
  const int h0 = g * p.group + (blockIdx.y % p.head_chunks) * kMaxHeads;
  const int nh = min(kMaxHeads, g * p.group + p.group - h0);
  const int b = blockIdx.z;
  const int grp = b * p.heads_kv + g;
  const int tid = threadIdx.x, lane_in_row = tid % kLanes, row_par = tid / kLanes;

  extern __shared__ uint4 smem_raw[];
  Elem* tiles = reinterpret_cast<Elem*>(smem_raw);
  __shared__ float s_logit[kMaxHeads][kChunk];
  __shared__ float s_gate[kChunk];
  __shared__ float s_u[kStages][kChunk];  // scores of the gated rows, staged with their K/V
  __shared__ float s_alpha[kMaxHeads];
  __shared__ float s_max[kMaxHeads], s_den[kMaxHeads];
  __shared__ bool s_last;
  float* s_red = reinterpret_cast<float*>(smem_raw);  // reuses the tiles after the loop

  const GroupRows gr = group_rows(p, grp);
  const int total = gr.na + gr.nb;
  const int r_begin = split * p.split_rows;
  const int r_end = min(total, r_begin + p.split_rows);
  const int chunks = r_end > r_begin ? (r_end - r_begin + kChunk - 1) / kChunk : 0;
  const bool broken = p.status != nullptr && p.status[0] != 0;
  const Elem* kb = p.k + b * p.k_sb + g * p.k_sh;
  const Elem* vb = p.v + b * p.v_sb + g * p.v_sh;
  auto physical = [=](int r) { return r < gr.na ? r : p.window + (r - gr.na); };

  auto load_chunk = [=](int c) {
    Elem* st = tiles + (c % kStages) * DecodeSmem<kD, Elem>::kStageElems;
    const int c0 = r_begin + c * kChunk;
    for (int t = tid; t < 2 * kVecs; t += kThreads) {
      const bool is_v = t >= kVecs;
      const int e = is_v ? t - kVecs : t, i = e / kLanes, col = (e % kLanes) * 8;
      const bool valid = c0 + i < r_end;
      const int pr = valid ? physical(c0 + i) : 0;
      const Elem* src = (is_v ? vb + pr * p.v_sr : kb + pr * p.k_sr) + col;
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(src),
          *reinterpret_cast<cute::uint128_t*>(st + (is_v ? kChunk * kD : 0) + i * kD + col),
          valid);
    }
    // The gated rows' scores ride in the same cp.async group (a load per row on the critical
    // path of the scores would stall every chunk).
    for (int i = tid; i < kChunk; i += kThreads) {
      const int r = c0 + i;
      if (r < r_end && r >= gr.na && p.gate != 2)
        cute::SM80_CP_ASYNC_CACHEALWAYS<uint32_t>::copy(
            *reinterpret_cast<const uint32_t*>(p.slot_u + static_cast<int64_t>(grp) * p.slot_rows + physical(r)),
            *reinterpret_cast<uint32_t*>(&s_u[c % kStages][i]));
    }
  };
#pragma unroll
  for (int c = 0; c < kStages - 1; ++c) {
    if (c < chunks) load_chunk(c);
    cute::cp_async_fence();
  }

  float qf[kMaxHeads][8];
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h) {
    if (h < nh) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p.q + b * p.q_sb + (h0 + h) * p.q_sh +
                                                        lane_in_row * 8);
      Vec8<Elem>::to_float(raw, qf[h]);
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[h][i] *= p.scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[h][i] = 0.f;
    }
  }
  float acc[kMaxHeads][8];
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
  if (tid < kMaxHeads) s_max[tid] = -INFINITY, s_den[tid] = 0.f;

  for (int c = 0; c < chunks; ++c) {
    cute::cp_async_wait<kStages - 2>();
    __syncthreads();  // chunk c has landed; chunk c - 1's stage is free
    if (c + kStages - 1 < chunks) load_chunk(c + kStages - 1);
    cute::cp_async_fence();
    const Elem* ks = tiles + (c % kStages) * DecodeSmem<kD, Elem>::kStageElems;
    const Elem* vs = ks + kChunk * kD;
    const int c0 = r_begin + c * kChunk, n = min(kChunk, r_end - c0);
    // Scores: logits in the log2 domain (gated logits for key_value).
#pragma unroll
    for (int i = row_par; i < kChunk; i += kRowsPar) {
      float dot[kMaxHeads];
#pragma unroll
      for (int h = 0; h < kMaxHeads; ++h) dot[h] = 0.f;
      const uint4 raw = *reinterpret_cast<const uint4*>(ks + i * kD + lane_in_row * 8);
      float kf[8];
      Vec8<Elem>::to_float(raw, kf);
#pragma unroll
      for (int h = 0; h < kMaxHeads; ++h)
#pragma unroll
        for (int e = 0; e < 8; ++e) dot[h] = fmaf(qf[h][e], kf[e], dot[h]);
#pragma unroll
      for (int h = 0; h < kMaxHeads; ++h)
#pragma unroll
        for (int off = kLanes / 2; off > 0; off /= 2)
          dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], off);
      if (lane_in_row == 0) {
        float m = 1.f;
        const int r = c0 + i;
        if (i < n && r >= gr.na && p.gate != 2)
          m = static_cast<float>(
              bsk::detail::clip_gate(static_cast<double>(s_u[c % kStages][i]) - gr.tau));
#pragma unroll
        for (int h = 0; h < kMaxHeads; ++h)
          s_logit[h][i] = i < n ? (p.gate == 0 ? m * dot[h] : dot[h]) : -INFINITY;
        s_gate[i] = i < n ? m : 0.f;
      }
    }
    __syncthreads();
    // Online softmax per head: one warp per head.
    for (int h = tid / 32; h < nh; h += kThreads / 32) {
      const int l = tid % 32;
      float mx = -INFINITY;
      for (int i = l; i < kChunk; i += 32) mx = fmaxf(mx, s_logit[h][i]);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = s_max[h], m_new = fmaxf(m_old, mx);
      const float ref = m_new == -INFINITY ? 0.f : m_new;
      float den = 0.f;
      for (int i = l; i < kChunk; i += 32) {
        const float e = exp2f(s_logit[h][i] - ref);
        den += e;
        s_logit[h][i] = e * s_gate[i];  // the value weight
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) den += __shfl_xor_sync(0xffffffffu, den, off);
      __syncwarp();
      if (l == 0) {
        const float alpha = exp2f(m_old - ref);
        s_alpha[h] = alpha;
        s_den[h] = s_den[h] * alpha + den;
        s_max[h] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      const float a = h < nh ? s_alpha[h] : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] *= a;
    }
#pragma unroll
    for (int i = row_par; i < kChunk; i += kRowsPar) {
      const uint4 raw = *reinterpret_cast<const uint4*>(vs + i * kD + lane_in_row * 8);
      float vf[8];
      Vec8<Elem>::to_float(raw, vf);  // zero-filled rows past n carry weight 0
#pragma unroll
      for (int h = 0; h < kMaxHeads; ++h) {
        const float w = h < nh ? s_logit[h][i] : 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(w, vf[e], acc[h][e]);
      }
    }
  }
  cute::cp_async_wait<0>();
  __syncthreads();  // the tiles are free for the reduction

  // Sum the row-parallel partial accumulators in a fixed order (deterministic).
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h)
#pragma unroll
    for (int e = 0; e < 8; ++e) s_red[(row_par * kMaxHeads + h) * kD + lane_in_row * 8 + e] = acc[h][e];
  __syncthreads();
  const float nan = __int_as_float(0x7fc00000);
  for (int idx = tid; idx < nh * kD; idx += kThreads) {
    const int h = idx / kD, d = idx % kD;
    float o = 0.f;
    for (int r = 0; r < kRowsPar; ++r) o += s_red[(r * kMaxHeads + h) * kD + d];
    const int hq = h0 + h;
    const float den = s_den[h], mx = s_max[h];
    if (p.splits == 1) {
      const float val = broken ? nan : (den > 0.f ? o / den : 0.f);
      p.out[b * p.o_sb + hq * p.o_sh + d] = Vec8<Elem>::from_float(val);
      if (d == 0 && p.lse != nullptr)
        p.lse[b * p.l_sb + hq * p.l_sh] =
            broken ? nan : (den > 0.f ? (mx + log2f(den)) * 0.69314718055994531f : -INFINITY);
    } else {
      const int64_t row = (static_cast<int64_t>(split) * p.batch + b) * p.heads_q + hq;
      p.part_o[row * kD + d] = o;
      if (d == 0) p.part_ml[2 * row] = mx, p.part_ml[2 * row + 1] = den;
    }
  }
  if (p.splits == 1) return;
  __threadfence();  // this CTA's partials are visible before it is counted
  __syncthreads();
  if (tid == 0) {
    int* counter = p.counters + b * gridDim.y + blockIdx.y;
    s_last = atomicAdd(counter, 1) == p.splits - 1;
    if (s_last) *counter = 0;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  combine_partials<Elem, kD>(p, b, h0, nh, broken);
}

}  // namespace bsk::kernels::decode
