// Dense attention forward on sm_80+ tensor cores, FlashAttention-2 style.
//
// One CTA computes a kBlockM x D block of output for one (batch, query head). Each warp owns
// kBlockM / (16 * kWarps) row tiles of 16 rows (tiles kWarps*16 apart), so every K/V fragment read
// from shared memory feeds that many MMAs. Per KV block:
//   S = Q K^T (mma.sync m16n8k16, f32 accumulate) -> mask -> online softmax in registers
//   -> O += P V with P re-packed from the S accumulators (the C layout of two n-tiles is the A
//   layout of one k-step, so P never touches shared memory).
// Loads are cp.async. kStages = 1: one K and one V buffer, V(j) streams in during Q K(j)^T and
// K(j+1) during softmax and P V(j). kStages = 2: double buffers, K/V(j+1) stream in during all of
// block j, one barrier per block. The output goes out through shared memory in 16-byte rows.
// The loop order is fixed, so results are bitwise reproducible.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/sm80_primitives.cuh"

namespace bsk::kernels {

template <typename Elem>
struct DenseFwdParams {
  const Elem* q;
  const Elem* k;
  const Elem* v;
  Elem* out;
  float* lse;  // [B, Hq, Sq] or null
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t o_sb, o_ss, o_sh;
  int64_t lse_sb, lse_sh, lse_ss;
  int seqlen_q, seqlen_k;
  int group;               // Hq / Hkv
  float softmax_scale;     // > 0
  float scale_log2;        // softmax_scale * log2(e): exp(x*scale) == exp2(x*scale_log2)
  bool causal;
};

template <typename Elem_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_, bool kQInRegs_,
          int kStages_ = 1>
struct DenseFwdConfig {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  // Keeping Q's fragments in registers saves re-reading it from shared memory every KV block;
  // worth it only while the O accumulators leave room (head dim 64).
  static constexpr bool kQInRegs = kQInRegs_;
  static constexpr int kStages = kStages_;
  static constexpr int kRowTiles = kBlockM / (16 * kWarps);  // 16-row tiles per warp
  static constexpr int kSmemBytes = (kBlockM + 2 * kStages * kBlockN) * kHeadDim * sizeof(Elem);
  static_assert(kBlockM % (16 * kWarps) == 0 && kBlockN % 16 == 0 && kHeadDim % 64 == 0);
  static_assert(kStages == 1 || kStages == 2);
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    dense_fwd_sm80_kernel(const __grid_constant__ DenseFwdParams<typename Cfg::Elem> p) {
  using Elem = typename Cfg::Elem;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN, MT = Cfg::kRowTiles;
  constexpr int kThreads = Cfg::kThreads;
  constexpr float kNegInf = -INFINITY;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* sQ = reinterpret_cast<Elem*>(smem_raw);
  Elem* const sK0 = sQ + BM * D;
  Elem* const sV0 = sK0 + Cfg::kStages * BN * D;

  // Heaviest causal blocks (last rows) first, so the tail of the grid is short.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group;
  const int m0 = m_block * BM;
  const int diag = p.seqlen_k - p.seqlen_q;  // query row t sees keys j <= t + diag
  const int n_end = p.causal ? min(p.seqlen_k, m0 + BM + diag) : p.seqlen_k;
  const int n_blocks = n_end > 0 ? (n_end + BN - 1) / BN : 0;

  const Elem* qg = p.q + b * p.q_sb + h * p.q_sh;
  const Elem* kg = p.k + b * p.k_sb + hk * p.k_sh;
  const Elem* vg = p.v + b * p.v_sb + hk * p.v_sh;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  float o[MT][D / 8][4];
  float row_m[MT][2], row_l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.f;
    row_m[mt][0] = row_m[mt][1] = kNegInf;
    row_l[mt][0] = row_l[mt][1] = 0.f;
  }

  // ldmatrix row addresses for this lane (see the fragment layouts in sm80_primitives.cuh).
  const int a_row = warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8, a_col = (lane / 16) * 8;
  const int k_row = (lane % 8) + (lane / 16) * 8, k_col = ((lane / 8) % 2) * 8;
  const int v_row = (lane % 8) + ((lane / 8) % 2) * 8, v_col = (lane / 16) * 8;

  if (n_blocks > 0) {
    using namespace kernels::sm80;
    load_tile_async<BM, D, kThreads>(sQ, qg, p.q_ss, m0, p.seqlen_q);
    load_tile_async<BN, D, kThreads>(sK0, kg, p.k_ss, 0, p.seqlen_k);
    if constexpr (Cfg::kStages == 2) load_tile_async<BN, D, kThreads>(sV0, vg, p.v_ss, 0, p.seqlen_k);
    cp_async_commit();

    uint32_t qf[Cfg::kQInRegs ? MT : 1][Cfg::kQInRegs ? D / 16 : 1][4];
    if constexpr (Cfg::kQInRegs) {
      cp_async_wait<0>();
      __syncthreads();
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks)
          ldsm_x4(sQ + swizzle<D>(mt * 16 * Cfg::kWarps + a_row, ks * 16 + a_col), qf[mt][ks]);
    }

