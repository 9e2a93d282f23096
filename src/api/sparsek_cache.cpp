// Front doors of the SparseK decoding cache: every rule checked here, then the CPU
// implementation (reference/sparsek_cache_ref.cpp) or the CUDA kernels (dispatch/decode.h).
#include "bsk/sparsek_cache.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "api/validate.h"
#include "bsk/error.h"
#include "bsk/reference.h"
#include "common/cuda_check.h"
#include "dispatch/decode.h"

namespace bsk {
namespace {

using detail::shape_str;

void expect(const TensorView& t, const char* name, DType dtype, std::vector<int64_t> shape,
            const TensorView& ref) {
  if (t.device.type != ref.device.type || t.device.index != ref.device.index)
    throw InvalidArgument(name, "must be on the device of the cache's k");
  if (t.dtype != dtype)
    throw InvalidArgument(name, std::string("dtype must be ") + dtype_name(dtype) + ", got " +
                                    dtype_name(t.dtype));
  bool ok = t.ndim == static_cast<int>(shape.size());
  for (int i = 0; ok && i < t.ndim; ++i) ok = t.shape[i] == shape[i];
  if (!ok) {
    std::string want = "[";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    throw InvalidArgument(name, "must have shape " + want + "], got " + shape_str(t));
  }
  int64_t st = 1;  // contiguous: the kernels index the state directly
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] > 1 && t.stride[i] != st)
      throw InvalidArgument(name, "must be contiguous (a cache state tensor), got strides that "
                                  "are not row-major");
    st *= t.shape[i];
  }
  if (t.numel() > 0 && t.data == nullptr) throw InvalidArgument(name, "data pointer is null");
}

