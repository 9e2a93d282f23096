// SparseK attention forward on sm_80+ tensor cores (docs/SPARSEK_SPEC.md), one CTA per
// (block of kBlockM query rows, query head, batch), the dense kernel's per-block steps
// (sm80_attention_tile.cuh) over two kinds of key blocks in one online softmax:
//   1. selected keys: the block's list from the selection stage (sparsek_select.cuh), gathered
//      row by row into shared memory; each row keeps the keys it selects (j < m_row and beating
//      its threshold) with gate clip((u - thr) - tau_rel, 0, 1);
//   2. the window: the dense causal band [i_first - w + 1, i_last], masked to i - w < j <= i.
// A row's window and its candidates are disjoint (j > i - w against j <= i - w), so no key
// counts twice. Gate "key_value" scales the logit and the value weight by the gate, "value"
// only the value weight; the softmax denominator always takes the ungated weight (spec table).
// Double-buffered K/V; a fixed loop order, so results are bitwise reproducible.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/sm80_attention_tile.cuh"

namespace bsk::kernels {

template <typename Elem>
struct SparseKFwdParams {
  const Elem* q;
  const Elem* k;
  const Elem* v;
  Elem* out;
  float* lse;
  int64_t q_sb, q_ss, q_sh;
  int64_t k_sb, k_ss, k_sh;
  int64_t v_sb, v_ss, v_sh;
  int64_t o_sb, o_ss, o_sh;
  int64_t lse_sb, lse_sh, lse_ss;
  const float* u;  // [B, Hkv, Skv]
  int64_t u_sb, u_sh, u_sj;
  const float* thr_u;  // [B*Hkv, Skv + 1] by candidate count m (m > budget only)
  const int* thr_j;
  const float* tau_rel;
  const int* list;   // [B*Hkv, q_tiles, list_cap]
  const int* count;  // [B*Hkv, q_tiles]
  int list_cap, q_tiles;
  int seqlen_q, seqlen_k, heads_kv, group;
  int budget, window;
  bool gate_logits;  // "key_value"
  float softmax_scale, scale_log2;
};

// Per query row of the block: candidates m and the selection threshold / tau for that m.
struct SparseKRow {
  int m;
  float thr_u;
  int thr_j;
  float tau_rel;
};

template <class Cfg>
struct SparseKSmem {
  using Elem = typename Cfg::Elem;
  static constexpr int kTileBytes = Cfg::kBlockN * Cfg::kHeadDim * sizeof(Elem);
  static constexpr int kBytes = Cfg::kBlockM * Cfg::kHeadDim * sizeof(Elem) + 4 * kTileBytes +
                                2 * Cfg::kBlockN * (sizeof(int) + sizeof(float)) +
                                Cfg::kBlockM * sizeof(SparseKRow);
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    sparsek_fwd_sm80_kernel(const __grid_constant__ SparseKFwdParams<typename Cfg::Elem> p) {
  using Elem = typename Cfg::Elem;
  using Tile = sm80::AttnTile<Cfg>;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN, MT = Cfg::kRowTiles;
  constexpr int kThreads = Cfg::kThreads;
  static_assert(Cfg::kQInRegs, "the gather loop keeps Q in registers");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* const sQ = reinterpret_cast<Elem*>(smem_raw);
  Elem* const sK0 = sQ + BM * D;
  Elem* const sV0 = sK0 + 2 * BN * D;
  int* const sIdx = reinterpret_cast<int*>(sV0 + 2 * BN * D);  // [2][BN] key index, -1: none
  float* const sU = reinterpret_cast<float*>(sIdx + 2 * BN);   // [2][BN] its score
  SparseKRow* const sRow = reinterpret_cast<SparseKRow*>(sU + 2 * BN);

  const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group, seg = b * p.heads_kv + hk;
  const int m0 = qt * BM;
  const int diag = p.seqlen_k - p.seqlen_q;  // row t sits at absolute position t + diag
  const int t_last = min(m0 + BM, p.seqlen_q) - 1;
  const int i_first = m0 + diag, i_last = t_last + diag;

  const Elem* qg = p.q + b * p.q_sb + h * p.q_sh;
  const Elem* kg = p.k + b * p.k_sb + hk * p.k_sh;
  const Elem* vg = p.v + b * p.v_sb + hk * p.v_sh;
  const float* ug = p.u + b * p.u_sb + hk * p.u_sh;

  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int i = m0 + r + diag;
    SparseKRow row{i < 0 ? 0 : max(0, i - p.window + 1), -INFINITY, 0, -INFINITY};
    if (p.budget == 0 || m0 + r >= p.seqlen_q) row.m = 0;  // rows past Sq are never stored
    if (row.m > p.budget) {
      const int64_t o = static_cast<int64_t>(seg) * (p.seqlen_k + 1) + row.m;
      row.thr_u = p.thr_u[o];
      row.thr_j = p.thr_j[o];
      row.tau_rel = p.tau_rel[o];
    }
    sRow[r] = row;
  }