    for (int nb = 0; nb < n_blocks; ++nb) {
      const int n0 = nb * BN;
      Elem* const sK = sK0 + (Cfg::kStages == 2 ? (nb & 1) * BN * D : 0);
      Elem* const sV = sV0 + (Cfg::kStages == 2 ? (nb & 1) * BN * D : 0);
      cp_async_wait<0>();
      if constexpr (Cfg::kStages == 2) {
        __syncthreads();  // K/V(nb) landed; every warp is done with block nb-1's buffers
        if (nb + 1 < n_blocks) {
          const int other = ((nb + 1) & 1) * BN * D;
          load_tile_async<BN, D, kThreads>(sK0 + other, kg, p.k_ss, n0 + BN, p.seqlen_k);
          load_tile_async<BN, D, kThreads>(sV0 + other, vg, p.v_ss, n0 + BN, p.seqlen_k);
          cp_async_commit();
        }
      } else {
        __syncthreads();  // K(nb) landed; every warp is done with V(nb-1)
        load_tile_async<BN, D, kThreads>(sV, vg, p.v_ss, n0, p.seqlen_k);
        cp_async_commit();
      }

      float s[MT][BN / 8][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;

#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if constexpr (Cfg::kQInRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][ks][e];
          } else {
            ldsm_x4(sQ + swizzle<D>(mt * 16 * Cfg::kWarps + a_row, ks * 16 + a_col), a[mt]);
          }
        }
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          uint32_t bk[4];
          ldsm_x4(sK + swizzle<D>(np * 16 + k_row, ks * 16 + k_col), bk);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16x8x16<Elem>(s[mt][2 * np], a[mt], bk[0], bk[1]);
            mma_16x8x16<Elem>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
          }
        }
      }

      // Only blocks crossing the end of the keys or the causal diagonal need a mask.
      const bool need_mask = n0 + BN > p.seqlen_k || (p.causal && n0 + BN - 1 > m0 + diag);
      if (need_mask) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = n0 + nt * 8 + 2 * t + (e & 1);
              const int row = m0 + mt * 16 * Cfg::kWarps + warp * 16 + g + 8 * (e >> 1);
              if (col >= p.seqlen_k || (p.causal && col > row + diag)) s[mt][nt][e] = kNegInf;
            }
      }

      if constexpr (Cfg::kStages == 1) {
        cp_async_wait<0>();
        __syncthreads();  // V(nb) landed; every warp is done with K(nb)
        if (nb + 1 < n_blocks) {
          load_tile_async<BN, D, kThreads>(sK, kg, p.k_ss, n0 + BN, p.seqlen_k);
          cp_async_commit();
        }
      }

      // Online softmax. Max and sums run on unscaled logits; the scale folds into one FFMA.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mx = row_m[mt][r];
#pragma unroll
          for (int nt = 0; nt < BN / 8; ++nt)
            mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          // A row that has seen no key yet keeps max -inf: use 0 as offset so exp2 gives 0s.
          const float base = mx == kNegInf ? 0.f : mx * p.scale_log2;
          const float corr = sm80::fast_exp2(row_m[mt][r] * p.scale_log2 - base);
          row_m[mt][r] = mx;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float pe = sm80::fast_exp2(fmaf(s[mt][nt][2 * r + e], p.scale_log2, -base));
              s[mt][nt][2 * r + e] = pe;
              sum += pe;
            }
          row_l[mt][r] = row_l[mt][r] * corr + sum;
#pragma unroll
          for (int dt = 0; dt < D / 8; ++dt) {
            o[mt][dt][2 * r] *= corr;
            o[mt][dt][2 * r + 1] *= corr;
          }
        }

#pragma unroll
      for (int ks = 0; ks < BN / 16; ++ks) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          a[mt][0] = pack2<Elem>(s[mt][2 * ks][0], s[mt][2 * ks][1]);
          a[mt][1] = pack2<Elem>(s[mt][2 * ks][2], s[mt][2 * ks][3]);
          a[mt][2] = pack2<Elem>(s[mt][2 * ks + 1][0], s[mt][2 * ks + 1][1]);
          a[mt][3] = pack2<Elem>(s[mt][2 * ks + 1][2], s[mt][2 * ks + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bv[4];
          ldsm_x4_trans(sV + swizzle<D>(ks * 16 + v_row, dp * 16 + v_col), bv);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16x8x16<Elem>(o[mt][2 * dp], a[mt], bv[0], bv[1]);
            mma_16x8x16<Elem>(o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
          }
        }
      }
    }
  }

  // Epilogue: finish the row sums across the quad, normalize, stage each warp's rows in its own
  // rows of sQ (no other warp reads them, so a warp barrier suffices), then store 16-byte chunks
  // so that consecutive lanes write consecutive bytes of a row.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    Elem* const stage = sQ + (mt * Cfg::kWarps + warp) * 16 * D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = row_l[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(stage + sm80::swizzle<D>(g + 8 * r, dt * 8 + 2 * t)) =
            sm80::pack2<Elem>(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
      const int row = m0 + mt * 16 * Cfg::kWarps + warp * 16 + g + 8 * r;
      if (p.lse != nullptr && t == 0 && row < p.seqlen_q)
        p.lse[b * p.lse_sb + h * p.lse_sh + row * p.lse_ss] =
            l > 0.f ? row_m[mt][r] * p.softmax_scale + logf(l) : kNegInf;
    }
    __syncwarp();
    constexpr int kChunksPerRow = D / 8;
#pragma unroll
    for (int i = 0; i < 16 * kChunksPerRow / 32; ++i) {
      const int c = lane + 32 * i;
      const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const int row = m0 + mt * 16 * Cfg::kWarps + warp * 16 + r;
      if (row < p.seqlen_q)
        *reinterpret_cast<uint4*>(p.out + b * p.o_sb + row * p.o_ss + h * p.o_sh + col) =
            *reinterpret_cast<const uint4*>(stage + sm80::swizzle<D>(r, col));
    }
  }
}

}  // namespace bsk::kernels
