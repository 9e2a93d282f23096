// Dense forward dispatch: (arch, dtype, head dim) -> one kernel configuration. Four
// instantiations in all (2 dtypes x 2 head dims); causal masking and ragged lengths are runtime
// branches taken only on the blocks that need them.
#include <cmath>
#include <string>

#include "bsk/error.h"
#include "common/cuda_check.h"
#include "dispatch/dense_fwd.h"
#include "dispatch/dense_fwd_launch.cuh"

namespace bsk::detail {
namespace {

// Tile shapes per head dim, chosen with bench/tune/dense_tune.cu on an H200 (bench/results/
// tuning.md). Both use 128 query rows per CTA and 4 warps, so each warp owns 2 row tiles and
// every K/V fragment read from shared memory feeds two MMAs. Head dim 64: Q in registers and
// double-buffered K/V. Head dim 128: the O accumulators leave no room for Q in registers, and the
// extra shared memory of a second K/V stage costs more occupancy than it hides latency.
template <typename Elem, int kHeadDim>
using DenseFwdSm80Config =
    kernels::DenseFwdConfig<Elem, kHeadDim, /*kBlockM=*/128, /*kBlockN=*/64, /*kWarps=*/4,
                            /*kQInRegs=*/kHeadDim == 64, /*kStages=*/kHeadDim == 64 ? 2 : 1>;

template <typename Elem>
void dispatch_head_dim(const DenseFwdArgs& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: return launch_dense_fwd_sm80<DenseFwdSm80Config<Elem, 64>>(a, stream);
    case 128: return launch_dense_fwd_sm80<DenseFwdSm80Config<Elem, 128>>(a, stream);
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
    case DType::kFloat16: return dispatch_head_dim<__half>(a, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(a, stream);
    default:
      throw InvalidArgument("q", std::string("dtype must be float16 or bfloat16 on CUDA, got ") +
                                     dtype_name(a.dtype));
  }
}

}  // namespace bsk::detail
