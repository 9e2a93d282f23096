// Launching the Hopper (sm_90a) dense forward: TMA descriptors from the BSHD views, the
// shared-memory opt-in, the grid. Shared by the dispatcher and the tuning harness (bench/tune).
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bsk/error.h"
#include "common/cuda_check.h"
#include "dispatch/dense_fwd.h"
#include "kernels/dense_fwd_sm90.cuh"

namespace bsk::detail {

// __half / __nv_bfloat16 -> the CUTLASS types the GMMA atoms are written for (same bits).
template <typename T> struct CuteElem;
template <> struct CuteElem<__half> { using type = cutlass::half_t; };
template <> struct CuteElem<__nv_bfloat16> { using type = cutlass::bfloat16_t; };

// TMA needs a 16-byte aligned base and strides that are multiples of 16 bytes (below 2^40).
// The front door already demands that of dims longer than 1; a dim of length 1 may carry any
// stride, which we replace by a harmless one (its index is always 0).
inline bool tma_describable(const void* ptr, const int64_t stride[3], const int64_t size[3]) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (size[i] > 1 && (stride[i] % 8 != 0 || stride[i] <= 0 || stride[i] >= (int64_t(1) << 36)))
      return false;
  return true;
}

// The stride a tensor map is given for a dim: a dim of length 1 may carry any stride (its index
// is always 0), replaced by a harmless one.
inline int64_t tma_stride(int64_t stride, int64_t size) {
  return size > 1 ? stride : int64_t(8);
}

inline bool sm90_supports(const DenseFwdArgs& a) {
  const int64_t qsz[3] = {a.batch, a.seqlen_q, a.heads_q};
  const int64_t ksz[3] = {a.batch, a.seqlen_k, a.heads_kv};
  // The persistent scheduler counts tiles (of 128 query rows or more) in an int, with room for
  // one more round of CTAs (at most 1024 SMs).
  const int64_t tiles = (int64_t(a.seqlen_q) + 127) / 128 * a.heads_q * a.batch;
  // Empty problems stay on the sm80 path: a TMA descriptor cannot have a dimension of size 0.
  return a.batch > 0 && a.seqlen_q > 0 && a.seqlen_k > 0 && a.heads_q > 0 &&
         (a.head_dim == 64 || a.head_dim == 128) && tiles < (int64_t(1) << 31) - 1024 &&
         tma_describable(a.q, a.q_stride, qsz) &&
         tma_describable(a.k, a.k_stride, ksz) && tma_describable(a.v, a.v_stride, ksz) &&
         tma_describable(a.out, a.out_stride, qsz);
}

template <class Cfg>
void launch_dense_fwd_sm90(const DenseFwdArgs& a, cudaStream_t stream) {
  using namespace cute;
  using Elem = typename Cfg::Elem;
  constexpr int D = Cfg::kHeadDim;
  auto* kernel = kernels::sm90::dense_fwd_sm90_kernel<Cfg>;
  BSK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Cfg::kSmemBytes));

  // (seq, d, heads, batch) views; strides of length-1 dims replaced (see tma_describable).
  const auto fix = tma_stride;
  auto in_tensor = [&](const void* ptr, const int64_t st[3], int s, int heads) {
    return make_tensor(make_gmem_ptr(static_cast<Elem const*>(ptr)),
                       make_shape(int32_t(s), int32_t(D), int32_t(heads), int32_t(a.batch)),
                       make_stride(fix(st[1], s), _1{}, fix(st[2], heads), fix(st[0], a.batch)));
  };
  auto mQ = in_tensor(a.q, a.q_stride, a.seqlen_q, a.heads_q);
  auto mK = in_tensor(a.k, a.k_stride, a.seqlen_k, a.heads_kv);
  auto mV = in_tensor(a.v, a.v_stride, a.seqlen_k, a.heads_kv);
  auto mO = make_tensor(
      make_gmem_ptr(static_cast<Elem*>(a.out)),
      make_shape(int32_t(a.seqlen_q), int32_t(D), int32_t(a.heads_q), int32_t(a.batch)),
      make_stride(fix(a.out_stride[1], a.seqlen_q), _1{}, fix(a.out_stride[2], a.heads_q),
                  fix(a.out_stride[0], a.batch)));

  using BM = Int<Cfg::kBlockM>;
  using BN = Int<Cfg::kBlockN>;
  using HD = Int<D>;
  kernels::sm90::Params<Cfg> p{
      make_tma_copy(SM90_TMA_LOAD{}, mQ, typename Cfg::SmemLayoutQ{}, Shape<BM, HD>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mK, take<0, 2>(typename Cfg::SmemLayoutK{}),
                    Shape<BN, HD>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mV, take<0, 2>(typename Cfg::SmemLayoutK{}),
                    Shape<BN, HD>{}, _1{}),
      make_tma_copy(SM90_TMA_STORE{}, mO, take<0, 2>(typename Cfg::SmemLayoutO{}),
                    Shape<_64, HD>{}, _1{}),
  };
  p.lse = a.lse;
  // lse is [B, Hq, Sq]
  p.lse_sb = a.lse_stride[0], p.lse_sh = a.lse_stride[1], p.lse_ss = a.lse_stride[2];
  p.batch = a.batch, p.seqlen_q = a.seqlen_q, p.seqlen_k = a.seqlen_k;
  p.heads_q = a.heads_q, p.heads_kv = a.heads_kv;
  p.group = a.heads_q / a.heads_kv;
  p.softmax_scale = a.softmax_scale;
  p.scale_log2 = static_cast<float>(a.softmax_scale * 1.4426950408889634);
  p.causal = a.causal;

  // Persistent: one CTA per SM (the shared memory allows no second), never more than tiles.
  int device = 0;
  BSK_CUDA_CHECK(cudaGetDevice(&device));
  const int sms = device_sm_count(device);
  const int64_t tiles =
      int64_t((a.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM) * a.heads_q * a.batch;
  const int grid = static_cast<int>(std::min<int64_t>(tiles, sms));
  if (grid == 0) return;
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  BSK_CUDA_CHECK_LAUNCH();
}

}  // namespace bsk::detail
