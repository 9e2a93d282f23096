#include "common/cuda_check.h"

#include <mutex>
#include <string>
#include <vector>

#include "bsk/error.h"

namespace bsk::detail {

void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  throw CudaError(std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ") in " +
                  what + " at " + file + ":" + std::to_string(line));
}

DeviceGuard::DeviceGuard(int device) {
  BSK_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) BSK_CUDA_CHECK(cudaSetDevice(device));
}

namespace {

// Whether `device`'s primary context exists. cudaSetDevice creates one (CUDA 12+), so restoring
// a device the process never used would cost it a context of a few hundred MB. The runtime has
// no query for this; the driver's cuDevicePrimaryCtxGetState does.
bool primary_context_active(int device) {
  using GetState = int (*)(int, unsigned int*, int*);
  static const GetState get_state = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuDevicePrimaryCtxGetState", &fn, 12000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<GetState>(fn);
  }();
  if (get_state == nullptr) return true;  // cannot tell: restore, as before
  unsigned int flags = 0;
  int active = 0;
  return get_state(device, &flags, &active) == 0 && active != 0;
}

}  // namespace

// Restores the previous device only where that costs no new context (as PyTorch does).
DeviceGuard::~DeviceGuard() {
  int now = -1;
  if (cudaGetDevice(&now) == cudaSuccess && now != previous_ && primary_context_active(previous_))
    cudaSetDevice(previous_);
}

namespace {
// One cached device attribute per device (queried once; CUDA calls cost host time per launch).
int cached_attribute(cudaDeviceAttr attr, int device, std::vector<int>& cache) {
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, -1);
  if (cache[device] < 0) {
    int value = 0;
    BSK_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
    cache[device] = value;
  }
  return cache[device];
}
}  // namespace

int device_cc(int device) {
  static std::mutex mu;
  static std::vector<int> major, minor;
  std::lock_guard<std::mutex> lock(mu);
  return 10 * cached_attribute(cudaDevAttrComputeCapabilityMajor, device, major) +
         cached_attribute(cudaDevAttrComputeCapabilityMinor, device, minor);
}

int device_sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  return cached_attribute(cudaDevAttrMultiProcessorCount, device, cache);
}

}  // namespace bsk::detail