// The cache's own consistency; returns B, Hkv, rows, D.
struct Dims {
  int64_t B, H, R, D, C;
};
Dims check_cache(const SparseKCache& c) {
  if (c.budget < 0) throw InvalidArgument("k", "budget must be >= 0, got " + std::to_string(c.budget));
  if (c.window < 0) throw InvalidArgument("w", "window must be >= 0, got " + std::to_string(c.window));
  if (c.budget == 0 && c.window == 0)
    throw InvalidArgument("k", "k == 0 together with w == 0 leaves no key to attend");
  if (c.gate != Gate::kKeyValue && c.gate != Gate::kValue && c.gate != Gate::kNone)
    throw InvalidArgument("gate", "must be key_value, value or none");
  if (c.k.ndim != 4)
    throw InvalidArgument("k_cache", "must be a 4-D tensor [B, Hkv, w + k, D], got " + shape_str(c.k));
  const Dims d{c.k.shape[0], c.k.shape[1], c.k.shape[2], c.k.shape[3], c.cand_u.ndim == 3 ? c.cand_u.shape[2] : -1};
  const bool cuda = c.k.device.type == DeviceType::kCUDA;
  if (cuda && c.k.dtype != DType::kFloat16 && c.k.dtype != DType::kBFloat16)
    throw InvalidArgument("k_cache", std::string("dtype must be float16 or bfloat16 on CUDA, got ") +
                                         dtype_name(c.k.dtype));
  if (!cuda && c.k.dtype != DType::kFloat16 && c.k.dtype != DType::kBFloat16 &&
      c.k.dtype != DType::kFloat32 && c.k.dtype != DType::kFloat64)
    throw InvalidArgument("k_cache", std::string("dtype must be a float type, got ") + dtype_name(c.k.dtype));
  if (d.R != c.window + c.budget)
    throw InvalidArgument("k_cache", "dim 2 must be w + k = " + std::to_string(c.window + c.budget) +
                                         ", got " + std::to_string(d.R));
  if (cuda && d.D != 64 && d.D != 128)
    throw InvalidArgument("k_cache", "head dim must be 64 or 128 on CUDA, got " + std::to_string(d.D));
  if (d.H <= 0 || d.D <= 0) throw InvalidArgument("k_cache", "Hkv and D must be positive");
  if (d.C < 0) throw InvalidArgument("cand_u", "must be a 3-D tensor [B, Hkv, C], got " + shape_str(c.cand_u));
  if (c.budget > 0 && d.C < c.budget)
    throw InvalidArgument("cand_u", "score capacity (dim 2) must be >= k = " +
                                        std::to_string(c.budget) + ", got " + std::to_string(d.C));
  if (cuda && (d.R > (1 << 30) || d.C > (1 << 30) || d.B * d.H > (1 << 30)))
    throw InvalidArgument("k_cache", "sizes must be < 2^30 on CUDA");
  expect(c.k, "k_cache", c.k.dtype, {d.B, d.H, d.R, d.D}, c.k);
  expect(c.v, "v_cache", c.k.dtype, {d.B, d.H, d.R, d.D}, c.k);
  expect(c.slot_u, "slot_u", DType::kFloat32, {d.B, d.H, d.R}, c.k);
  expect(c.cand_u, "cand_u", DType::kFloat32, {d.B, d.H, d.C}, c.k);
  expect(c.cand_pos, "cand_pos", DType::kInt32, {d.B, d.H, d.C}, c.k);
  expect(c.cand_row, "cand_row", DType::kInt32, {d.B, d.H, d.C}, c.k);
  expect(c.tau, "tau", DType::kFloat64, {d.B, d.H}, c.k);
  expect(c.counts, "counts", DType::kInt32, {d.B, d.H, 3}, c.k);
  expect(c.status, "status", DType::kInt32, {2}, c.k);
  if (cuda) {
    detail::check_cuda_device(c.k.device, "k_cache");
    const TensorView* all[] = {&c.k, &c.v, &c.slot_u, &c.cand_u, &c.cand_pos, &c.cand_row,
                               &c.tau, &c.counts, &c.status};
    const char* names[] = {"k_cache", "v_cache", "slot_u", "cand_u", "cand_pos", "cand_row",
                           "tau", "counts", "status"};
    for (int i = 0; i < 9; ++i)
      if (reinterpret_cast<std::uintptr_t>(all[i]->data) % 16 != 0)
        throw InvalidArgument(names[i], "data must be 16-byte aligned");
  }
  return d;
}

// k/v given as [B, S, Hkv, D] (BSHD) for the cache's B, Hkv, D.
void check_kv_input(const TensorView& t, const char* name, const SparseKCache& c, const Dims& d,
                    int64_t seqlen) {
  if (t.ndim != 4 || t.shape[0] != d.B || (seqlen >= 0 && t.shape[1] != seqlen) ||
      t.shape[2] != d.H || t.shape[3] != d.D)
    throw InvalidArgument(name, "must have shape [B, " + (seqlen >= 0 ? std::to_string(seqlen) : std::string("L")) +
                                    ", Hkv, D] = [" + std::to_string(d.B) + ", " +
                                    (seqlen >= 0 ? std::to_string(seqlen) : std::string("L")) + ", " +
                                    std::to_string(d.H) + ", " + std::to_string(d.D) +
                                    "], got " + shape_str(t));
  if (t.device.type != c.k.device.type || t.device.index != c.k.device.index)
    throw InvalidArgument(name, "must be on the cache's device");
  if (t.dtype != c.k.dtype)
    throw InvalidArgument(name, std::string("must have the cache's dtype (") +
                                    dtype_name(c.k.dtype) + "), got " + dtype_name(t.dtype));
  for (int i = 0; i < 4; ++i)
    if (t.stride[i] < 0) throw InvalidArgument(name, "strides must be non-negative");
  if (t.shape[3] > 1 && t.stride[3] != 1)
    throw InvalidArgument(name, "the last dim (head dim) must be contiguous");
  if (t.numel() > 0 && t.data == nullptr) throw InvalidArgument(name, "data pointer is null");
  if (c.k.device.type == DeviceType::kCUDA) detail::check_cuda_vector_layout(t, name);
}

