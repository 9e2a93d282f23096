// SparseK attention forward on sm_80+ tensor cores (docs/SPARSEK_SPEC.md). One CTA holds
// kBlockM = 128 rows: `heads` query heads of one KV group (1, 2 or 4) times 128 / heads
// consecutive query positions, so every gathered K/V row feeds every query head that selects it.
// The dense kernel's per-block steps (sm80_attention_tile.cuh) run over two kinds of key blocks in
// one online softmax:
//   1. selected keys: the block's list from the selection stage (sparsek_select.cuh), gathered
//      row by row into shared memory; each row keeps the keys it selects (j < m_row and beating
//      its threshold) with gate clip((u - thr) - tau_rel, 0, 1);
//   2. the window: the dense causal band [i_first - w + 1, i_last], masked to i - w < j <= i.
// A row's window and its candidates are disjoint (j > i - w against j <= i - w), so no key
// counts twice. Gate "key_value" scales the logit and the value weight by the gate, "value"
// only the value weight; the softmax denominator always takes the ungated weight (spec table).
// Per element the selection costs one 64-bit compare (key (order code of u, j) against the row's
// threshold key), one index compare and one saturating add for the gate: gate =
// sat((u - u_ref) - b_row) with u_ref one threshold score of the block and b_row = (thr_row -
// u_ref) + tau_row, exact where the gate is fractional (there u is close to thr_row).
// Double-buffered K/V; a fixed loop order, so results are bitwise reproducible.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/dense_fwd_sm80.cuh"
#include "kernels/sm80_attention_tile.cuh"
#include "kernels/sparsek_layout.cuh"

namespace bsk::kernels {

template <typename Elem>
struct SparseKFwdParams {
  DenseFwdParams<Elem> attn;  // q, k, v, out, lse, strides, lengths, group, scale (causal)
  const float* u;  // [B, Hkv, Skv]
  int64_t u_sb, u_sh, u_sj;
  const float* thr_u;  // [B*Hkv, Skv + 1] by candidate count m (m > budget only)
  const int* thr_j;
  const float* tau_rel;
  const int* list;   // [B*Hkv, list_tiles, list_cap]: per kListRows query positions
  const int* count;  // [B*Hkv, list_tiles]
  int list_cap, list_tiles;
  int heads;         // query heads per CTA (1, 2 or 4; divides Hq / Hkv)
  int heads_kv, batch;
  int budget, window;
  bool gate_logits;  // "key_value"
  // sm90 only (SparseKCta::fold): a tile's newer candidates are selected per element inside its
  // window band instead of in a list block of their own.
  bool fold_newer;
};

// Per query position of the block: candidates m, the threshold key (order code << 32 | j; 0 lets
// every candidate in) and the gate offset b (-inf: every gate 1).
struct SparseKRow {
  unsigned long long thr_key;
  int m;
  float b;
};

__device__ __forceinline__ unsigned long long sparsek_key(float u, int j) {
  return (static_cast<unsigned long long>(sparsek::order_code(u)) << 32) | static_cast<uint32_t>(j);
}

// The rows and key blocks of one tile, the same in the sm80 kernel (a CTA per tile, the tile at
// blockIdx) and the persistent sm90 one (tiles round-robin): `rows` = 128 rows are p.heads query
// heads of one KV group (y) times `positions` consecutive query positions (x), batch z. Its key
// blocks of kBlockN keys are numbered selected keys first (the list of the kListRows positions
// the tile lies in, or the contiguous range [0, n_sel) where its first row has at most k
// candidates), then the window band; the sm90 kernel visits the band first (its cta_block).
template <int kBlockN, typename Elem>
struct SparseKCta {
  int positions, h0, b, hk, seg, m0, diag, t_last, i_first, i_last;
  float u_ref;  // a threshold score of the CTA (the last row's), so gate offsets stay small
  const int* list;
  int n_sel, sel_blocks, win_first, win_blocks, n_blocks;
  bool all_in;
  // Fold (p.fold_newer, sm90): the list's newer candidates, keys [m_grp, m_cut) (m_grp: the list
  // group's first row's candidate count; m_cut: this tile's last row's), lie in the window
  // band's first block, which the band loads anyway; that block then selects them per element
  // and the list stops at its first k entries (the group's first row's selection), one key
  // block fewer per tile (26 -> 25 at the sparsek-prefill suite's shape). Only where the band's
  // first block holds all of them and the band has a second block to go first (see cta_block
  // in the sm90 kernel).
  int m_grp, m_cut, budget;
  bool fold;

