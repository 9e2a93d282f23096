#include "bsk/tensor.h"

#include "bsk/error.h"

namespace bsk {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kInt64: return "int64";
    case DType::kInt32: return "int32";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kFloat64:
    case DType::kInt64: return 8;
  }
  return 0;
}

TensorView make_view(void* data, DType dtype, Device device, std::initializer_list<int64_t> shape,
                     std::initializer_list<int64_t> strides) {
  if (shape.size() > static_cast<std::size_t>(kMaxDims))
    throw InvalidArgument("shape", "at most 4 dimensions are supported");
  if (strides.size() != 0 && strides.size() != shape.size())
    throw InvalidArgument("strides", "must be empty or have one entry per dimension");
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  if (strides.size() == 0) {
    int64_t st = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      t.stride[d] = st;
      st *= t.shape[d];
    }
  } else {
    i = 0;
    for (int64_t s : strides) t.stride[i++] = s;
  }
  return t;
}

}  // namespace bsk
