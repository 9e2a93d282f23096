// Dense attention forward for Hopper (sm_90a): TMA + mbarrier pipeline, warp specialization,
// wgmma, persistent CTAs. Written from scratch in the spirit of FlashAttention-3 /
// ThunderKittens, much smaller.
//
// Work unit (tile): a kBlockM (128 or 192) x D block of output for one (batch, query head). The
// grid is persistent (one CTA per SM, a static snake order over tiles). One CTA = 1 + kBlockM/64
// warpgroups:
//   warpgroup 0  producer: one thread issues every TMA load (Q per tile, then K and V blocks) into
//                shared memory: Q double-buffered, K and V each in a kStages-deep ring. Each
//                buffer completes on a "full" mbarrier (transaction count = bytes) and is
//                recycled through an "empty" mbarrier that every consumer thread arrives on once
//                its wgmma has read it. The producer runs ahead across tiles, so the next tile's
//                Q and first K/V blocks load during this tile's last GEMMs and epilogue. It gives
//                most of its registers away (setmaxnreg).
//   warpgroups 1.. consumers: each owns 64 query rows of the tile. Per KV block n:
//                S = Q K^T   (wgmma, both operands in shared memory, f32 accumulators)
//                -> mask (only blocks that cross the causal diagonal or the end of the keys)
//                -> online softmax in registers (exp2 with the scale folded into one FFMA)
//                -> O += P V (wgmma with P from registers: the S accumulator layout, converted
//                   to 16-bit, is the A-operand register layout, so P never touches memory).
//                Software-pipelined: S(n) and P(n-1) V(n-1) are issued back to back and the
//                softmax of S(n) runs while P(n-1) V(n-1) is on the tensor cores, across tiles
//                too (kOverlapTiles, 128-row tiles): the next tile's first Q K^T goes out with
//                this tile's last P V. And the two
//                consumer warpgroups can take turns issuing GEMMs (kPingPong: two named
//                barriers), so one's softmax overlaps the other's GEMMs; measured slower here
//                than letting the warp schedulers interleave them (bench/results/tuning.md), so
//                off by default.
// Epilogue per tile and warpgroup: O is normalized, staged in shared memory and written by a TMA
// store of the warpgroup's 64 rows (asynchronous; waited for only before the staging buffer is
// reused), which clips rows past Sq. LSE goes out from registers.
// Ragged tails need no code: TMA zero-fills rows past Sq/Skv (masked to -inf for keys) and never
// stores rows past Sq. The loop order is fixed and there are no atomics, so results are bitwise
// reproducible.
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/atom/copy_traits_sm90.hpp>
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

template <typename Elem_, int kHeadDim_, int kBlockN_ = 128, int kStages_ = 2,
          bool kPingPong_ = false, bool kOverlapTiles_ = true, int kBlockM_ = 128,
          bool kSnake_ = true>
