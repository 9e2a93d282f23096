// Tensor descriptions passed across the libbsk API: a pointer, a dtype, a device and
// shape/strides in elements. libbsk never owns memory; the caller keeps it alive until the
// work queued on the given stream has finished.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

// The CUDA runtime's stream type (cudaStream_t is CUstream_st*), declared at global scope so that
// bsk::Stream is that very type whether or not a CUDA header was included first.
struct CUstream_st;

namespace bsk {

enum class DType : int { kFloat16, kBFloat16, kFloat32, kFloat64, kInt64, kInt32 };
enum class DeviceType : int { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
};

// Same type as cudaStream_t, spelled without pulling CUDA headers into user code.
using Stream = ::CUstream_st*;

inline constexpr int kMaxDims = 4;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device{};
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> stride{};  // in elements, not bytes

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
};

const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);

// A view with the given shape; row-major contiguous strides unless `strides` is given.
TensorView make_view(void* data, DType dtype, Device device, std::initializer_list<int64_t> shape,
                     std::initializer_list<int64_t> strides = {});

}  // namespace bsk
