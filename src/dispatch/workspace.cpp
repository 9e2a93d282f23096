#include "dispatch/workspace.h"

#include <cstdint>
#include <mutex>
#include <vector>

namespace bsk::detail {

cudaMemPool_t workspace_pool(int device) {
  static std::mutex mu;
  static std::vector<cudaMemPool_t> pools;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(pools.size())) pools.resize(device + 1, nullptr);
  if (pools[device] == nullptr) {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t pool = nullptr;
    BSK_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
    uint64_t keep = kWorkspaceKeepBytes;
    BSK_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    pools[device] = pool;  // never destroyed: work queued at exit may still free into it
  }
  return pools[device];
}

}  // namespace bsk::detail
