// Launching one dense-forward kernel configuration: argument translation, the shared-memory
// opt-in, grid shape. Shared by the dispatcher and the tuning harness
// (bench/tune), which times configurations the dispatcher does not ship.
#pragma once

#include <cstdint>

#include "bsk/error.h"
#include "common/cuda_check.h"
#include "dispatch/dense_fwd.h"
#include "kernels/dense_fwd_sm80.cuh"

namespace bsk::detail {

// The kernel-side view of validated arguments (shared with the SparseK launch).
template <typename Elem>
kernels::DenseFwdParams<Elem> make_dense_params(const DenseFwdArgs& a) {
  kernels::DenseFwdParams<Elem> p{};
  p.q = static_cast<const Elem*>(a.q);
  p.k = static_cast<const Elem*>(a.k);
  p.v = static_cast<const Elem*>(a.v);
  p.out = static_cast<Elem*>(a.out);
  p.lse = a.lse;
  p.q_sb = a.q_stride[0], p.q_ss = a.q_stride[1], p.q_sh = a.q_stride[2];
  p.k_sb = a.k_stride[0], p.k_ss = a.k_stride[1], p.k_sh = a.k_stride[2];
  p.v_sb = a.v_stride[0], p.v_ss = a.v_stride[1], p.v_sh = a.v_stride[2];
  p.o_sb = a.out_stride[0], p.o_ss = a.out_stride[1], p.o_sh = a.out_stride[2];
  // lse is [B, Hq, Sq]
  p.lse_sb = a.lse_stride[0], p.lse_sh = a.lse_stride[1], p.lse_ss = a.lse_stride[2];
  p.seqlen_q = a.seqlen_q;
  p.seqlen_k = a.seqlen_k;
  p.group = a.heads_q / a.heads_kv;
  p.softmax_scale = a.softmax_scale;
  p.scale_log2 = static_cast<float>(a.softmax_scale * 1.4426950408889634);
  p.causal = a.causal;
  return p;

}

template <class Cfg>
void launch_dense_fwd_sm80(const DenseFwdArgs& a, cudaStream_t stream) {
  using Elem = typename Cfg::Elem;
  auto* kernel = kernels::dense_fwd_sm80_kernel<Cfg>;
  // Raising the dynamic shared-memory limit on every launch, as FlashAttention does, costs
  // about a microsecond and stays right when several translation units hold copies of one kernel
  // (no -rdc), which a "done once" flag did not.
  if constexpr (Cfg::kSmemBytes > 48 * 1024)
    BSK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Cfg::kSmemBytes));

  const kernels::DenseFwdParams<Elem> p = make_dense_params<Elem>(a);

  const dim3 grid((a.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM, a.heads_q, a.batch);
  // grid.y, grid.z <= 65535: checked by the front door's validation.
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  BSK_CUDA_CHECK_LAUNCH();
}

}  // namespace bsk::detail
