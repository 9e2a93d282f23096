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

// Which dense-forward kernel family runs. kAuto: the Hopper (sm_90a, TMA + wgmma) kernel on a
// compute-capability-9.0 GPU when this binary carries its sm_90a machine code and TMA can
// describe the views, else the sm_80 kernel. The environment variable BSK_DENSE_PATH=sm80|sm90
// (read once) forces a family; a forced sm90 still falls back to sm80 where sm90 cannot run.
enum class DensePath { kAuto, kSm80, kSm90 };

// Test hook: overrides BSK_DENSE_PATH for this process; kAuto restores it. Not thread-safe
// against concurrent launches (tests switch it between cases).
void set_dense_path_override(DensePath path);

// Whether the sm90 kernel can run on `device` (cc 9.0 and sm_90a code in this binary).
bool dense_sm90_available(int device);

// Whether the Hopper kernel family runs on `device`: the path that BSK_DENSE_PATH or the test hook
// selects (automatic: Hopper on cc 9.0) and dense_sm90_available. The SparseK kernels follow it too.
bool hopper_path_selected(int device);

}  // namespace bsk::detail
