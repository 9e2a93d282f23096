#include "bsk/sparsek.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "api/validate.h"
#include "bsk/error.h"
#include "bsk/reference.h"
#include "common/cuda_check.h"
#include "dispatch/attention_bwd.h"
#include "dispatch/sparsek_fwd.h"

namespace bsk {
namespace {
constexpr int64_t kMaxCudaLength = 2147483647;

// k, w, gate, and the scores' rank, dtype, device and shape.
void check_sparsek_args(const detail::AttnShape& s, const TensorView& q, const TensorView& u,
                        const SparseKParams& params) {
  if (params.k < 0)
    throw InvalidArgument("k", "selection budget must be >= 0, got " + std::to_string(params.k));
  if (params.w < 0)
    throw InvalidArgument("w", "window must be >= 0, got " + std::to_string(params.w));
  if (params.k == 0 && params.w == 0)
    throw InvalidArgument("k", "k == 0 together with w == 0 leaves no key to attend");
  if (params.gate != Gate::kKeyValue && params.gate != Gate::kValue && params.gate != Gate::kNone)
    throw InvalidArgument("gate", "must be key_value, value or none");

  if (u.ndim != 3)
    throw InvalidArgument("u", "must be a 3-D tensor [B, Hkv, Skv], got " +
                                   std::to_string(u.ndim) + "-D");
  if (u.dtype != DType::kFloat32)
    throw InvalidArgument("u", std::string("dtype must be float32, got ") + dtype_name(u.dtype));
  if (u.device.type != q.device.type || u.device.index != q.device.index)
    throw InvalidArgument("u", "must be on the same device as q");
  if (u.shape[0] != s.batch || u.shape[1] != s.heads_kv || u.shape[2] != s.seqlen_k)
    throw InvalidArgument("u", "must have shape [B, Hkv, Skv] = [" + std::to_string(s.batch) +
                                   ", " + std::to_string(s.heads_kv) + ", " +
                                   std::to_string(s.seqlen_k) + "]");
  for (int i = 0; i < 3; ++i)
    if (u.stride[i] < 0) throw InvalidArgument("u", "strides must be non-negative");
  if (u.numel() > 0 && u.data == nullptr) throw InvalidArgument("u", "data pointer is null");
}

// The CUDA limits on top of check_sparsek_args.
void check_sparsek_cuda_limits(const detail::AttnShape& s, const SparseKParams& params) {
  if (params.k > kMaxCudaLength || params.w > kMaxCudaLength)
    throw InvalidArgument(params.k > kMaxCudaLength ? "k" : "w",
                          "must be < 2^31 on CUDA (larger values select the same keys as Skv)");
  if (s.batch * s.heads_kv * s.seqlen_k > kMaxCudaLength)
    throw InvalidArgument("u", "B * Hkv * Skv must be < 2^31 on CUDA");
}

// Every score finite (CPU tensors; the CUDA path checks on the device).
void check_scores_finite_cpu(const TensorView& u) {
  const float* ud = static_cast<const float*>(u.data);
  for (int64_t b = 0; b < u.shape[0]; ++b)
    for (int64_t h = 0; h < u.shape[1]; ++h)
      for (int64_t j = 0; j < u.shape[2]; ++j) {
        const float x = ud[b * u.stride[0] + h * u.stride[1] + j * u.stride[2]];
        if (!std::isfinite(x))
          throw InvalidArgument("u", "scores must be finite (no NaN or inf); u[" +
                                         std::to_string(b) + ", " + std::to_string(h) + ", " +
                                         std::to_string(j) + "] is " + std::to_string(x));
      }
}
}  // namespace

const char* gate_name(Gate gate) {
  switch (gate) {
    case Gate::kKeyValue: return "key_value";
    case Gate::kValue: return "value";
    case Gate::kNone: return "none";
  }
  return "unknown";
}

void sparsek_attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& u, const TensorView& out, const TensorView* lse,
                               const SparseKParams& params, Stream stream) {
  const detail::AttnShape s = detail::check_attention_args(q, k, v, out, lse);

  check_sparsek_args(s, q, u, params);
  detail::check_disjoint(out, "out", u, "u");
  if (lse) detail::check_disjoint(*lse, "lse", u, "u");

  SparseKParams p = params;
  p.softmax_scale = detail::resolve_softmax_scale(params.softmax_scale, s.head_dim, q.device);

  if (q.device.type == DeviceType::kCUDA) {
    check_sparsek_cuda_limits(s, params);
    detail::check_cuda_device(q.device, "q");
    detail::DeviceGuard guard(q.device.index);
    detail::check_cuda_pointers(q, k, v, out, lse);
    detail::check_cuda_pointer(u, "u");
    if (s.batch == 0 || s.seqlen_q == 0 || s.heads_q == 0) return;
    detail::SparseKFwdArgs a{};
    a.attn = detail::make_fwd_args(q, k, v, out, lse, static_cast<float>(*p.softmax_scale),
                                   /*causal=*/true);
    a.u = static_cast<const float*>(u.data);
    for (int i = 0; i < 3; ++i) a.u_stride[i] = u.stride[i];
    // k beyond Skv selects every candidate, as k = Skv does.
    a.budget = static_cast<int>(std::min<int64_t>(params.k, s.seqlen_k));
    a.window = static_cast<int>(std::min<int64_t>(params.w, s.seqlen_k));
    a.gate = params.gate;
    detail::sparsek_fwd_cuda(a, q.device.index, stream);
    return;
  }

  check_scores_finite_cpu(u);
  ref::sparsek_attention_forward(q, k, v, u, out, lse, p);
}

