// What the SparseK selection plan and the attention kernels agree on: which query positions
// share a key list, and how many candidates a query row has.
#pragma once

#include "kernels/order_code.cuh"

namespace bsk::kernels::sparsek {

// Query positions per key list: lists are built once per kListRows positions and shared by the
// attention blocks inside (fewer list builds; a block filters the few extra keys by its masks).
constexpr int kListRows = 128;

__host__ __device__ __forceinline__ int candidates_of_row(int t, int seqlen_q, int seqlen_k, int w) {
  const int i = seqlen_k - seqlen_q + t;  // absolute position
  return i < 0 ? 0 : max(0, i - w + 1);
}

}  // namespace bsk::kernels::sparsek
