// Dense attention forward for Hopper (sm_90a): TMA + mbarrier pipeline, warp specialization,
// wgmma. Written from scratch in the spirit of FlashAttention-3 / ThunderKittens, much smaller.
//
// One CTA = 3 warpgroups and computes a kBlockM (=128) x D block of output for one
// (batch, query head):
//   warpgroup 0  producer: one thread issues TMA loads (Q once, then K and V blocks) into a
//                kStages-deep ring of shared-memory buffers; each buffer completes on its own
//                "full" mbarrier (transaction count = bytes) and is recycled through an "empty"
//                mbarrier the consumers arrive on. It gives most of its registers away
//                (setmaxnreg) since it only needs addresses.
//   warpgroups 1-2 consumers: each owns 64 query rows. Per KV block:
//                S = Q K^T   (wgmma, both operands in shared memory, f32 accumulators)
//                -> mask (only on blocks that cross the causal diagonal or the end of the keys)
//                -> online softmax in registers (exp2 with the scale folded into one FFMA)
//                -> O += P V (wgmma with P from registers: the S accumulator layout, converted
//                   to 16-bit, is the A-operand register layout, so P never touches memory).
//   Two consumer warpgroups on one SM let the tensor cores work on one's GEMM while the other
//   runs its softmax (the warp schedulers interleave them; no explicit ping-pong barrier yet).
// Epilogue: O is normalized, staged into Q's shared memory (each warpgroup overwrites only its own
// 64 rows of Q, which it no longer reads) and written by one TMA store, which clips the rows past
// Sq. LSE is written from registers.
// Ragged tails need no code: TMA zero-fills rows past Sq/Skv (masked to -inf for keys) and never
// stores rows past Sq. The loop order is fixed and there are no atomics, so results are bitwise
// reproducible.
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

// wgmma and setmaxnreg exist only in the sm_90a target; other targets of the fat binary get an
// empty kernel that the dispatcher never launches (it checks the binary version first).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define BSK_SM90A_DEVICE 1
#endif

namespace bsk::kernels::sm90 {

using namespace cute;

template <typename Elem_, int kHeadDim_, int kBlockN_ = 128, int kStages_ = 2>
struct Config {
  using Elem = Elem_;  // cutlass::half_t or cutlass::bfloat16_t
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // 2 consumer warpgroups x 64 rows (one wgmma M)
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kConsumerWGs = kBlockM / 64;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);
  // Register split after setmaxnreg: 128*24 + 256*240 = 64512 <= 65536.
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;

  using BM = Int<kBlockM>;
  using BN = Int<kBlockN>;
  using HD = Int<kHeadDim>;

  // Both GEMMs tile 128 rows over the 2 consumer warpgroups (atom layout 2 x 1 x 1).
  using MmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Elem, Elem, float, Shape<BM, BN, HD>>(),
      Layout<Shape<Int<kConsumerWGs>, _1, _1>>{}));
  // P V: A = P from registers (K-major), B = V read as V^T, whose contiguous dim is N (= D).
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<BM, HD, BN>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<Int<kConsumerWGs>, _1, _1>>{}));

  // 128-byte swizzled K-major tiles (D is a multiple of 64 elements = 128 bytes): the layout TMA
  // writes and wgmma reads without bank conflicts.
  using SmemLayoutQ = decltype(tile_to_shape(
      GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<BM, HD>{}));
  using SmemLayoutK = decltype(tile_to_shape(
      GMMA::Layout_K_SW128_Atom<Elem>{}, Shape<BN, HD, Int<kStages>>{}));
  // V^T (D x BN) is the same bytes as V (BN x D) seen with the modes swapped.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutK{},
      make_ordered_layout(Shape<HD, BN, Int<kStages>>{}, Step<_2, _1, _3>{})));

  struct SharedStorage {
    cute::array_aligned<Elem, cosize_v<SmemLayoutQ>, 1024> q;  // also the output staging tile
    cute::array_aligned<Elem, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Elem, cosize_v<SmemLayoutK>, 1024> v;
    uint64_t bar_q;
    uint64_t full_k[kStages], full_v[kStages], empty[kStages];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));

  // Global tensors are (seq, head dim, heads, batch) with element strides (s, 1, h, b).
  using GShape = Shape<int32_t, int32_t, int32_t, int32_t>;
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensorIn = decltype(make_tensor(make_gmem_ptr(static_cast<Elem const*>(nullptr)),
                                         GShape{}, GStride{}));
  using GTensorOut = decltype(make_tensor(make_gmem_ptr(static_cast<Elem*>(nullptr)), GShape{},
                                          GStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensorIn{}, SmemLayoutQ{},
                                      Shape<BM, HD>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensorIn{},
                                       take<0, 2>(SmemLayoutK{}), Shape<BN, HD>{}, _1{}));
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{}, GTensorOut{}, SmemLayoutQ{},
                                      Shape<BM, HD>{}, _1{}));
};

