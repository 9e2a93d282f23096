#include "bsk/attention.h"

#include "api/validate.h"
#include "bsk/reference.h"
#include "common/cuda_check.h"
#include "dispatch/attention_bwd.h"
#include "dispatch/decode.h"
#include "dispatch/dense_fwd.h"

namespace bsk {

bool head_dim_supported(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const TensorView* lse, const AttentionParams& params,
                       Stream stream) {
  const detail::AttnShape s = detail::check_attention_args(q, k, v, out, lse);
  AttentionParams p = params;
  p.softmax_scale = detail::resolve_softmax_scale(params.softmax_scale, s.head_dim, q.device);

  if (q.device.type == DeviceType::kCPU) {
    ref::attention_forward(q, k, v, out, lse, p);
    return;
  }
  detail::check_cuda_device(q.device, "q");
  // Switch first: the pointer checks are CUDA calls and must not touch another device.
  detail::DeviceGuard guard(q.device.index);
  detail::check_cuda_pointers(q, k, v, out, lse);
  if (s.batch == 0 || s.seqlen_q == 0 || s.heads_q == 0) return;

  // One query position per sequence (decoding): the split-rows decode kernel keeps every SM busy
  // where the prefill kernels would run one 128-row tile per (batch, head) at 1/128 occupancy.
  // Causal or not is the same here: bottom-right, the last query position sees every key.
  if (s.seqlen_q == 1) {
    const detail::DecodeArgs a = detail::make_decode_args(
        q, k, v, out, lse, static_cast<float>(*p.softmax_scale));
    detail::decode_attention_cuda(a, q.device.index, stream);
    return;
  }
  // softmax_scale is set and a normal float32 on CUDA: resolve_softmax_scale checked it.
  detail::dense_fwd_cuda(
      detail::make_fwd_args(q, k, v, out, lse, static_cast<float>(*p.softmax_scale), p.causal),
      q.device.index, stream);
}

void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& out, const TensorView& lse, const TensorView& dout,
                        const TensorView* dlse, const TensorView& dq, const TensorView& dk,
                        const TensorView& dv, const AttentionParams& params, Stream stream) {
  const detail::AttnShape s = detail::check_attention_args(q, k, v, out, &lse);
  detail::check_backward_args(q, k, v, out, lse, dout, dlse, dq, dk, dv, nullptr, nullptr);
  AttentionParams p = params;
  p.softmax_scale = detail::resolve_softmax_scale(params.softmax_scale, s.head_dim, q.device);
  if (q.device.type == DeviceType::kCPU) {
    ref::attention_backward(q, k, v, dout, dlse, dq, dk, dv, p);
    return;
  }
  detail::check_cuda_device(q.device, "q");
  detail::DeviceGuard guard(q.device.index);
  detail::check_cuda_pointers(q, k, v, out, &lse);
  for (const auto& [t, name] :
       {std::pair{&dout, "dout"}, {&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}, {dlse, "dlse"}})
    if (t) detail::check_cuda_pointer(*t, name);
  if (s.batch == 0 || s.heads_q == 0) return;
  detail::attention_bwd_cuda(
      detail::make_bwd_args(q, k, v, out, lse, dout, dlse, dq, dk, dv,
                            static_cast<float>(*p.softmax_scale), p.causal),
      q.device.index, stream);
}