struct Config {
  using Elem = Elem_;  // cutlass::half_t or cutlass::bfloat16_t
  static constexpr int kHeadDim = kHeadDim_;
  // One consumer warpgroup per 64 rows (one wgmma M): 2, or 3 for more warps in flight at head
  // dim 64 (at 128 the third one's accumulators do not fit in the registers).
  static constexpr int kBlockM = kBlockM_;
  static_assert(kBlockM == 128 || (kBlockM == 192 && kHeadDim_ == 64));
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  // Ping-pong: the two consumer warpgroups take turns issuing their GEMMs (named barriers), so
  // one's softmax runs while the other's GEMMs occupy the tensor cores instead of both
  // contending for the exp unit at the same time.
  static constexpr bool kPingPong = kPingPong_;
  // A tile's first Q K^T and softmax overlap the previous tile's last P V (see the tail of the
  // consumer loop). It keeps P' live through the epilogue: with three consumer warpgroups (160
  // registers each) that spills, so it is off there.
  static constexpr bool kOverlapTiles = kOverlapTiles_;
  // Round-robin tile order reversed in every other round, so a CTA that drew a heavy causal
  // tile draws a light one next and the CTAs stay in step (their working set in L2 narrow).
  static constexpr bool kSnake = kSnake_;
  static constexpr int kConsumerWGs = kBlockM / 64;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);
  // Register split after setmaxnreg: 128*24 + 256*240 = 64512 <= 65536; with three consumer
  // warpgroups 128*32 + 384*160 = 65536 (the producer's loop spilled at 24 there).
  static constexpr int kProducerRegs = kConsumerWGs == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kConsumerWGs == 2 ? 240 : 160;

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
  // Output staging: one 64 x D tile per consumer warpgroup, each stored by its own TMA store.
  using SmemLayoutO = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Elem>{},
                                             Shape<_64, HD, Int<kConsumerWGs>>{}));
  // One warpgroup's share of MmaPV (same per-thread fragment), to address its staging tile.
  using MmaPV1 = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, HD, BN>, GMMA::Major::K, GMMA::Major::MN>()));
  // V^T (D x BN) is the same bytes as V (BN x D) seen with the modes swapped.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutK{},
      make_ordered_layout(Shape<HD, BN, Int<kStages>>{}, Step<_2, _1, _3>{})));

  struct SharedStorage {
    // Q double-buffered: the next tile's Q loads during the whole current tile.
    cute::array_aligned<Elem, cosize_v<SmemLayoutQ>, 1024> q[2];
    cute::array_aligned<Elem, cosize_v<SmemLayoutO>, 1024> o;  // output staging for TMA store
    cute::array_aligned<Elem, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Elem, cosize_v<SmemLayoutK>, 1024> v;
    // full_*: TMA landed (transaction bytes); empty_*: all consumer threads done reading.
    uint64_t full_q[2], empty_q[2];
    uint64_t full_k[kStages], full_v[kStages], empty_k[kStages], empty_v[kStages];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm_90 CTA can have");

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
  using TmaO = decltype(make_tma_copy(SM90_TMA_STORE{}, GTensorOut{},
                                      take<0, 2>(SmemLayoutO{}), Shape<_64, HD>{}, _1{}));
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
// Issues one warpgroup-wide GEMM C (+)= A B over all k-blocks as one wgmma batch and returns
// without waiting (warpgroup_wait<N> later). The operand fences keep the compiler from moving
// register reads/writes of A and C across the asynchronous wgmma.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_issue(Mma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kARegs =
      !is_base_of<GMMA::DescriptorIterator, typename TA::engine_type::iterator>::value;
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
}

// The same, waited for.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  wg_issue<kZeroInit>(mma, a, b, c);
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (!is_base_of<GMMA::DescriptorIterator, typename TA::engine_type::iterator>::value)
    warpgroup_fence_operand(const_cast<TA&>(a));
}

// 2^x on the MUFU unit, flushing denormals (exp2f adds range fix-ups we do not need: the
// arguments are <= 0 and results below 2^-126 may as well be 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

#ifdef BSK_SM90A_DEVICE
// Epilogue of row r of O in (row, col) registers: the row's sum over the 4 threads that share it,
// O scaled by its inverse (0 for a row that saw no key). Returns the sum.
template <class TO>
__device__ __forceinline__ float normalize_row(TO& O, int r, float l) {
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  const float inv = l > 0.f ? 1.f / l : 0.f;
  CUTE_UNROLL
  for (int c = 0; c < size<1>(O); ++c) O(r, c) *= inv;
  return l;
}

