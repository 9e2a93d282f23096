// The per-block steps of an sm_80 flash-attention forward, shared by the dense and the SparseK
// kernels so both stay one algorithm: S = Q K^T on one kBlockN-key block, the online-softmax
// update, O += P V, and the epilogue. Fragment layouts are those of mma.sync m16n8k16
// (sm80_primitives.cuh): each warp owns Cfg::kRowTiles tiles of 16 query rows, kWarps*16 apart;
// with g = lane / 4 and t = lane % 4, accumulator element e of n-tile nt sits at row
// g + 8 * (e >> 1) of the warp's tile and column nt * 8 + 2 * t + (e & 1).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/sm80_primitives.cuh"

namespace bsk::kernels::sm80 {

template <class Cfg>
struct AttnTile {
  using Elem = typename Cfg::Elem;
  static constexpr int D = Cfg::kHeadDim, BN = Cfg::kBlockN, MT = Cfg::kRowTiles;
  static constexpr int kQRegTiles = Cfg::kQInRegs ? MT : 1, kQRegSteps = Cfg::kQInRegs ? D / 16 : 1;
  using QFrag = uint32_t[kQRegTiles][kQRegSteps][4];
  using SAcc = float[MT][BN / 8][4];
  using OAcc = float[MT][D / 8][4];
  using RowStat = float[MT][2];

  // Row (within the CTA's block) of accumulator element e of row tile mt.
  static __device__ __forceinline__ int row_of(int mt, int e) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    return mt * 16 * Cfg::kWarps + warp * 16 + lane / 4 + 8 * (e >> 1);
  }
  // Column (within the key block) of accumulator element e of n-tile nt.
  static __device__ __forceinline__ int col_of(int nt, int e) {
    return nt * 8 + 2 * (threadIdx.x % 4) + (e & 1);
  }

  static __device__ __forceinline__ void init(OAcc& o, RowStat& row_m, RowStat& row_l) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][dt][e] = 0.f;
      row_m[mt][0] = row_m[mt][1] = -INFINITY;
      row_l[mt][0] = row_l[mt][1] = 0.f;
    }
  }

  static __device__ __forceinline__ int a_row() {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    return warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
  }

  // Q fragments into registers (only when Cfg::kQInRegs); sQ must have landed.
  static __device__ __forceinline__ void load_q(QFrag& qf, const Elem* sQ) {
    if constexpr (Cfg::kQInRegs) {
      const int a_col = (threadIdx.x % 32 / 16) * 8;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks)
          ldsm_x4(sQ + swizzle<D>(mt * 16 * Cfg::kWarps + a_row(), ks * 16 + a_col), qf[mt][ks]);
    }
  }

  // s = Q K^T for the block in sK (raw dot products, unscaled).
  static __device__ __forceinline__ void qk(SAcc& s, const QFrag& qf, const Elem* sQ,
                                            const Elem* sK) {
    const int lane = threadIdx.x % 32;
    const int a_col = (lane / 16) * 8;
    const int k_row = (lane % 8) + (lane / 16) * 8, k_col = ((lane / 8) % 2) * 8;
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
          ldsm_x4(sQ + swizzle<D>(mt * 16 * Cfg::kWarps + a_row(), ks * 16 + a_col), a[mt]);
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
  }

  // Online softmax over one block of logits (masked entries -inf). Max and sums run on unscaled
  // logits; the scale folds into one FFMA. Leaves the unnormalized probabilities in s and
  // rescales o and row_l by the change of the row maximum.
  static __device__ __forceinline__ void softmax(SAcc& s, RowStat& row_m, RowStat& row_l,
                                                 OAcc& o, float scale_log2) {
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
        const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
        const float corr = fast_exp2(row_m[mt][r] * scale_log2 - base);
        row_m[mt][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = fast_exp2(fmaf(s[mt][nt][2 * r + e], scale_log2, -base));
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
  }

  // o += P V with P re-packed from the S accumulators (the C layout of two n-tiles is the A
  // layout of one k-step, so P never touches shared memory).
  static __device__ __forceinline__ void pv(OAcc& o, const SAcc& s, const Elem* sV) {
    const int lane = threadIdx.x % 32;
    const int v_row = (lane % 8) + ((lane / 8) % 2) * 8, v_col = (lane / 16) * 8;
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

  // Normalizes and writes the block's rows: dest(row) gives row `row`'s output row and lse slot
  // (RowDest{nullptr, ...} for rows past the end). The row sums finish across the quad, each warp
  // stages its rows in its own rows of `stage` (a kBlockM x D swizzled tile no other warp reads,
  // so a warp barrier suffices), then 16-byte chunks go out so that consecutive lanes write
  // consecutive bytes of a row. Rows that saw no key get 0 and lse -inf.
  struct RowDest {
    Elem* out;
    float* lse;  // may be null
  };
  template <class Dest>
  static __device__ __forceinline__ void store(const OAcc& o, const RowStat& row_m,
                                               const RowStat& row_l, Elem* stage, Dest&& dest,
                                               float softmax_scale) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    // The staging rows are this warp's Q rows, which its lanes may still be reading (ldmatrix in
    // qk when Q is not held in registers): order those reads before these writes (racecheck
    // reported the hazard in the SparseK sm80 kernel).
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      Elem* const st = stage + (mt * Cfg::kWarps + warp) * 16 * D;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float l = row_l[mt][r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
          *reinterpret_cast<uint32_t*>(st + swizzle<D>(g + 8 * r, dt * 8 + 2 * t)) =
              pack2<Elem>(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
        const RowDest d = dest(row_of(mt, 2 * r));
        if (d.out != nullptr && d.lse != nullptr && t == 0)
          *d.lse = l > 0.f ? row_m[mt][r] * softmax_scale + logf(l) : -INFINITY;
      }
      __syncwarp();
      constexpr int kChunksPerRow = D / 8;
#pragma unroll
      for (int i = 0; i < 16 * kChunksPerRow / 32; ++i) {
        const int c = lane + 32 * i;
        const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
        const RowDest d = dest(mt * 16 * Cfg::kWarps + warp * 16 + r);
        if (d.out != nullptr)
          *reinterpret_cast<uint4*>(d.out + col) =
              *reinterpret_cast<const uint4*>(st + swizzle<D>(r, col));
      }
    }
  }
};

}  // namespace bsk::kernels::sm80