void check_scores(const TensorView& u, const char* name, const SparseKCache& c, const Dims& d,
                  int64_t seqlen) {
  if (u.ndim != 3 || u.shape[0] != d.B || u.shape[1] != d.H || u.shape[2] != seqlen)
    throw InvalidArgument(name, "must have shape [B, Hkv, " + std::to_string(seqlen) + "] = [" +
                                    std::to_string(d.B) + ", " + std::to_string(d.H) + ", " +
                                    std::to_string(seqlen) + "], got " + shape_str(u));
  if (u.dtype != DType::kFloat32)
    throw InvalidArgument(name, std::string("dtype must be float32, got ") + dtype_name(u.dtype));
  if (u.device.type != c.k.device.type || u.device.index != c.k.device.index)
    throw InvalidArgument(name, "must be on the cache's device");
  for (int i = 0; i < 3; ++i)
    if (u.stride[i] < 0) throw InvalidArgument(name, "strides must be non-negative");
  if (u.numel() > 0 && u.data == nullptr) throw InvalidArgument(name, "data pointer is null");
}

void check_state_disjoint(const SparseKCache& c, const TensorView& in, const char* name) {
  const TensorView* all[] = {&c.k, &c.v, &c.slot_u, &c.cand_u, &c.cand_pos, &c.cand_row,
                             &c.tau, &c.counts, &c.status};
  const char* names[] = {"k_cache", "v_cache", "slot_u", "cand_u", "cand_pos", "cand_row",
                         "tau", "counts", "status"};
  for (int i = 0; i < 9; ++i) detail::check_disjoint(*all[i], names[i], in, name);
}

// The cache's K (or V) as a BSHD view [B, rows, Hkv, D], for the attention checks.
TensorView as_bshd(const TensorView& t) {
  TensorView r = t;
  r.shape = {t.shape[0], t.shape[2], t.shape[1], t.shape[3]};
  r.stride = {t.stride[0], t.stride[2], t.stride[1], t.stride[3]};
  return r;
}

}  // namespace

int64_t SparseKCacheShapes::bytes_per_sequence_per_layer(DType kv_dtype) const {
  const int64_t H = kv[1], R = kv[2], D = kv[3], C = cand[2];
  return H * (2 * R * D * static_cast<int64_t>(dtype_size(kv_dtype)) + R * 4 + C * 12 + 8 + 12);
}

SparseKCacheShapes sparsek_cache_shapes(int64_t batch, int64_t heads_kv, int64_t head_dim,
                                        int64_t budget, int64_t window, int64_t score_capacity) {
  if (batch < 0 || heads_kv <= 0 || head_dim <= 0)
    throw InvalidArgument("batch", "batch must be >= 0 and heads_kv, head_dim > 0");
  if (budget < 0) throw InvalidArgument("k", "budget must be >= 0");
  if (window < 0) throw InvalidArgument("w", "window must be >= 0");
  if (score_capacity < budget)
    throw InvalidArgument("score_capacity", "must be >= k = " + std::to_string(budget));
  SparseKCacheShapes s;
  s.kv = {batch, heads_kv, window + budget, head_dim};
  s.slot_u = {batch, heads_kv, window + budget};
  s.cand = {batch, heads_kv, score_capacity};
  s.tau = {batch, heads_kv};
  s.counts = {batch, heads_kv, 3};
  s.status = {2};
  return s;
}

void sparsek_cache_validate(const SparseKCache& cache) { check_cache(cache); }

