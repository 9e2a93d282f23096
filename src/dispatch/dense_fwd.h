// What the dense-forward dispatcher receives once the front door has validated everything:
// raw pointers and element strides, sizes, the resolved scale.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "bsk/tensor.h"

namespace bsk::detail {

struct DenseFwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // may be null
  // Element strides of the batch, sequence and head dims (the head dim is contiguous).
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], lse_stride[3];
  int batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
  float softmax_scale;
  bool causal;
  DType dtype;
};

// Pointers, element strides and sizes of validated views (lse may be null).
DenseFwdArgs make_fwd_args(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& out, const TensorView* lse, float softmax_scale,
                           bool causal);

// Picks the kernel for (arch, dtype, head dim) and launches it on `stream`.
void dense_fwd_cuda(const DenseFwdArgs& args, int device, cudaStream_t stream);

}  // namespace bsk::detail
