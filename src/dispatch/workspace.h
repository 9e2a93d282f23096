// Scratch memory for one call: one stream-ordered allocation (cudaMallocAsync, so repeated calls
// reuse the pool) carved into aligned pieces and freed on the stream when the call returns, also
// when an error unwinds.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#include "common/cuda_check.h"

namespace bsk::detail {

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
  void allocate() { BSK_CUDA_CHECK(cudaMallocAsync(&base_, size_ ? size_ : 256, stream_)); }
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
