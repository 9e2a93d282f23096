// Dense forward dispatch: (path, dtype, head dim) -> one kernel configuration. Four
// instantiations per path (2 dtypes x 2 head dims); causal masking and ragged lengths are runtime
// branches taken only on the blocks that need them. Path: sm90 (Hopper, TMA + wgmma) or sm80
// (mma.sync, any GPU of cc >= 8.0); see DensePath in dense_fwd.h.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bsk/error.h"
#include "common/cuda_check.h"
#include "dispatch/dense_fwd.h"
#include "dispatch/dense_fwd_launch.cuh"
#include "dispatch/dense_fwd_sm90_launch.cuh"

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

// Hopper path, 128 keys per block, 2 K/V stages (a third measured within the noise at head dim
// 64 and does not fit at 128 beside the two Q buffers and the output staging), tiles in snake
// order (+35% at S=1024 causal). Head dim 128: 128 query rows per tile (2 consumer warpgroups;
// a third one's accumulators do not fit), the next tile's first Q K^T issued with the last P V.
// Head dim 64, non-causal: 192 rows (3 consumer warpgroups, more warps to hide the softmax's
// latency; at or below 128 rows' time in every paired seed measurement), without the tile
// overlap (with it the consumers need more than their 160 registers and spill). Head dim 64,
// causal: 128 rows with the overlap, 6-8% faster than 192 at S=1024 (finer tiles along the
// diagonal). bench/results/tuning.md has the numbers.
template <typename Elem, int kHeadDim, int kBlockM = 128>
using DenseFwdSm90Config =
    kernels::sm90::Config<typename CuteElem<Elem>::type, kHeadDim, /*kBlockN=*/128,
                          /*kStages=*/2, /*kPingPong=*/false,
                          /*kOverlapTiles=*/kBlockM == 128, kBlockM>;

template <typename Elem>
void dispatch_head_dim_sm90(const DenseFwdArgs& a, cudaStream_t stream) {
  if (a.head_dim == 128) return launch_dense_fwd_sm90<DenseFwdSm90Config<Elem, 128>>(a, stream);
  if (a.causal) return launch_dense_fwd_sm90<DenseFwdSm90Config<Elem, 64>>(a, stream);
  return launch_dense_fwd_sm90<DenseFwdSm90Config<Elem, 64, 192>>(a, stream);
}

// BSK_DENSE_PATH, read once.
DensePath env_path() {
  static const DensePath path = [] {
    const char* v = std::getenv("BSK_DENSE_PATH");
    if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return DensePath::kAuto;
    if (std::strcmp(v, "sm80") == 0) return DensePath::kSm80;
    if (std::strcmp(v, "sm90") == 0) return DensePath::kSm90;
    throw InvalidArgument("BSK_DENSE_PATH",
                          std::string("must be sm80, sm90 or auto, got '") + v + "'");
  }();
  return path;
}

std::atomic<DensePath> g_override{DensePath::kAuto};

// Automatic choice on a capable GPU: the sm90 kernel, measured faster than the sm80 one on every
// seed and long shape (1.25-1.84x on an H100, bench/results/tuning.md).
constexpr DensePath kAutoOnHopper = DensePath::kSm90;

}  // namespace

void set_dense_path_override(DensePath path) { g_override.store(path); }

bool dense_sm90_available(int device) {
#ifdef BSK_HAS_SM90A
  if (device_cc(device) != 90) return false;
  // The sm_90a machine code must be what the driver loaded: a plain sm_90 or PTX image would
  // hold the empty stand-in body (kernels/dense_fwd_sm90.cuh).
  static const bool loaded = [] {
    cudaFuncAttributes attr{};
    BSK_CUDA_CHECK(cudaFuncGetAttributes(
        &attr, kernels::sm90::dense_fwd_sm90_kernel<DenseFwdSm90Config<__half, 64>>));
    return attr.binaryVersion == 90;
  }();
  return loaded;
#else
  (void)device;
  return false;
#endif
}

bool hopper_path_selected(int device) {
  DensePath path = g_override.load();
  if (path == DensePath::kAuto) path = env_path();
  if (path == DensePath::kAuto) path = kAutoOnHopper;
  return path == DensePath::kSm90 && dense_sm90_available(device);
}

void dense_fwd_cuda(const DenseFwdArgs& a, int device, cudaStream_t stream) {
  const int cc = device_cc(device);
  if (cc < 80)
    throw Unsupported("dense attention needs a GPU of compute capability 8.0 or newer; cuda:" +
                      std::to_string(device) + " is " + std::to_string(cc / 10) + "." +
                      std::to_string(cc % 10));
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16)
    throw InvalidArgument("q", std::string("dtype must be float16 or bfloat16 on CUDA, got ") +
                                   dtype_name(a.dtype));
  if (a.head_dim != 64 && a.head_dim != 128)
    throw InvalidArgument("q", "head dim must be 64 or 128 on CUDA, got " +
                                   std::to_string(a.head_dim));
  const bool sm90 = hopper_path_selected(device) && sm90_supports(a);
  if (a.dtype == DType::kFloat16)
    return sm90 ? dispatch_head_dim_sm90<__half>(a, stream) : dispatch_head_dim<__half>(a, stream);
  return sm90 ? dispatch_head_dim_sm90<__nv_bfloat16>(a, stream)
              : dispatch_head_dim<__nv_bfloat16>(a, stream);
}

}  // namespace bsk::detail
