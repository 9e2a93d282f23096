// Every CUDA runtime call and launch in libbsk goes through these: a failure becomes a
// bsk::CudaError naming the call, never a silently wrong result.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace bsk::detail {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line);

// Makes `device` current for the lifetime of the guard; afterwards restores the previous one if
// that device already has a context.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Compute capability of `device` as 10*major + minor (cached per device).
int device_cc(int device);

// Number of SMs of `device` (cached per device: launches size their grids by it every call).
int device_sm_count(int device);

// Blocks for a grid-stride loop over n items: at least 1, at most 65535.
inline int grid_1d(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

}  // namespace bsk::detail

#define BSK_CUDA_CHECK(expr)                                                     \
  do {                                                                           \
    cudaError_t bsk_err_ = (expr);                                               \
    if (bsk_err_ != cudaSuccess)                                                 \
      ::bsk::detail::throw_cuda_error(bsk_err_, #expr, __FILE__, __LINE__);      \
  } while (0)

// After a <<<>>> launch: catches bad configurations and launch failures without syncing.
#define BSK_CUDA_CHECK_LAUNCH() BSK_CUDA_CHECK(cudaGetLastError())
