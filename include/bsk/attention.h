// Dense attention forward: the front door. Validates every argument, then runs on the device
// the tensors live on (CUDA: tensor-core kernels; CPU: the float64-accumulating reference).
#pragma once

#include <optional>

#include "bsk/tensor.h"

namespace bsk {

struct AttentionParams {
  // Causal masking, bottom-right aligned: query row t sees keys j <= t + (Skv - Sq), as in
  // FlashAttention. Rows that see no key (causal with Sq > Skv, or Skv == 0) get output 0 and
  // lse -inf.
  bool causal = false;
  // Multiplies q.k before the softmax; std::nullopt means 1/sqrt(head_dim). Must be finite and
  // > 0. The CPU reference uses it as given (double); the CUDA kernels take it as float32, so on
  // CUDA it must also be a normal float32 (between about 1.2e-38 and 3.4e38).
  std::optional<double> softmax_scale;
};

// q: [B, Sq, Hq, D]; k, v: [B, Skv, Hkv, D]; out: [B, Sq, Hq, D] (BSHD, any strides with the last
// dimension contiguous). Hq % Hkv == 0 (GQA/MQA). dtype float16 or bfloat16 on CUDA (float32 and
// float64 also accepted on CPU); q, k, v and out share it. D in {64, 128} on CUDA, 1..1024 on
// CPU. out may be q itself but must not overlap k, v or lse.
// lse: optional (nullptr to skip), float32 [B, Hq, Sq], natural log of the softmax denominator.
// CUDA work is queued on `stream` and not waited for.
// Scratch memory (any op that needs it) comes stream-ordered from a memory pool libbsk creates
// per device and keeps for the process, holding up to 256 MiB mapped between calls (the device's
// default pool unmaps at every synchronize; mapping again cost ~80 us per call on an H100).
void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const TensorView* lse, const AttentionParams& params,
                       Stream stream = nullptr);

// Gradients of attention_forward: dq, dk, dv (shaped and typed like q, k, v; dk/dv sum over the
// query heads of each KV head) from dout (like out) and, optionally, dlse (the gradient of lse,
// float32 [B, Hq, Sq]; null for none), with the forward's out and lse (required).
// CPU tensors run the float64 reference (out and lse are checked, not used). CUDA: the sm_80
// tensor-core kernels (every GPU of compute capability 8.0 or newer), deterministic (bitwise
// equal gradients run to run: no float atomics), queued on `stream`.
void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& lse, const TensorView& dout,
                        const TensorView* dlse, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, const AttentionParams& params,
                        Stream stream = nullptr);

// Head dims the CUDA kernels are built for.
bool head_dim_supported(int64_t head_dim);

}  // namespace bsk
