// Scratch memory for one call: one stream-ordered allocation carved into aligned pieces and freed
// on the stream when the call returns, also when an error unwinds. Nothing is allocated for a
// call that reserved nothing.
//
// The allocation comes from libbsk's own memory pool on the stream's device (workspace_pool), not
// the device's default pool: the default pool's release threshold is 0, so every synchronize hands
// its memory back and the next call maps it again (measured on an H100: an S=1 dense call spent
// ~80 us in cudaMallocAsync after an idle sync). Ours keeps up to kWorkspaceKeepBytes between
// calls, as PyTorch's caching allocator would. Under stream capture the allocation becomes a
// graph memory node, as with cudaMallocAsync.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "common/cuda_check.h"

namespace bsk::detail {

// Bytes the pool keeps mapped across synchronizations (more is released at the next one).
constexpr size_t kWorkspaceKeepBytes = size_t(256) << 20;

// libbsk's memory pool on `device` (created on first use, alive for the process).
cudaMemPool_t workspace_pool(int device);

class Workspace {
 public:
  explicit Workspace(cudaStream_t stream) : stream_(stream) {}
  ~Workspace() {
    if (base_ != nullptr) cudaFreeAsync(base_, stream_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  // Reserves bytes; pointers are valid after allocate().
  size_t reserve(size_t bytes) {
    const size_t off = size_;
    size_ += (bytes + 255) / 256 * 256;
    return off;
  }
  // On the current device (the front doors make the tensors' device current).
  void allocate() {
    if (size_ == 0) return;
    int device = 0;
    BSK_CUDA_CHECK(cudaGetDevice(&device));
    BSK_CUDA_CHECK(cudaMallocFromPoolAsync(&base_, size_, workspace_pool(device), stream_));
  }
  template <typename T>
  T* at(size_t off) const {
    return reinterpret_cast<T*>(static_cast<char*>(base_) + off);
  }

 private:
  cudaStream_t stream_;
  void* base_ = nullptr;
  size_t size_ = 0;
};

}  // namespace bsk::detail