  const int n_sel = p.budget > 0 ? p.count[static_cast<int64_t>(seg) * p.q_tiles + qt] : 0;
  const int* list = p.list + (static_cast<int64_t>(seg) * p.q_tiles + qt) * p.list_cap;
  // Where the first row has at most `budget` candidates, every candidate of the block is in:
  // the selected keys are the contiguous range [0, n_sel) and need no list.
  const bool all_in = i_first - p.window + 1 <= p.budget;
  const int sel_blocks = (n_sel + BN - 1) / BN;
  int win_first = 0, win_blocks = 0;
  if (p.window > 0 && i_last >= 0) {
    win_first = max(0, i_first - p.window + 1) / BN;
    win_blocks = i_last / BN - win_first + 1;
  }
  const int n_blocks = sel_blocks + win_blocks;

  // Issues the loads of key block nb into stage nb & 1.
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
        const int slot = nb * BN + c;
        const int j = slot >= n_sel ? -1 : (all_in ? slot : list[slot]);
        sIdx[st * BN + c] = j;
        sU[st * BN + c] = j >= 0 ? ug[j * p.u_sj] : 0.f;
      }
    } else {
      const int n0 = (win_first + nb - sel_blocks) * BN;
      sm80::load_tile_async<BN, D, kThreads>(sK, kg, p.k_ss, n0, p.seqlen_k);
      sm80::load_tile_async<BN, D, kThreads>(sV, vg, p.v_ss, n0, p.seqlen_k);
    }
    sm80::cp_async_commit();
  };

  typename Tile::OAcc o;
  typename Tile::RowStat row_m, row_l;
  Tile::init(o, row_m, row_l);

  if (n_blocks > 0) {
    sm80::load_tile_async<BM, D, kThreads>(sQ, qg, p.q_ss, m0, p.seqlen_q);
    load_block(0);
    sm80::cp_async_wait<0>();
    __syncthreads();
    typename Tile::QFrag qf;
    Tile::load_q(qf, sQ);

    for (int nb = 0; nb < n_blocks; ++nb) {
      const int st = nb & 1;
      sm80::cp_async_wait<0>();
      __syncthreads();  // block nb landed; every warp is done with block nb-1's buffers
      if (nb + 1 < n_blocks) load_block(nb + 1);

      typename Tile::SAcc s;
      Tile::qk(s, qf, sQ, sK0 + st * BN * D);

      const bool selected = nb < sel_blocks;
      const int n0 = selected ? 0 : (win_first + nb - sel_blocks) * BN;
      // Gate of element (row, column) of a selected block; 0 where the row does not select it.
      auto gate_of = [&](const SparseKRow& row, int c) {
        const int j = sIdx[st * BN + c];
        const float x = sU[st * BN + c];
        const bool in = j >= 0 && j < row.m &&
                        (x > row.thr_u || (x == row.thr_u && j >= row.thr_j));
        return in ? fminf(fmaxf((x - row.thr_u) - row.tau_rel, 0.f), 1.f) : -1.f;
      };
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = Tile::row_of(mt, e), c = Tile::col_of(nt, e);
            if (selected) {
              const float g = gate_of(sRow[r], c);
              if (g < 0.f) s[mt][nt][e] = -INFINITY;
              else if (p.gate_logits) s[mt][nt][e] *= g;
            } else {
              const int i = m0 + r + diag, j = n0 + c;
              if (j > i || j <= i - p.window) s[mt][nt][e] = -INFINITY;
            }
          }

      Tile::softmax(s, row_m, row_l, o, p.scale_log2);
      if (selected) {  // value weights: the gate (1 where the gate is off or saturated)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              s[mt][nt][e] *= fmaxf(gate_of(sRow[Tile::row_of(mt, e)], Tile::col_of(nt, e)), 0.f);
      }
      Tile::pv(o, s, sV0 + st * BN * D);
    }
  }

  Tile::store(o, row_m, row_l, sQ, p.out + b * p.o_sb + h * p.o_sh, p.o_ss,
              p.lse ? p.lse + b * p.lse_sb + h * p.lse_sh : nullptr, p.lse_ss, m0, p.seqlen_q,
              p.softmax_scale);
}

}  // namespace bsk::kernels
