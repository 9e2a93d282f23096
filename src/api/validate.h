// Precondition checks shared by the front doors. Each failure throws bsk::InvalidArgument naming
// the argument and the rule; nothing past these checks re-validates.
#pragma once

#include <cstdint>

#include "bsk/tensor.h"

namespace bsk::detail {

// Problem sizes read off validated q/k/v.
struct AttnShape {
  int64_t batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
};

// q/k/v/out (and lse when not null) for dense and SparseK attention: ranks, shapes, GQA, one
// dtype, one device, last dim contiguous, sizes in range. CUDA tensors must also be device
// memory, 16-byte aligned with row strides a multiple of 8 elements (the kernels load 16-byte
// vectors), and have a head dim the kernels are built for.
AttnShape check_attention_args(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const TensorView* lse);

// softmax_scale: finite; 0 selects 1/sqrt(head_dim). Returns the scale to use.
float resolve_softmax_scale(float softmax_scale, int64_t head_dim);

}  // namespace bsk::detail