void sparsek_cache_prefill(const SparseKCache& cache, const TensorView& k, const TensorView& v,
                           const TensorView& u, const TensorView* lengths, Stream stream) {
  const Dims d = check_cache(cache);
  check_kv_input(k, "k", cache, d, -1);
  const int64_t L = k.shape[1];
  check_kv_input(v, "v", cache, d, L);
  check_scores(u, "u", cache, d, L);
  for (const TensorView* t : {&k, &v, &u}) check_state_disjoint(cache, *t, t == &k ? "k" : t == &v ? "v" : "u");
  const bool cuda = cache.k.device.type == DeviceType::kCUDA;
  if (cuda && L >= (int64_t{1} << 31) / std::max<int64_t>(1, d.B * d.H))
    throw InvalidArgument("k", "B * Hkv * L must be < 2^31 on CUDA");
  if (lengths != nullptr) {
    if (lengths->ndim != 1 || lengths->shape[0] != d.B || lengths->dtype != DType::kInt32)
      throw InvalidArgument("lengths", "must be an int32 tensor of shape [B] = [" +
                                           std::to_string(d.B) + "], got " + dtype_name(lengths->dtype) +
                                           " " + shape_str(*lengths));
    if (lengths->device.type != cache.k.device.type || lengths->device.index != cache.k.device.index)
      throw InvalidArgument("lengths", "must be on the cache's device");
    if (d.B > 1 && lengths->stride[0] != 1) throw InvalidArgument("lengths", "must be contiguous");
  }
  if (!cuda) {
    for (int64_t b = 0; b < d.B; ++b) {
      const int64_t Lb = lengths ? static_cast<const int32_t*>(lengths->data)[b] : L;
      if (Lb < 0 || Lb > L)
        throw InvalidArgument("lengths", "lengths[" + std::to_string(b) + "] = " +
                                             std::to_string(Lb) + " is outside [0, L = " +
                                             std::to_string(L) + "]");
      for (int64_t h = 0; h < d.H; ++h)
        for (int64_t j = 0; j < Lb; ++j) {
          const float x = static_cast<const float*>(u.data)[b * u.stride[0] + h * u.stride[1] + j * u.stride[2]];
          if (!std::isfinite(x))
            throw InvalidArgument("u", "scores must be finite (no NaN or inf); u[" +
                                           std::to_string(b) + ", " + std::to_string(h) + ", " +
                                           std::to_string(j) + "] is " + std::to_string(x));
        }
    }
    ref::sparsek_cache_prefill(cache, k, v, u, lengths);
    return;
  }
  detail::DeviceGuard guard(cache.k.device.index);
  detail::check_cuda_pointer(k, "k");
  detail::check_cuda_pointer(v, "v");
  detail::check_cuda_pointer(u, "u");
  if (lengths != nullptr && d.B > 0) {
    detail::check_cuda_pointer(*lengths, "lengths");
    std::vector<int32_t> host(static_cast<size_t>(d.B));
    BSK_CUDA_CHECK(cudaMemcpyAsync(host.data(), lengths->data, d.B * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, stream));
    BSK_CUDA_CHECK(cudaStreamSynchronize(stream));
    for (int64_t b = 0; b < d.B; ++b)
      if (host[b] < 0 || host[b] > L)
        throw InvalidArgument("lengths", "lengths[" + std::to_string(b) + "] = " +
                                             std::to_string(host[b]) + " is outside [0, L = " +
                                             std::to_string(L) + "]");
  }
  detail::sparsek_cache_prefill_cuda(cache, k, v, u, lengths, stream);
}

