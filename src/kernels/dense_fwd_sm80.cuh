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

#include "kernels/sm80_attention_tile.cuh"

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
  using Tile = sm80::AttnTile<Cfg>;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN, MT = Cfg::kRowTiles;
  constexpr int kThreads = Cfg::kThreads;

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

  typename Tile::OAcc o;
  typename Tile::RowStat row_m, row_l;
  Tile::init(o, row_m, row_l);

  if (n_blocks > 0) {
    using namespace kernels::sm80;
    load_tile_async<BM, D, kThreads>(sQ, qg, p.q_ss, m0, p.seqlen_q);
    load_tile_async<BN, D, kThreads>(sK0, kg, p.k_ss, 0, p.seqlen_k);
    if constexpr (Cfg::kStages == 2) load_tile_async<BN, D, kThreads>(sV0, vg, p.v_ss, 0, p.seqlen_k);
    cp_async_commit();

    typename Tile::QFrag qf;
    if constexpr (Cfg::kQInRegs) {
      cp_async_wait<0>();
      __syncthreads();
      Tile::load_q(qf, sQ);
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

      typename Tile::SAcc s;
      Tile::qk(s, qf, sQ, sK);

      // Only blocks crossing the end of the keys or the causal diagonal need a mask.
      const bool need_mask = n0 + BN > p.seqlen_k || (p.causal && n0 + BN - 1 > m0 + diag);
      if (need_mask) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = n0 + Tile::col_of(nt, e);
              const int row = m0 + Tile::row_of(mt, e);
              if (col >= p.seqlen_k || (p.causal && col > row + diag)) s[mt][nt][e] = -INFINITY;
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

      Tile::softmax(s, row_m, row_l, o, p.scale_log2);
      Tile::pv(o, s, sV);
    }
  }

  Elem* const out = p.out + b * p.o_sb + h * p.o_sh;
  float* const lse = p.lse ? p.lse + b * p.lse_sb + h * p.lse_sh : nullptr;
  Tile::store(o, row_m, row_l, sQ, [&](int r) {
    const int row = m0 + r;
    return typename Tile::RowDest{row < p.seqlen_q ? out + row * p.o_ss : nullptr,
                                  lse ? lse + row * p.lse_ss : nullptr};
  }, p.softmax_scale);
}

}  // namespace bsk::kernels
