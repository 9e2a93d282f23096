// Dense forward dispatch: (arch, dtype, head dim) -> one kernel configuration. Four
// instantiations in all (2 dtypes x 2 head dims); causal masking and ragged lengths are runtime
// branches taken only on the blocks that need them.
#include <atomic>
#include <cmath>
#include <string>

#include "bsk/error.h"
#include "common/cuda_check.h"
#include "dispatch/dense_fwd.h"
#include "kernels/dense_fwd_sm80.cuh"

namespace bsk::detail {
namespace {

// Tile shapes per head dim: 128 query rows per CTA (2 row tiles per warp so each K/V fragment
// feeds two MMAs), 64 keys per block. Head dim 64 keeps Q in registers; 128 has no room.
template <typename Elem, int kHeadDim>
using DenseFwdSm80Config =
    kernels::DenseFwdConfig<Elem, kHeadDim, /*kBlockM=*/128, /*kBlockN=*/kHeadDim == 64 ? 64 : 32,
                            /*kWarps=*/4,
                            /*kQInRegs=*/kHeadDim == 64>;

template <class Cfg>
void launch_dense_fwd_sm80(const DenseFwdArgs& a, int device, cudaStream_t stream) {
  using Elem = typename Cfg::Elem;
  auto* kernel = kernels::dense_fwd_sm80_kernel<Cfg>;
  // The opt-in for > 48 KB of dynamic shared memory is per device; do it once per device.
  static std::atomic<uint64_t> configured{0};
  const uint64_t bit = uint64_t{1} << (device & 63);
  if (!(configured.load(std::memory_order_acquire) & bit)) {
    BSK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        Cfg::kSmemBytes));
    configured.fetch_or(bit, std::memory_order_acq_rel);
  }

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

  const dim3 grid((a.seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM, a.heads_q, a.batch);
  if (grid.y > 65535 || grid.z > 65535)
    throw InvalidArgument("q", "batch and head counts must each be <= 65535 on CUDA");
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  BSK_CUDA_CHECK_LAUNCH();
}

template <typename Elem>
void dispatch_head_dim(const DenseFwdArgs& a, int device, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: return launch_dense_fwd_sm80<DenseFwdSm80Config<Elem, 64>>(a, device, stream);
    case 128: return launch_dense_fwd_sm80<DenseFwdSm80Config<Elem, 128>>(a, device, stream);
    default:
      throw InvalidArgument("q", "head dim must be 64 or 128 on CUDA, got " +
                                     std::to_string(a.head_dim));
  }
}

}  // namespace

void dense_fwd_cuda(const DenseFwdArgs& a, int device, cudaStream_t stream) {
  const int cc = device_cc(device);
  if (cc < 80)
    throw Unsupported("dense attention needs a GPU of compute capability 8.0 or newer; cuda:" +
                      std::to_string(device) + " is " + std::to_string(cc / 10) + "." +
                      std::to_string(cc % 10));
  switch (a.dtype) {
    case DType::kFloat16: return dispatch_head_dim<__half>(a, device, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(a, device, stream);
    default:
      throw InvalidArgument("q", std::string("dtype must be float16 or bfloat16 on CUDA, got ") +
                                     dtype_name(a.dtype));
  }
}

}  // namespace bsk::detail
