// Scores as unsigned integers that sort like the floats (used by the SparseK selection and cache).
#pragma once

#include <cstdint>

namespace bsk::kernels::sparsek {

// Order-preserving unsigned code of a float (-0 counts as +0: the spec compares values).
__device__ __forceinline__ uint32_t order_code(float x) {
  const uint32_t b = __float_as_uint(x + 0.0f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float from_order_code(uint32_t c) {
  return __uint_as_float((c & 0x80000000u) ? (c & 0x7fffffffu) : ~c);
}

}  // namespace bsk::kernels::sparsek
