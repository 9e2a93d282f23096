// SparseK attention (arXiv:2406.16747) exactly as defined in docs/SPARSEK_SPEC.md: each query
// attends to a sliding window of w keys plus the k earlier keys with the largest learned,
// query-independent score u, soft-gated by the SPARSEK operator.
#pragma once

#include <optional>

#include "bsk/tensor.h"

namespace bsk {

enum class Gate : int {
  kKeyValue = 0,  // logits m*s, values m (the paper's form)
  kValue = 1,     // logits s, values m
  kNone = 2,      // hard top-k: logits s, values 1
};

const char* gate_name(Gate gate);

struct SparseKParams {
  int64_t k = 0;  // selection budget, >= 0
  int64_t w = 0;  // sliding window, >= 0; k == 0 && w == 0 is an error
  Gate gate = Gate::kKeyValue;
  // std::nullopt means 1/sqrt(head_dim); otherwise as bsk::AttentionParams::softmax_scale.
  std::optional<double> softmax_scale;
};

// q: [B, Sq, Hq, D]; k, v: [B, Skv, Hkv, D]; u: float32 [B, Hkv, Skv], finite;
// out: [B, Sq, Hq, D]; lse: optional float32 [B, Hq, Sq]. Always causal, bottom-right aligned.
// CPU tensors run the float64 reference. CUDA tensors (fp16/bf16, head dim 64/128, sm_80+) run
// the selection and the fused kernel on `stream`; the call synchronizes once with the stream to
// report bad scores as an error (non-finite; or, with gate kKeyValue or kValue and a selection to
// make, a (batch, KV head) whose scores span more than 2^20), and takes scratch memory from
// libbsk's stream-ordered pool (bsk/attention.h): about 40 bytes per score plus
// (min(k, Skv) + 128) * 4 bytes per 128 query positions per KV head.
void sparsek_attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& u, const TensorView& out, const TensorView* lse,
                               const SparseKParams& params, Stream stream = nullptr);

// Gradients of sparsek_attention_forward: dq, dk, dv (like q, k, v) and du (float32, like u)
// from dout (and dlse, the gradient of lse, or null), with the forward's out and lse. The selection is piecewise constant in u, so the
// gradient reaches u only through the soft gates, by the SPARSEK VJP of each row (spec); gate
// kNone gives du = 0. CPU: the float64 reference. CUDA: the selection is recomputed (one
// synchronization for the score checks, as in the forward), then deterministic sm_80 kernels
// on `stream`.
void sparsek_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& u, const TensorView& out, const TensorView& lse,
                                const TensorView& dout, const TensorView* dlse,
                                const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                const TensorView& du, const SparseKParams& params,
                                Stream stream = nullptr);

}  // namespace bsk
