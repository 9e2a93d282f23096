// What the SparseK-forward dispatcher receives once the front door has validated everything.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "bsk/sparsek.h"
#include "dispatch/dense_fwd.h"
#include "dispatch/sparsek_plan.h"

namespace bsk::detail {

struct SparseKFwdArgs {
  DenseFwdArgs attn;  // q, k, v, out, lse, sizes, scale (causal is implied)
  const float* u;     // [B, Hkv, Skv]
  int64_t u_stride[3];
  int budget, window;
  Gate gate;
};

// Validates the scores on the device (finite: one host synchronization, so a bad score is an
// error and never a silently wrong answer), selects, and runs the fused kernel on `stream`.
void sparsek_fwd_cuda(const SparseKFwdArgs& args, int device, cudaStream_t stream);

// The selection plan's view of the arguments (shared with the backward).
SparseKPlanArgs plan_args(const SparseKFwdArgs& a);

}  // namespace bsk::detail