void sparsek_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& u, const TensorView& out, const TensorView& lse,
                                const TensorView& dout, const TensorView* dlse,
                                const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                const TensorView& du, const SparseKParams& params,
                                Stream stream) {
  const detail::AttnShape s = detail::check_attention_args(q, k, v, out, &lse);
  check_sparsek_args(s, q, u, params);
  detail::check_backward_args(q, k, v, out, lse, dout, dlse, dq, dk, dv, &u, &du);

  SparseKParams p = params;
  p.softmax_scale = detail::resolve_softmax_scale(params.softmax_scale, s.head_dim, q.device);
  if (q.device.type == DeviceType::kCPU) {
    check_scores_finite_cpu(u);
    ref::sparsek_attention_backward(q, k, v, u, dout, dlse, dq, dk, dv, du, p);
    return;
  }
  check_sparsek_cuda_limits(s, params);
  detail::check_cuda_device(q.device, "q");
  detail::DeviceGuard guard(q.device.index);
  detail::check_cuda_pointers(q, k, v, out, &lse);
  for (const auto& [t, name] : {std::pair{&u, "u"}, {&dout, "dout"}, {&dq, "dq"}, {&dk, "dk"},
                                {&dv, "dv"}, {&du, "du"}, {dlse, "dlse"}})
    if (t) detail::check_cuda_pointer(*t, name);
  if (s.batch == 0 || s.heads_q == 0) return;
  detail::AttentionBwdArgs a = detail::make_bwd_args(
      q, k, v, out, lse, dout, dlse, dq, dk, dv, static_cast<float>(*p.softmax_scale), true);
  a.sparse = true;
  a.u = static_cast<const float*>(u.data);
  a.du = static_cast<float*>(du.data);
  for (int i = 0; i < 3; ++i) a.u_stride[i] = u.stride[i], a.du_stride[i] = du.stride[i];
  a.budget = static_cast<int>(std::min<int64_t>(params.k, s.seqlen_k));
  a.window = static_cast<int>(std::min<int64_t>(params.w, s.seqlen_k));
  a.gate = params.gate;
  detail::attention_bwd_cuda(a, q.device.index, stream);
}

}  // namespace bsk
