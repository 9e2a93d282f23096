// What the backward dispatcher receives once the front door has validated everything.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "bsk/sparsek.h"
#include "dispatch/dense_fwd.h"

namespace bsk::detail {

struct AttentionBwdArgs {
  DenseFwdArgs attn;  // q, k, v, out, lse (required), sizes, scale, causal
  const void* dout;
  const float* dlse;  // [B, Hq, Sq] or null
  int64_t dlse_stride[3];
  void* dq;
  void* dk;
  void* dv;
  int64_t dout_stride[3], dq_stride[3], dk_stride[3], dv_stride[3];
  bool sparse;  // SparseK (always causal); the fields below only then
  const float* u;
  int64_t u_stride[3];
  float* du;
  int64_t du_stride[3];
  int budget, window;  // clamped to Skv
  Gate gate;
};

// Pointers and strides of validated views (the SparseK fields are left for the caller).
AttentionBwdArgs make_bwd_args(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const TensorView& lse,
                               const TensorView& dout, const TensorView* dlse,
                               const TensorView& dq, const TensorView& dk, const TensorView& dv,
                               float softmax_scale, bool causal);

// dout like out, dq/dk/dv like q/k/v (and du like u for SparseK): shapes, dtypes, devices, layout;
// no gradient aliasing an input or another gradient.
void check_backward_args(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const TensorView& lse, const TensorView& dout,
                         const TensorView* dlse, const TensorView& dq, const TensorView& dk,
                         const TensorView& dv, const TensorView* u, const TensorView* du);

// Dense or SparseK backward on `stream` (SparseK: one synchronization, for the score checks).
// Deterministic: no float atomics.
void attention_bwd_cuda(const AttentionBwdArgs& args, int device, cudaStream_t stream);

}  // namespace bsk::detail