  __device__ SparseKCta(const SparseKFwdParams<Elem>& p, int rows)
      : SparseKCta(p, rows, blockIdx.x, blockIdx.y, blockIdx.z) {
    load_selection(p);
  }
  // The geometry of tile (x, y, z) = (position block, head block, batch), with no memory reads:
  // load_selection (or set_count with a count read elsewhere) completes it.
  __device__ SparseKCta(const SparseKFwdParams<Elem>& p, int rows, int x, int y, int z) {
    const auto& at = p.attn;
    positions = rows / p.heads;
    h0 = y * p.heads;
    b = z;
    hk = h0 / at.group;
    seg = b * p.heads_kv + hk;
    m0 = x * positions;
    diag = at.seqlen_k - at.seqlen_q;  // row t sits at absolute position t + diag
    t_last = min(m0 + positions, at.seqlen_q) - 1;
    i_first = m0 + diag;
    i_last = t_last + diag;
    list = p.list + list_index(p) * p.list_cap;
    all_in = m0 / sparsek::kListRows * sparsek::kListRows + diag - p.window + 1 <= p.budget;
    win_first = 0, win_blocks = 0;
    if (p.window > 0 && i_last >= 0) {
      win_first = max(0, i_first - p.window + 1) / kBlockN;
      win_blocks = i_last / kBlockN - win_first + 1;
    }
    budget = p.budget;
    m_grp = cand(p, m0 / sparsek::kListRows * sparsek::kListRows);
    m_cut = cand(p, t_last);
    fold = p.fold_newer && p.budget > 0 && !all_in && win_blocks >= 2 && m_grp / kBlockN == win_first &&
           max(m_cut - 1, m_grp) / kBlockN == win_first;
    u_ref = 0.f;
    set_count(0);
  }
  // The two reads: the list's length and a threshold score of the tile (the last row's).
  __device__ void load_selection(const SparseKFwdParams<Elem>& p) {
    const int m_last = cand(p, t_last);
    u_ref = m_last > p.budget ? p.thr_u[thr_at(p, m_last)] : 0.f;
    set_count(p.budget > 0 ? p.count[list_index(p)] : 0);
  }
  // The tile's key list (and count): one per kListRows positions of its KV head.
  __device__ int64_t list_index(const SparseKFwdParams<Elem>& p) const {
    return static_cast<int64_t>(seg) * p.list_tiles + m0 / sparsek::kListRows;
  }
  __device__ void set_count(int n) {
    n_sel = fold ? min(n, budget) : n;
    sel_blocks = (n_sel + kBlockN - 1) / kBlockN;
    n_blocks = sel_blocks + win_blocks;
  }
  // Candidates of position t; 0 past Sq (never stored) and for k = 0.
  __device__ int cand(const SparseKFwdParams<Elem>& p, int t) const {
    const int i = t + diag;
    return (p.budget == 0 || t >= p.attn.seqlen_q || i < 0) ? 0 : max(0, i - p.window + 1);
  }
  __device__ int64_t thr_at(const SparseKFwdParams<Elem>& p, int m) const {
    return static_cast<int64_t>(seg) * (p.attn.seqlen_k + 1) + m;
  }
  // Selection state of position t: candidates, threshold key, gate offset.
  __device__ SparseKRow row(const SparseKFwdParams<Elem>& p, int t) const {
    SparseKRow r{0ull, cand(p, t), -INFINITY};
    if (r.m > p.budget) {
      const float thr = p.thr_u[thr_at(p, r.m)];
      r.thr_key = sparsek_key(thr, p.thr_j[thr_at(p, r.m)]);
      r.b = (thr - u_ref) + p.tau_rel[thr_at(p, r.m)];
    }
    return r;
  }
  // Global row of slot `slot` of key block nb (-1: past the end, zero-filled, never selected).
  __device__ int key_row(const SparseKFwdParams<Elem>& p, int nb, int slot) const {
    if (nb < sel_blocks) {
      const int s = nb * kBlockN + slot;
      return s >= n_sel ? -1 : (all_in ? s : __ldg(list + s));
    }
    const int j = window_start(nb) + slot;
    return j < p.attn.seqlen_k ? j : -1;
  }
  __device__ int window_start(int nb) const { return (win_first + nb - sel_blocks) * kBlockN; }
};

template <class Cfg>
struct SparseKSmem {
  using Elem = typename Cfg::Elem;
  static constexpr int kTileBytes = Cfg::kBlockN * Cfg::kHeadDim * sizeof(Elem);
  static constexpr int kBytes = Cfg::kBlockM * Cfg::kHeadDim * sizeof(Elem) + 4 * kTileBytes +
                                2 * Cfg::kBlockN * (sizeof(unsigned long long) + sizeof(float)) +
                                Cfg::kBlockM * sizeof(SparseKRow);
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    sparsek_fwd_sm80_kernel(const __grid_constant__ SparseKFwdParams<typename Cfg::Elem> p) {
  using Elem = typename Cfg::Elem;
  using Tile = sm80::AttnTile<Cfg>;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN, MT = Cfg::kRowTiles;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int kChunkRows = 32;  // Q is loaded in chunks of 32 rows, each of one head
  static_assert(BM == 128 && BM % kChunkRows == 0);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* const sQ = reinterpret_cast<Elem*>(smem_raw);
  Elem* const sK0 = sQ + BM * D;
  Elem* const sV0 = sK0 + 2 * BN * D;
  auto* const sKey = reinterpret_cast<unsigned long long*>(sV0 + 2 * BN * D);  // [2][BN]
  float* const sD = reinterpret_cast<float*>(sKey + 2 * BN);  // [2][BN] u - u_ref
  SparseKRow* const sRow = reinterpret_cast<SparseKRow*>(sD + 2 * BN);  // [positions]

  const SparseKCta<BN, Elem> cta(p, BM);
  const int positions = cta.positions, h0 = cta.h0, b = cta.b, m0 = cta.m0, diag = cta.diag;
  const int sel_blocks = cta.sel_blocks, n_sel = cta.n_sel, n_blocks = cta.n_blocks;
  const float u_ref = cta.u_ref;
  for (int r = threadIdx.x; r < positions; r += kThreads) sRow[r] = cta.row(p, m0 + r);

  const Elem* kg = p.attn.k + b * p.attn.k_sb + cta.hk * p.attn.k_sh;
  const Elem* vg = p.attn.v + b * p.attn.v_sb + cta.hk * p.attn.v_sh;
  const float* ug = p.u + b * p.u_sb + cta.hk * p.u_sh;

  // Issues the loads of key block nb into stage nb & 1.
  auto load_block = [&](int nb) {
    const int st = nb & 1;
    Elem* const sK = sK0 + st * BN * D;
    Elem* const sV = sV0 + st * BN * D;
    if (nb < sel_blocks) {
      if (cta.all_in) {
        sm80::load_tile_async<BN, D, kThreads>(sK, kg, p.attn.k_ss, nb * BN, n_sel);
        sm80::load_tile_async<BN, D, kThreads>(sV, vg, p.attn.v_ss, nb * BN, n_sel);
      } else {
        sm80::gather_tile_async<BN, D, kThreads>(sK, kg, p.attn.k_ss, cta.list, nb * BN, n_sel);
        sm80::gather_tile_async<BN, D, kThreads>(sV, vg, p.attn.v_ss, cta.list, nb * BN, n_sel);
      }
      for (int c = threadIdx.x; c < BN; c += kThreads) {
        const int j = cta.key_row(p, nb, c);
        const float x = j >= 0 ? ug[j * p.u_sj] : 0.f;
        // An empty slot's index 0xffffffff is past every m: never selected.
        sKey[st * BN + c] = j >= 0 ? sparsek_key(x, j) : 0xffffffffull;
        sD[st * BN + c] = x - u_ref;
      }
    } else {
      const int n0 = cta.window_start(nb);
      sm80::load_tile_async<BN, D, kThreads>(sK, kg, p.attn.k_ss, n0, p.attn.seqlen_k);
      sm80::load_tile_async<BN, D, kThreads>(sV, vg, p.attn.v_ss, n0, p.attn.seqlen_k);
    }
    sm80::cp_async_commit();
  };

  typename Tile::OAcc o;
  typename Tile::RowStat row_m, row_l;
  Tile::init(o, row_m, row_l);
  // Position (within the block) of this thread's accumulator rows.
  auto pos_of = [&](int mt, int e) { return Tile::row_of(mt, e) % positions; };

  if (n_blocks > 0) {
    for (int c = 0; c < BM / kChunkRows; ++c) {
      const int r0 = c * kChunkRows;
      const int h = h0 + r0 / positions;
      sm80::load_tile_async<kChunkRows, D, kThreads>(sQ + r0 * D, p.attn.q + b * p.attn.q_sb + h * p.attn.q_sh,
                                                     p.attn.q_ss, m0 + r0 % positions, p.attn.seqlen_q);
    }
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
      if (selected) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const SparseKRow row = sRow[pos_of(mt, 2 * r)];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int c = st * BN + Tile::col_of(nt, e);
                const unsigned long long key = sKey[c];
                const uint32_t j = static_cast<uint32_t>(key);  // empty slot: 0xffffffff
                float& x = s[mt][nt][2 * r + e];
                if (key < row.thr_key || j >= static_cast<uint32_t>(row.m)) x = -INFINITY;
                else if (p.gate_logits) x *= __saturatef(sD[c] - row.b);
              }
          }
      } else {
        const int n0 = cta.window_start(nb);
        // Blocks inside every row's window need no mask.
        if (n0 <= cta.i_last - p.window || n0 + BN - 1 > cta.i_first) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int i = m0 + pos_of(mt, e) + diag, j = n0 + Tile::col_of(nt, e);
                if (j > i || j <= i - p.window) s[mt][nt][e] = -INFINITY;
              }
        }
      }

      Tile::softmax(s, row_m, row_l, o, p.attn.scale_log2);
      if (selected) {  // value weights: the gate (already 0 where the row does not select)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float rb = sRow[pos_of(mt, 2 * r)].b;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                s[mt][nt][2 * r + e] *= __saturatef(sD[st * BN + Tile::col_of(nt, e)] - rb);
          }
      }
      Tile::pv(o, s, sV0 + st * BN * D);
    }
  }

  Tile::store(o, row_m, row_l, sQ, [&](int r) {
    const int t = m0 + r % positions, h = h0 + r / positions;
    const bool in = t < p.attn.seqlen_q;
    return typename Tile::RowDest{
        in ? p.attn.out + b * p.attn.o_sb + h * p.attn.o_sh + t * p.attn.o_ss : nullptr,
        p.attn.lse ? p.attn.lse + b * p.attn.lse_sb + h * p.attn.lse_sh + t * p.attn.lse_ss : nullptr};
  }, p.attn.softmax_scale);
}

}  // namespace bsk::kernels
