// Precondition checks shared by the front doors. Each failure throws bsk::InvalidArgument naming
// the argument and the rule. check_attention_args makes no CUDA call, so it also runs (and its
// CUDA rules are testable) on a machine without a GPU.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "bsk/tensor.h"

namespace bsk::detail {

// "[2, 3, 4]": a view's shape for messages.
std::string shape_str(const TensorView& t);

// The CUDA kernels' 16-byte vector rule: a 16-byte aligned pointer and strides of dims 0-2 that
// are multiples of 8 elements (empty views pass).
void check_cuda_vector_layout(const TensorView& t, const char* name);

// Problem sizes read off validated q/k/v.
struct AttnShape {
  int64_t batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim;
};

// q/k/v/out (and lse when not null) for dense and SparseK attention: ranks, shapes, GQA, one
// dtype, one device, last dim contiguous, sizes in range, outputs not overlapping inputs. CUDA
// tensors must also be 16-byte aligned with row strides a multiple of 8 elements (the kernels
// load 16-byte vectors), have a head dim the kernels are built for, and fit the grid limits.
AttnShape check_attention_args(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const TensorView* lse);

// A tensor that must look like `like` (a gradient or dout): same rank, shape, dtype and device,
// non-negative strides, and for 4-D views a contiguous last dim (plus the 16-byte rule on CUDA).
// Outputs also must not alias themselves.
void check_like(const TensorView& t, const char* name, const TensorView& like,
                const char* like_name, bool output);

// The device exists (bsk::Unsupported where CUDA has no device or driver at all).
void check_cuda_device(const Device& device, const char* name);

// Every pointer is device memory on the tensor's device. Needs the device current (run it under
// DeviceGuard): a CUDA call may create a context on whichever device is current.
void check_cuda_pointer(const TensorView& t, const char* name);
void check_cuda_pointers(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const TensorView* lse);

// softmax_scale: finite and > 0; std::nullopt selects 1/sqrt(head_dim). On CUDA the kernels take
// it as float32, so it must also stay a normal float32 there (a tiny scale must not turn into 0 or
// a denormal and a huge one into inf). Returns the scale to use.
double resolve_softmax_scale(const std::optional<double>& softmax_scale, int64_t head_dim,
                             const Device& device);

// `out` (an output) must not share memory with `in` (an input): aliasing would let one write
// change what another part of the computation reads.
void check_disjoint(const TensorView& out, const char* out_name, const TensorView& in,
                    const char* in_name);

}  // namespace bsk::detail