// Online softmax of one S block in (row, col) registers: updates each row's running max and sum,
// leaves in S the P V weights weight(r, c, p) of p = exp(S - max) (the sum takes p itself) and in
// corr the factor that rescales O to the new max. Max and sums run on unscaled logits; the scale
// folds into one FFMA. Shared by the dense and SparseK Hopper kernels.
template <bool kLazy = false, int kRows, class TS, class Weight>
__device__ __forceinline__ void online_softmax(TS& S, float (&row_m)[kRows], float (&row_l)[kRows],
                                               float (&corr)[kRows], float scale_log2,
                                               Weight&& weight) {
  // The row max and sum over a thread's columns run as kLanes independent chains combined by a
  // tree: one chain of 64 dependent FMNMX or FADD made the warps wait on fixed latencies (Nsight
  // Compute: "wait" was the largest stall reason in the SparseK consumer loop).
  constexpr int kCols = decltype(size<1>(S))::value, kLanes = 8;
  static_assert(kCols % kLanes == 0);
  auto tree = [](float (&v)[kLanes], auto op) {
    CUTE_UNROLL
    for (int w = kLanes / 2; w > 0; w /= 2)
      CUTE_UNROLL
      for (int i = 0; i < w; ++i) v[i] = op(v[i], v[i + w]);
    return v[0];
  };
  auto fmax2 = [](float a, float b) { return fmaxf(a, b); };
  auto add2 = [](float a, float b) { return a + b; };
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    float part[kLanes];
    CUTE_UNROLL
    for (int i = 0; i < kLanes; ++i) part[i] = S(r, i);
    CUTE_UNROLL
    for (int c = kLanes; c < kCols; ++c) part[c % kLanes] = fmaxf(part[c % kLanes], S(r, c));
    float mx = fmaxf(row_m[r], tree(part, fmax2));
    // The 4 threads of a quad hold one row.
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // kLazy (FlashAttention-4's lazy rescaling, on Blackwell): the exponents stay relative to
    // the row's old reference while the new max exceeds it by at most kRescaleSlack (log2
    // units), so the weights reach at most 2^kRescaleSlack = 256, inside fp32 and the 16-bit P;
    // the sum, O and LSE all use the same reference, so the result is the same up to rounding
    // (the largest weight is no longer exactly 1). Once the max settles, corr stays 1 and the
    // consumers skip rescaling O (rescale_o). The dense kernel keeps the exact max: with the
    // lazy form one bf16 case of the dense accuracy test went 3% over its bound (session 13).
    // A row that has seen no key yet keeps max -inf: use 0 as offset so exp2 gives 0s.
    float base;
    if constexpr (kLazy) {
      constexpr float kRescaleSlack = 8.f;
      const bool keep = (mx - row_m[r]) * scale_log2 <= kRescaleSlack;  // false while row_m = -inf
      const float ref = keep ? row_m[r] : mx;
      base = ref == -INFINITY ? 0.f : ref * scale_log2;
      corr[r] = keep ? 1.f : fast_exp2(row_m[r] * scale_log2 - base);
      row_m[r] = ref;
    } else {  // the exact max (the dense kernel: the code it was measured with, unchanged)
      base = mx == -INFINITY ? 0.f : mx * scale_log2;
      corr[r] = fast_exp2(row_m[r] * scale_log2 - base);
      row_m[r] = mx;
    }
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const float pe = fast_exp2(fmaf(S(r, c), scale_log2, -base));
      part[c % kLanes] = c < kLanes ? pe : part[c % kLanes] + pe;
      S(r, c) = weight(r, c, pe);
    }
    row_l[r] = row_l[r] * corr[r] + tree(part, add2);
  }
}