namespace detail {

AttentionBwdArgs make_bwd_args(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const TensorView& lse,
                               const TensorView& dout, const TensorView* dlse,
                               const TensorView& dq, const TensorView& dk, const TensorView& dv,
                               float softmax_scale, bool causal) {
  AttentionBwdArgs a{};
  a.attn = make_fwd_args(q, k, v, out, &lse, softmax_scale, causal);
  if (dlse) {
    a.dlse = static_cast<const float*>(dlse->data);
    for (int i = 0; i < 3; ++i) a.dlse_stride[i] = dlse->stride[i];
  }
  a.dout = dout.data, a.dq = dq.data, a.dk = dk.data, a.dv = dv.data;
  for (int i = 0; i < 3; ++i) {
    a.dout_stride[i] = dout.stride[i];
    a.dq_stride[i] = dq.stride[i];
    a.dk_stride[i] = dk.stride[i];
    a.dv_stride[i] = dv.stride[i];
  }
  return a;
}

void check_backward_args(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const TensorView& lse, const TensorView& dout,
                         const TensorView* dlse, const TensorView& dq, const TensorView& dk,
                         const TensorView& dv, const TensorView* u, const TensorView* du) {
  check_like(dout, "dout", out, "out", false);
  if (dlse) check_like(*dlse, "dlse", lse, "lse", false);
  check_like(dq, "dq", q, "q", true);
  check_like(dk, "dk", k, "k", true);
  check_like(dv, "dv", v, "v", true);
  if (du) check_like(*du, "du", *u, "u", true);
  const TensorView* inputs[] = {&q, &k, &v, &out, &lse, &dout, u, dlse};
  const char* in_names[] = {"q", "k", "v", "out", "lse", "dout", "u", "dlse"};
  const TensorView* outputs[] = {&dq, &dk, &dv, du};
  const char* out_names[] = {"dq", "dk", "dv", "du"};
  for (int o = 0; o < 4; ++o) {
    if (!outputs[o]) continue;
    for (int i = 0; i < 8; ++i)
      if (inputs[i]) check_disjoint(*outputs[o], out_names[o], *inputs[i], in_names[i]);
    for (int o2 = 0; o2 < o; ++o2)
      if (outputs[o2]) check_disjoint(*outputs[o], out_names[o], *outputs[o2], out_names[o2]);
  }
}

DenseFwdArgs make_fwd_args(const TensorView& q, const TensorView& k, const TensorView& v,
                           const TensorView& out, const TensorView* lse, float softmax_scale,
                           bool causal) {
  DenseFwdArgs a{};
  a.q = q.data;
  a.k = k.data;
  a.v = v.data;
  a.out = out.data;
  a.lse = lse ? static_cast<float*>(lse->data) : nullptr;
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride[i];
    a.k_stride[i] = k.stride[i];
    a.v_stride[i] = v.stride[i];
    a.out_stride[i] = out.stride[i];
    a.lse_stride[i] = lse ? lse->stride[i] : 0;
  }
  a.batch = static_cast<int>(q.shape[0]);
  a.seqlen_q = static_cast<int>(q.shape[1]);
  a.seqlen_k = static_cast<int>(k.shape[1]);
  a.heads_q = static_cast<int>(q.shape[2]);
  a.heads_kv = static_cast<int>(k.shape[2]);
  a.head_dim = static_cast<int>(q.shape[3]);
  a.softmax_scale = softmax_scale;
  a.causal = causal;
  a.dtype = q.dtype;
  return a;
}

DecodeArgs make_decode_args(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& out, const TensorView* lse, float softmax_scale) {
  DecodeArgs a{};
  a.q = q.data, a.k = k.data, a.v = v.data, a.out = out.data;
  a.lse = lse ? static_cast<float*>(lse->data) : nullptr;
  a.q_stride[0] = q.stride[0], a.q_stride[1] = q.stride[2];
  a.k_stride[0] = k.stride[0], a.k_stride[1] = k.stride[1], a.k_stride[2] = k.stride[2];
  a.v_stride[0] = v.stride[0], a.v_stride[1] = v.stride[1], a.v_stride[2] = v.stride[2];
  a.out_stride[0] = out.stride[0], a.out_stride[1] = out.stride[2];
  if (lse) a.lse_stride[0] = lse->stride[0], a.lse_stride[1] = lse->stride[1];
  a.batch = static_cast<int>(q.shape[0]), a.heads_q = static_cast<int>(q.shape[2]);
  a.heads_kv = static_cast<int>(k.shape[2]), a.head_dim = static_cast<int>(q.shape[3]);
  a.rows_dense = static_cast<int>(k.shape[1]);
  a.softmax_scale = softmax_scale;
  a.dtype = q.dtype;
  return a;
}

}  // namespace detail
}  // namespace bsk