template <class Cfg>
struct Params {
  typename Cfg::TmaQ tma_q;
  typename Cfg::TmaKV tma_k, tma_v;
  typename Cfg::TmaO tma_o;
  float* lse = nullptr;  // [B, Hq, Sq] or null
  int64_t lse_sb = 0, lse_sh = 0, lse_ss = 0;
  int batch = 0, seqlen_q = 0, seqlen_k = 0, heads_q = 0, heads_kv = 0;
  int group = 1;              // Hq / Hkv
  float softmax_scale = 1.f;  // > 0
  float scale_log2 = 1.f;     // softmax_scale * log2(e)
  bool causal = false;
};

#ifdef BSK_SM90A_DEVICE
// One warpgroup-wide GEMM: C (+)= A B over all k-blocks, issued back to back and waited for.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kARegs = !is_base_of<GMMA::DescriptorIterator, typename TA::engine_type::iterator>::value;
  if constexpr (kARegs) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kARegs) warpgroup_fence_operand(const_cast<TA&>(a));
}
#endif

// Accumulator layout ((2 cols, 2 rows, N/8), M, N) viewed as (rows, cols).
template <class L>
__host__ __device__ constexpr auto acc_rowcol(L l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The same registers as the A operand of a 16-bit RS wgmma: ((2, 2, 2), M, (N/16, N)); two
// adjacent 8-column accumulator tiles form one 16-deep k-step.
template <class L>
__host__ __device__ constexpr auto acc_as_a(L l) {
  auto v = logical_divide(get<0, 2>(l), Tile<_2>{});  // ((2, N/16))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(v)), get<1>(l),
                     coalesce(make_layout(get<0, 1>(v), get<2>(l))));
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    dense_fwd_sm90_kernel(const __grid_constant__ Params<Cfg> p) {
#ifdef BSK_SM90A_DEVICE
  using Elem = typename Cfg::Elem;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, D = Cfg::kHeadDim, kStages = Cfg::kStages;
  constexpr float kNegInf = -INFINITY;
  using SS = typename Cfg::SharedStorage;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  SS& ss = *reinterpret_cast<SS*>(smem_raw);

  // Heaviest causal blocks (last rows) first, so the tail of the grid is short.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group;
  const int m0 = m_block * BM;
  const int diag = p.seqlen_k - p.seqlen_q;  // query row t sees keys j <= t + diag
  const int n_end = p.causal ? min(p.seqlen_k, m0 + BM + diag) : p.seqlen_k;
  const int n_blocks = n_end > 0 ? (n_end + BN - 1) / BN : 0;

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&ss.bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&ss.full_k[s], 1);
      cutlass::arch::ClusterTransactionBarrier::init(&ss.full_v[s], 1);
      // Every consumer thread arrives once it has finished reading the stage.
      cutlass::arch::ClusterBarrier::init(&ss.empty[s], 128 * Cfg::kConsumerWGs);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Cfg::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Cfg::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Cfg::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Cfg::SmemLayoutVt{});

  if (wg == 0) {
    // ---- producer ----
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (threadIdx.x == 0 && n_blocks > 0) {
      Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.seqlen_q, D, p.heads_q, p.batch));
      Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.seqlen_k, D, p.heads_kv, p.batch));
      Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.seqlen_k, D, p.heads_kv, p.batch));
      Tensor gQ = local_tile(mQ(_, _, h, b), Shape<Int<BM>, Int<D>>{}, make_coord(m_block, 0));
      Tensor gK = local_tile(mK(_, _, hk, b), Shape<Int<BN>, Int<D>>{}, make_coord(_, 0));
      Tensor gV = local_tile(mV(_, _, hk, b), Shape<Int<BN>, Int<D>>{}, make_coord(_, 0));
      auto tma_q = p.tma_q.get_slice(Int<0>{});
      auto tma_k = p.tma_k.get_slice(Int<0>{});
      auto tma_v = p.tma_v.get_slice(Int<0>{});
      Tensor tQg = tma_q.partition_S(gQ);
      Tensor tQs = tma_q.partition_D(sQ);
      Tensor tKg = tma_k.partition_S(gK);  // (TMA, m, k, n)
      Tensor tKs = tma_k.partition_D(sK);  // (TMA, m, k, stage)
      Tensor tVg = tma_v.partition_S(gV);
      Tensor tVs = tma_v.partition_D(sV);

      constexpr uint32_t kQBytes = BM * D * sizeof(Elem), kKVBytes = BN * D * sizeof(Elem);
      // The byte counts include the zero fill of rows past the end: TMA always writes the box.
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.bar_q, kQBytes);
      copy(p.tma_q.with(ss.bar_q), tQg, tQs);
      for (int n = 0; n < n_blocks; ++n) {
        const int s = n % kStages;
        // Fresh barriers count as having completed the phase before phase 0, so the first lap
        // does not wait.
        cutlass::arch::ClusterBarrier::wait(&ss.empty[s], ((n / kStages) & 1) ^ 1);
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.full_k[s], kKVBytes);
        copy(p.tma_k.with(ss.full_k[s]), tKg(_, _, _, n), tKs(_, _, _, s));
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.full_v[s], kKVBytes);
        copy(p.tma_v.with(ss.full_v[s]), tVg(_, _, _, n), tVs(_, _, _, s));
      }
    }
  } else {
    // ---- consumers ----
    cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
    const int tid = threadIdx.x - 128;
    typename Cfg::MmaQK mma_qk;
    typename Cfg::MmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(tid);
    auto thr_pv = mma_pv.get_thread_slice(tid);
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // smem descriptors
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, N, K, stage)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, N, K, stage)
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<BM>, Int<BN>>{});
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<BM>, Int<D>>{});
    clear(tOrO);

    // (row, col) view of S and O, and the tile coordinates of each S element.
    Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    Tensor O = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    Tensor cS = thr_qk.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
    Tensor cSrc = make_tensor(cS.data(), acc_rowcol(cS.layout()));
    constexpr int kRows = size<0>(S.layout());  // 2 rows per thread
    static_assert(kRows == 2);

    float row_m[kRows], row_l[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) row_m[r] = kNegInf, row_l[r] = 0.f;

    if (n_blocks > 0) cutlass::arch::ClusterBarrier::wait(&ss.bar_q, 0);
    for (int n = 0; n < n_blocks; ++n) {
      const int s = n % kStages, phase = (n / kStages) & 1;
      const int n0 = n * BN;
      cutlass::arch::ClusterBarrier::wait(&ss.full_k[s], phase);
      wg_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, s), tSrS);

      // Only blocks crossing the end of the keys or the causal diagonal need a mask.
      const bool need_mask = n0 + BN > p.seqlen_k || (p.causal && n0 + BN - 1 > m0 + diag);
      if (need_mask) {
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r)
          CUTE_UNROLL
          for (int c = 0; c < size<1>(S); ++c) {
            const int row = m0 + get<0>(cSrc(r, c)), col = n0 + get<1>(cSrc(r, c));
            if (col >= p.seqlen_k || (p.causal && col > row + diag)) S(r, c) = kNegInf;
          }
      }

      // Online softmax; max and sums run on unscaled logits, the scale folds into one FFMA.
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float mx = row_m[r];
        CUTE_UNROLL
        for (int c = 0; c < size<1>(S); ++c) mx = fmaxf(mx, S(r, c));
        // The 4 threads of a quad hold one row.
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row that has seen no key yet keeps max -inf: use 0 as offset so exp2 gives 0s.
        const float base = mx == kNegInf ? 0.f : mx * p.scale_log2;
        const float corr = exp2f(row_m[r] * p.scale_log2 - base);
        row_m[r] = mx;
        float sum = 0.f;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(S); ++c) {
          const float pe = exp2f(fmaf(S(r, c), p.scale_log2, -base));
          S(r, c) = pe;
          sum += pe;
        }
        row_l[r] = row_l[r] * corr + sum;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(O); ++c) O(r, c) *= corr;
      }

      Tensor rP = make_tensor<Elem>(tSrS.layout());
      CUTE_UNROLL
      for (int i = 0; i < size(rP); ++i) rP(i) = static_cast<Elem>(tSrS(i));
      Tensor tOrP = make_tensor(rP.data(), acc_as_a(tSrS.layout()));

      cutlass::arch::ClusterBarrier::wait(&ss.full_v[s], phase);
      wg_gemm<false>(mma_pv, tOrP, tOrV(_, _, _, s), tOrO);
      cutlass::arch::ClusterBarrier::arrive(&ss.empty[s]);
    }

    // ---- epilogue ----
    Tensor cO = thr_pv.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
    Tensor cOrc = make_tensor(cO.data(), acc_rowcol(cO.layout()));
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float l = row_l[r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(O); ++c) O(r, c) *= inv;
      const int row = m0 + get<0>(cOrc(r, 0));
      if (p.lse != nullptr && tid % 4 == 0 && row < p.seqlen_q)
        p.lse[b * p.lse_sb + h * p.lse_sh + row * p.lse_ss] =
            l > 0.f ? row_m[r] * p.softmax_scale + logf(l) : kNegInf;
    }
    // Stage O in Q's shared memory: each warpgroup's rows are its own, and its last Q K^T wgmma
    // has completed (wg_gemm waits), so no other thread still reads them.
    Tensor sO = make_tensor(make_smem_ptr(ss.q.data()), typename Cfg::SmemLayoutQ{});
    Tensor tOsO = thr_pv.partition_C(sO);
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) tOsO(i) = static_cast<Elem>(tOrO(i));
    // Generic-proxy writes must be visible to the TMA (async proxy) before the store.
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(128 * Cfg::kConsumerWGs, /*id=*/1);
    if (tid == 0) {
      Tensor mO = p.tma_o.get_tma_tensor(make_shape(p.seqlen_q, D, p.heads_q, p.batch));
      Tensor gO = local_tile(mO(_, _, h, b), Shape<Int<BM>, Int<D>>{}, make_coord(m_block, 0));
      auto tma_o = p.tma_o.get_slice(Int<0>{});
      copy(p.tma_o, tma_o.partition_S(sO), tma_o.partition_D(gO));
      tma_store_arrive();
      tma_store_wait<0>();  // shared memory must outlive the store's reads
    }
  }
#endif
}

}  // namespace bsk::kernels::sm90