// O *= corr per row, skipped where no row of the warp moved its reference (online_softmax's
// lazy rescaling leaves corr = 1 for most blocks): 64 multiplies per thread and block that sit
// between a P V and the next block's GEMMs. The SparseK kernel's (A/B on an H100: fused kernel
// 0.98x at 131072, 0.965x at 32768; bench/results/sparsek-lazy-rescale-ab-h100.txt).
template <int kRows, class TO>
__device__ __forceinline__ void rescale_o(TO& O, const float (&corr)[kRows]) {
  bool any = false;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) any |= corr[r] != 1.f;
  if (!__any_sync(0xffffffffu, any)) return;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r)
    CUTE_UNROLL
    for (int c = 0; c < size<1>(O); ++c) O(r, c) *= corr[r];
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
  constexpr int kConsumers = 128 * Cfg::kConsumerWGs;
  constexpr float kNegInf = -INFINITY;
  using SS = typename Cfg::SharedStorage;
  using TB = cutlass::arch::ClusterTransactionBarrier;
  using Bar = cutlass::arch::ClusterBarrier;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  SS& ss = *reinterpret_cast<SS*>(smem_raw);

  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int i = 0; i < 2; ++i) {
      TB::init(&ss.full_q[i], 1);
      Bar::init(&ss.empty_q[i], kConsumers);
    }
    for (int s = 0; s < kStages; ++s) {
      TB::init(&ss.full_k[s], 1);
      TB::init(&ss.full_v[s], 1);
      // Every consumer thread arrives once its warpgroup's wgmma has finished reading the stage.
      Bar::init(&ss.empty_k[s], kConsumers);
      Bar::init(&ss.empty_v[s], kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  Tensor sQ0 = make_tensor(make_smem_ptr(ss.q[0].data()), typename Cfg::SmemLayoutQ{});
  Tensor sQ1 = make_tensor(make_smem_ptr(ss.q[1].data()), typename Cfg::SmemLayoutQ{});
  Tensor sO = make_tensor(make_smem_ptr(ss.o.data()), typename Cfg::SmemLayoutO{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Cfg::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Cfg::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Cfg::SmemLayoutVt{});

  // Persistent static schedule: in round r, CTA i takes tile r * grid + i, or r * grid +
  // grid - 1 - i in odd rounds (kSnake). Tile order: query block fastest (last block, the
  // heaviest under a causal mask, first), then head, then batch, so the CTAs running at one time
  // share a few heads' K/V in L2. Plain round robin gave the CTAs unequal causal work wherever
  // the grid and the blocks per head share a factor (at S=1024, 132 CTAs and 8 blocks per head:
  // some CTAs drew blocks 7 and 3 in turn, others 4 and 0); the snake pairs heavy with light.
  const int m_blocks = (p.seqlen_q + BM - 1) / BM;
  const int num_tiles = m_blocks * p.heads_q * p.batch;
  const int diag = p.seqlen_k - p.seqlen_q;  // query row t sees keys j <= t + diag
  struct Tile {
    int m_block, h, b, n_blocks;
  };
  auto decode = [&](int t) {
    Tile x;
    x.m_block = m_blocks - 1 - t % m_blocks;
    t /= m_blocks;
    x.h = t % p.heads_q;
    x.b = t / p.heads_q;
    const int n_end = p.causal ? min(p.seqlen_k, (x.m_block + 1) * BM + diag) : p.seqlen_k;
    x.n_blocks = n_end > 0 ? (n_end + BN - 1) / BN : 0;
    return x;
  };

  // This CTA's first tile, and the tile of round r + 1 given t, its tile of round r (at least
  // num_tiles past the last round; no overflow: the launcher keeps num_tiles + gridDim.x below
  // 2^31). Stepping from t keeps a single value live across a tile.
  const int first_tile = blockIdx.x;
  auto next_tile = [&](int t, int r) {
    const int b = blockIdx.x, g = gridDim.x;
    const int step = !Cfg::kSnake ? g : (r & 1) ? 2 * b + 1 : 2 * (g - b) - 1;
    return min(t + step, num_tiles);
  };

  if (wg == 0) {
    // ---- producer: one thread issues every TMA load ----
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (threadIdx.x != 0) return;
    Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.seqlen_q, D, p.heads_q, p.batch));
    Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.seqlen_k, D, p.heads_kv, p.batch));
    Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.seqlen_k, D, p.heads_kv, p.batch));
    auto tma_q = p.tma_q.get_slice(Int<0>{});
    auto tma_k = p.tma_k.get_slice(Int<0>{});
    auto tma_v = p.tma_v.get_slice(Int<0>{});
    Tensor tQs0 = tma_q.partition_D(sQ0);
    Tensor tQs1 = tma_q.partition_D(sQ1);
    Tensor tKs = tma_k.partition_D(sK);  // (TMA, m, k, stage)
    Tensor tVs = tma_v.partition_D(sV);
    // The byte counts include the zero fill of rows past the end: TMA always writes the box.
    constexpr uint32_t kQBytes = BM * D * sizeof(Elem), kKVBytes = BN * D * sizeof(Elem);
    int kv = 0;  // K/V blocks issued so far (ring position), over all tiles
    int lap_q = 0;
    for (int t = first_tile; t < num_tiles; t = next_tile(t, lap_q++)) {
      const Tile x = decode(t);
      const int hk = x.h / p.group;
      Tensor gQ = local_tile(mQ(_, _, x.h, x.b), Shape<Int<BM>, Int<D>>{}, make_coord(x.m_block, 0));
      Tensor gK = local_tile(mK(_, _, hk, x.b), Shape<Int<BN>, Int<D>>{}, make_coord(_, 0));
      Tensor gV = local_tile(mV(_, _, hk, x.b), Shape<Int<BN>, Int<D>>{}, make_coord(_, 0));
      Tensor tKg = tma_k.partition_S(gK);  // (TMA, m, k, n)
      Tensor tVg = tma_v.partition_S(gV);
      // Fresh barriers count as having completed the phase before phase 0, so the first lap
      // through each buffer does not wait.
      const int qb = lap_q & 1;
      Bar::wait(&ss.empty_q[qb], ((lap_q >> 1) & 1) ^ 1);
      TB::arrive_and_expect_tx(&ss.full_q[qb], kQBytes);
      copy(p.tma_q.with(ss.full_q[qb]), tma_q.partition_S(gQ), qb ? tQs1 : tQs0);
      for (int n = 0; n < x.n_blocks; ++n, ++kv) {
        const int s = kv % kStages, parity = ((kv / kStages) & 1) ^ 1;
        Bar::wait(&ss.empty_k[s], parity);
        TB::arrive_and_expect_tx(&ss.full_k[s], kKVBytes);
        copy(p.tma_k.with(ss.full_k[s]), tKg(_, _, _, n), tKs(_, _, _, s));
        Bar::wait(&ss.empty_v[s], parity);
        TB::arrive_and_expect_tx(&ss.full_v[s], kKVBytes);
        copy(p.tma_v.with(ss.full_v[s]), tVg(_, _, _, n), tVs(_, _, _, s));
      }
    }
  } else {
    // ---- consumers ----
    cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
    const int tid = threadIdx.x - 128;
    const int cwg = tid / 128;  // consumer warpgroup: query rows 64*cwg .. 64*cwg+63 of a tile
    // Named barriers: 1 and 2 order the warpgroups' GEMM turns (ping-pong), 3 + cwg is each
    // warpgroup's own epilogue barrier (0 is __syncthreads).
    auto turn_wait = [&] {
      if constexpr (Cfg::kPingPong) cutlass::arch::NamedBarrier::sync(kConsumers, 1 + cwg);
    };
    auto turn_pass = [&] {
      if constexpr (Cfg::kPingPong) cutlass::arch::NamedBarrier::arrive(kConsumers, 2 - cwg);
    };
    static_assert(!Cfg::kPingPong || Cfg::kConsumerWGs == 2);
    if (cwg == 1) turn_pass();  // warpgroup 0 takes the first turn
    typename Cfg::MmaQK mma_qk;
    typename Cfg::MmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(tid);
    auto thr_pv = mma_pv.get_thread_slice(tid);
    Tensor tSrQ0 = thr_qk.partition_fragment_A(sQ0);  // smem descriptors, per Q buffer
    Tensor tSrQ1 = thr_qk.partition_fragment_A(sQ1);
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, N, K, stage)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, N, K, stage)
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<BM>, Int<BN>>{});
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<BM>, Int<D>>{});
    Tensor rP = make_tensor<Elem>(tSrS.layout());
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(tSrS.layout()));
    Tensor sOw = sO(_, _, cwg);  // this warpgroup's 64 x D staging tile
    // stmatrix: 16-byte shared stores of the 16-bit O fragment (4 per 64 columns).
    auto st_o = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Elem>{}, typename Cfg::MmaPV1{});
    auto thr_st_o = st_o.get_thread_slice(tid % 128);
    Tensor tOsO = thr_st_o.partition_D(sOw);
    Tensor rO = make_tensor<Elem>(tOrO.layout());

    // (row, col) views of S and O, and the tile coordinates of each S and O element.
    Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    Tensor O = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    Tensor cS = thr_qk.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
    Tensor cSrc = make_tensor(cS.data(), acc_rowcol(cS.layout()));
    Tensor cO = thr_pv.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
    Tensor cOrc = make_tensor(cO.data(), acc_rowcol(cO.layout()));
    constexpr int kRows = size<0>(S.layout());  // 2 rows per thread
    static_assert(kRows == 2);
    float row_m[kRows], row_l[kRows], corr[kRows];

    // Mask (only where the block crosses the end of the keys or the causal diagonal) and online
    // softmax of the S block at key offset n0: updates row_m/row_l, leaves P = exp(S - max) in S
    // and the factor that rescales O to the new max in corr. Max and sums run on unscaled
    // logits; the scale folds into one FFMA.
    auto softmax = [&](int m0, int n0) {
      if (n0 + BN > p.seqlen_k || (p.causal && n0 + BN - 1 > m0 + diag)) {
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r)
          CUTE_UNROLL
          for (int c = 0; c < size<1>(S); ++c) {
            const int row = m0 + get<0>(cSrc(r, c)), col = n0 + get<1>(cSrc(r, c));
            if (col >= p.seqlen_k || (p.causal && col > row + diag)) S(r, c) = kNegInf;
          }
      }
      online_softmax(S, row_m, row_l, corr, p.scale_log2, [](int, int, float pe) { return pe; });
    };
    auto convert_p = [&] {
      CUTE_UNROLL
      for (int i = 0; i < size(rP); ++i) rP(i) = static_cast<Elem>(tSrS(i));
    };

    auto reset_rows = [&] {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) row_m[r] = kNegInf, row_l[r] = 0.f;
    };
    // S = Q K^T with Q from buffer qbuf (descriptors differ only in their start address).
    auto qk = [&](int qbuf, auto const& k_stage) {
      if (qbuf) wg_issue<true>(mma_qk, tSrQ1, k_stage, tSrS);
      else wg_issue<true>(mma_qk, tSrQ0, k_stage, tSrS);
    };

    int kv = 0;  // K/V blocks consumed so far, over all tiles (same count as the producer's)
    int lap_q = 0;
    int t = first_tile;
    // True when the current tile's first block already went through the softmax (its P in rP,
    // O cleared): the previous tile's tail issued it (kOverlapTiles).
    bool head_done = false;
    for (; t < num_tiles; ++lap_q) {
      // Only t is carried from tile to tile (registers are tight with three consumer
      // warpgroups); the rest is decoded where it is used.
      const Tile x = decode(t);
      const int m0 = x.m_block * BM;
      const int qb = lap_q & 1;
      if (!head_done) {
        clear(tOrO);
        reset_rows();
        Bar::wait(&ss.full_q[qb], (lap_q >> 1) & 1);
        if (x.n_blocks == 0) Bar::arrive(&ss.empty_q[qb]);
        if (x.n_blocks > 0) {
          const int s = kv % kStages;
          Bar::wait(&ss.full_k[s], (kv / kStages) & 1);
          turn_wait();
          qk(qb, tSrK(_, _, _, s));
          turn_pass();
          warpgroup_wait<0>();
          warpgroup_fence_operand(tSrS);
          Bar::arrive(&ss.empty_k[s]);
          if (x.n_blocks == 1) Bar::arrive(&ss.empty_q[qb]);
          softmax(m0, 0);
          convert_p();
        }
      }

      // Software pipeline within the warpgroup: S(n) = Q K(n)^T is issued before O += P(n-1)
      // V(n-1), and the softmax of S(n) runs while that P V product is on the tensor cores.
      for (int n = 1; n < x.n_blocks; ++n) {
        const int ik = kv + n, iv = kv + n - 1;
        const int sk = ik % kStages, sv = iv % kStages;
        // Wait for the data before taking the turn: holding the turn while waiting could stall
        // the other warpgroup's GEMMs for nothing.
        Bar::wait(&ss.full_k[sk], (ik / kStages) & 1);
        Bar::wait(&ss.full_v[sv], (iv / kStages) & 1);
        turn_wait();
        qk(qb, tSrK(_, _, _, sk));
        wg_issue<false>(mma_pv, tOrP, tOrV(_, _, _, sv), tOrO);
        turn_pass();
        warpgroup_wait<1>();  // S(n) is ready; P(n-1) V(n-1) may still run
        warpgroup_fence_operand(tSrS);
        Bar::arrive(&ss.empty_k[sk]);
        if (n == x.n_blocks - 1) Bar::arrive(&ss.empty_q[qb]);
        softmax(m0, n * BN);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(rP);
        Bar::arrive(&ss.empty_v[sv]);
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r)
          CUTE_UNROLL
          for (int c = 0; c < size<1>(O); ++c) O(r, c) *= corr[r];
        convert_p();
      }

      // Tail. A tile of a few key blocks would otherwise start with a Q K^T and a softmax that
      // have no GEMM to overlap, and end with a P V that has none either (the seed shape has 4
      // blocks per tile; bench/results/tuning.md, run 4). So the next tile's S(0) = Q' K'(0)^T
      // is issued together with this tile's last P V, and its softmax runs while that product
      // does; the next tile's Q and first K block are already loaded (Q is double-buffered and
      // the producer runs ahead).
      const int t_next = next_tile(t, lap_q);
      const Tile xn = decode(t_next);  // meaningful only when t_next < num_tiles
      const bool fuse = Cfg::kOverlapTiles && x.n_blocks > 0 && t_next < num_tiles &&
                        xn.n_blocks > 0;
      float fin_m[kRows], fin_l[kRows];  // this tile's softmax state, for the epilogue
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) fin_m[r] = row_m[r], fin_l[r] = row_l[r];
      // Two separate paths rather than one with the Q K^T under a condition: ptxas serializes
      // the wgmmas (warning C7514) when it cannot tell which accumulators are in flight.
      if (fuse) {
        const int iv = kv + x.n_blocks - 1, sv = iv % kStages;
        const int ik = kv + x.n_blocks, sk = ik % kStages;  // the next tile's first K block
        const int qbn = (lap_q + 1) & 1;
        Bar::wait(&ss.full_v[sv], (iv / kStages) & 1);
        Bar::wait(&ss.full_q[qbn], ((lap_q + 1) >> 1) & 1);
        Bar::wait(&ss.full_k[sk], (ik / kStages) & 1);
        turn_wait();
        qk(qbn, tSrK(_, _, _, sk));
        wg_issue<false>(mma_pv, tOrP, tOrV(_, _, _, sv), tOrO);
        turn_pass();
        warpgroup_wait<1>();  // S'(0) is ready; the last P V may still run
        warpgroup_fence_operand(tSrS);
        Bar::arrive(&ss.empty_k[sk]);
        if (xn.n_blocks == 1) Bar::arrive(&ss.empty_q[qbn]);
        reset_rows();
        softmax(xn.m_block * BM, 0);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(rP);
        Bar::arrive(&ss.empty_v[sv]);
        // P'(0) into its 16-bit registers now that the last P V has read them, so the S
        // accumulators are free during the epilogue.
        convert_p();
      } else if (x.n_blocks > 0) {
        const int iv = kv + x.n_blocks - 1, sv = iv % kStages;
        Bar::wait(&ss.full_v[sv], (iv / kStages) & 1);
        turn_wait();
        wg_issue<false>(mma_pv, tOrP, tOrV(_, _, _, sv), tOrO);
        turn_pass();
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(rP);
        Bar::arrive(&ss.empty_v[sv]);
      }
      kv += x.n_blocks;

      // ---- epilogue: normalize, LSE from registers, O through shared memory + TMA store ----
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const float l = normalize_row(O, r, fin_l[r]);
        const int row = m0 + get<0>(cOrc(r, 0));
        if (p.lse != nullptr && tid % 4 == 0 && row < p.seqlen_q)
          p.lse[x.b * p.lse_sb + x.h * p.lse_sh + row * p.lse_ss] =
              l > 0.f ? fin_m[r] * p.softmax_scale + logf(l) : kNegInf;
      }
      // Each warpgroup stages and stores its own 64 rows, so the two never wait for each other
      // here (that would undo the ping-pong offset). The previous tile's TMA store must have read
      // the staging tile before it is overwritten.
      const bool leader = tid % 128 == 0;
      if (leader) tma_store_wait<0>();
      cutlass::arch::NamedBarrier::sync(128, 3 + cwg);
      CUTE_UNROLL
      for (int i = 0; i < size(tOrO); ++i) rO(i) = static_cast<Elem>(tOrO(i));
      copy(st_o, thr_st_o.retile_S(rO), tOsO);
      // Generic-proxy writes must be visible to the TMA (async proxy) before the store.
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(128, 3 + cwg);
      if (leader) {
        Tensor mO = p.tma_o.get_tma_tensor(make_shape(p.seqlen_q, D, p.heads_q, p.batch));
        Tensor gO = local_tile(mO(_, _, x.h, x.b), Shape<_64, Int<D>>{},
                               make_coord(x.m_block * Cfg::kConsumerWGs + cwg, 0));
        auto tma_o = p.tma_o.get_slice(Int<0>{});
        copy(p.tma_o, tma_o.partition_S(sOw), tma_o.partition_D(gO));
        tma_store_arrive();
      }
      if (fuse) clear(tOrO);
      head_done = fuse;
      t = t_next;
    }
    // Warpgroup 1 passed the turn once more than warpgroup 0 took it; consume that arrival so
    // no named barrier is left half-arrived at exit.
    if (cwg == 0) turn_wait();
    if (tid % 128 == 0) tma_store_wait<0>();  // shared memory must outlive the stores' reads
  }
#endif
}

}  // namespace bsk::kernels::sm90