namespace {

void check_append(const SparseKCache& cache, const Dims& d, const TensorView& k_new,
                  const TensorView& v_new, const TensorView& u_new) {
  check_kv_input(k_new, "k_new", cache, d, 1);
  check_kv_input(v_new, "v_new", cache, d, 1);
  check_scores(u_new, "u_new", cache, d, 1);
  check_state_disjoint(cache, k_new, "k_new");
  check_state_disjoint(cache, v_new, "v_new");
  check_state_disjoint(cache, u_new, "u_new");
  if (cache.k.device.type == DeviceType::kCUDA) {
    detail::check_cuda_pointer(k_new, "k_new");
    detail::check_cuda_pointer(v_new, "v_new");
    detail::check_cuda_pointer(u_new, "u_new");
  }
}

// The attend's checks; the softmax scale it resolves.
double check_attend(const SparseKCache& cache, const Dims& d, const TensorView& q,
                    const TensorView& out, const TensorView* lse,
                    std::optional<double> softmax_scale) {
  const TensorView kb = as_bshd(cache.k), vb = as_bshd(cache.v);
  const detail::AttnShape s = detail::check_attention_args(q, kb, vb, out, lse);
  if (s.seqlen_q != 1)
    throw InvalidArgument("q", "must hold one position per sequence ([B, 1, Hq, D]), got Sq = " +
                                   std::to_string(s.seqlen_q));
  check_state_disjoint(cache, out, "out");
  if (lse) check_state_disjoint(cache, *lse, "lse");
  const double scale = detail::resolve_softmax_scale(softmax_scale, d.D, q.device);
  if (q.device.type == DeviceType::kCUDA) detail::check_cuda_pointers(q, kb, vb, out, lse);
  return scale;
}

detail::DecodeArgs decode_args(const SparseKCache& cache, const TensorView& q,
                               const TensorView& out, const TensorView* lse, double scale) {
  detail::DecodeArgs a = detail::make_decode_args(q, as_bshd(cache.k), as_bshd(cache.v), out, lse,
                                                  static_cast<float>(scale));
  a.cache = &cache;
  return a;
}

}  // namespace

void sparsek_cache_append(const SparseKCache& cache, const TensorView& k_new,
                          const TensorView& v_new, const TensorView& u_new, Stream stream) {
  const Dims d = check_cache(cache);
  if (cache.k.device.type != DeviceType::kCUDA) {
    check_append(cache, d, k_new, v_new, u_new);
    return ref::sparsek_cache_append(cache, k_new, v_new, u_new);
  }
  detail::DeviceGuard guard(cache.k.device.index);
  check_append(cache, d, k_new, v_new, u_new);
  detail::sparsek_cache_append_cuda(cache, k_new, v_new, u_new, stream);
}

void sparsek_cache_attend(const SparseKCache& cache, const TensorView& q, const TensorView& out,
                          const TensorView* lse, std::optional<double> softmax_scale,
                          Stream stream) {
  const Dims d = check_cache(cache);
  if (q.device.type != DeviceType::kCUDA) {
    const double scale = check_attend(cache, d, q, out, lse, softmax_scale);
    return ref::sparsek_cache_attend(cache, q, out, lse, scale);
  }
  detail::DeviceGuard guard(q.device.index);
  const double scale = check_attend(cache, d, q, out, lse, softmax_scale);
  detail::decode_attention_cuda(decode_args(cache, q, out, lse, scale), q.device.index, stream);
}

void sparsek_cache_step(const SparseKCache& cache, const TensorView& q, const TensorView& k_new,
                        const TensorView& v_new, const TensorView& u_new, const TensorView& out,
                        const TensorView* lse, std::optional<double> softmax_scale,
                        Stream stream) {
  const Dims d = check_cache(cache);
  // Everything is checked before anything runs: a bad argument leaves the cache unchanged.
  if (cache.k.device.type != DeviceType::kCUDA) {
    check_append(cache, d, k_new, v_new, u_new);
    const double scale = check_attend(cache, d, q, out, lse, softmax_scale);
    ref::sparsek_cache_append(cache, k_new, v_new, u_new);
    return ref::sparsek_cache_attend(cache, q, out, lse, scale);
  }
  detail::DeviceGuard guard(cache.k.device.index);
  check_append(cache, d, k_new, v_new, u_new);
  const double scale = check_attend(cache, d, q, out, lse, softmax_scale);
  detail::sparsek_cache_step_cuda(cache, k_new, v_new, u_new,
                                  decode_args(cache, q, out, lse, scale), cache.k.device.index,
                                  stream);
}

}  // namespace bsk
