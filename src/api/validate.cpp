#include "api/validate.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <utility>

#include <cuda_runtime_api.h>

#include "bsk/attention.h"
#include "bsk/error.h"

namespace bsk::detail {
namespace {

// Shortest round-trip spelling: std::to_string would print 1e-45 as 0.000000.
std::string number_str(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

std::string device_str(const Device& d) {
  return d.type == DeviceType::kCUDA ? "cuda:" + std::to_string(d.index) : std::string("cpu");
}

void check_rank(const TensorView& t, const char* name, int ndim, const char* layout) {
  if (t.ndim != ndim)
    throw InvalidArgument(name, std::string("must be a ") + std::to_string(ndim) + "-D tensor " +
                                    layout + ", got " + std::to_string(t.ndim) + "-D " +
                                    shape_str(t));
  for (int i = 0; i < ndim; ++i) {
    if (t.shape[i] < 0)
      throw InvalidArgument(name, "sizes must be non-negative, got " + shape_str(t));
    if (t.stride[i] < 0)
      throw InvalidArgument(name, "strides must be non-negative (no flipped views), got stride " +
                                      std::to_string(t.stride[i]) + " in dim " + std::to_string(i));
  }
  if (t.numel() > 0 && t.data == nullptr)
    throw InvalidArgument(name, "data pointer is null for a non-empty tensor");
}

void check_same_shape(const TensorView& t, const char* name, const TensorView& ref,
                      const char* ref_name) {
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] != ref.shape[i])
      throw InvalidArgument(name, std::string("must have the shape of ") + ref_name + " " +
                                      shape_str(ref) + ", got " + shape_str(t));
}

// Outputs must not alias themselves: a zero stride on a dim of size > 1 would.
void check_no_self_overlap(const TensorView& t, const char* name) {
  if (t.numel() == 0) return;
  for (int i = 0; i < t.ndim; ++i)
    if (t.shape[i] > 1 && t.stride[i] == 0)
      throw InvalidArgument(name, "is an output and must not have a zero stride (dim " +
                                      std::to_string(i) + ")");
}

// Bytes [first, last] a view can touch (strides are non-negative here).
std::pair<std::uintptr_t, std::uintptr_t> byte_span(const TensorView& t) {
  const auto first = reinterpret_cast<std::uintptr_t>(t.data);
  std::uintptr_t extent = 0;
  for (int i = 0; i < t.ndim; ++i)
    extent += static_cast<std::uintptr_t>(t.shape[i] - 1) * static_cast<std::uintptr_t>(t.stride[i]);
  return {first, first + (extent + 1) * dtype_size(t.dtype) - 1};
}

bool spans_overlap(const TensorView& a, const TensorView& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto sa = byte_span(a), sb = byte_span(b);
  return sa.first <= sb.second && sb.first <= sa.second;
}

bool same_layout(const TensorView& a, const TensorView& b) {
  if (a.data != b.data || a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i] || a.stride[i] != b.stride[i]) return false;
  return true;
}

// The kernels read K and V while other CTAs write O, so outputs must not share memory with the
// inputs; out may be q itself (each output row is written by the CTA that read that q row).
void check_outputs_disjoint(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& out, const TensorView* lse) {
  if (spans_overlap(out, q) && !same_layout(out, q))
    throw InvalidArgument("out", "overlaps q's memory (only out == q, same layout, is allowed)");
  check_disjoint(out, "out", k, "k");
  check_disjoint(out, "out", v, "v");
  if (lse) {
    const TensorView* in[] = {&q, &k, &v, &out};
    const char* names[] = {"q", "k", "v", "out"};
    for (int i = 0; i < 4; ++i) check_disjoint(*lse, "lse", *in[i], names[i]);
  }
}


}  // namespace

std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

void check_cuda_vector_layout(const TensorView& t, const char* name) {
  if (t.numel() == 0) return;  // nothing is loaded or stored: any pointer and strides will do
  const auto addr = reinterpret_cast<std::uintptr_t>(t.data);
  if (addr % 16 != 0)
    throw InvalidArgument(name, "data must be 16-byte aligned for the CUDA kernels");
  for (int i = 0; i < 3; ++i)
    if (t.shape[i] > 1 && t.stride[i] % 8 != 0)
      throw InvalidArgument(name, "strides of dims 0-2 must be multiples of 8 elements (16 bytes) "
                                  "for the CUDA kernels, got stride " +
                                      std::to_string(t.stride[i]) + " in dim " +
                                      std::to_string(i));
}

void check_like(const TensorView& t, const char* name, const TensorView& like,
                const char* like_name, bool output) {
  check_rank(t, name, like.ndim, like.ndim == 4 ? "like its input" : "[B, Hkv, Skv]");
  check_same_shape(t, name, like, like_name);
  if (t.dtype != like.dtype)
    throw InvalidArgument(name, std::string("must have the dtype of ") + like_name + " (" +
                                    dtype_name(like.dtype) + "), got " + dtype_name(t.dtype));
  if (t.device.type != like.device.type || t.device.index != like.device.index)
    throw InvalidArgument(name, std::string("must be on the device of ") + like_name + " (" +
                                    device_str(like.device) + "), got " + device_str(t.device));
  if (t.ndim == 4) {
    if (t.shape[3] > 1 && t.stride[3] != 1)
      throw InvalidArgument(name, "last dimension (head dim) must be contiguous (stride 1), "
                                  "got stride " + std::to_string(t.stride[3]));
    if (t.device.type == DeviceType::kCUDA) check_cuda_vector_layout(t, name);
  }
  if (output) check_no_self_overlap(t, name);
}

AttnShape check_attention_args(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& out, const TensorView* lse) {
  check_rank(q, "q", 4, "[B, Sq, Hq, D]");
  check_rank(k, "k", 4, "[B, Skv, Hkv, D]");
  check_rank(v, "v", 4, "[B, Skv, Hkv, D]");
  check_rank(out, "out", 4, "[B, Sq, Hq, D]");

  const bool cuda = q.device.type == DeviceType::kCUDA;
  // q's own dtype first: an integer q is the mistake, not the others' mismatch with it.
  if (q.dtype == DType::kInt64 || q.dtype == DType::kInt32)
    throw InvalidArgument("q", std::string("dtype must be a floating-point type, got ") +
                                   dtype_name(q.dtype));
  const TensorView* all[] = {&q, &k, &v, &out};
  const char* names[] = {"q", "k", "v", "out"};
  for (int i = 0; i < 4; ++i) {
    const TensorView& t = *all[i];
    if (t.device.type != q.device.type || t.device.index != q.device.index)
      throw InvalidArgument(names[i], "must be on the same device as q (" + device_str(q.device) +
                                          "), got " + device_str(t.device));
    if (t.dtype != q.dtype)
      throw InvalidArgument(names[i], std::string("must have the dtype of q (") +
                                          dtype_name(q.dtype) + "), got " + dtype_name(t.dtype));
  }
  if (cuda) {
    if (q.dtype != DType::kFloat16 && q.dtype != DType::kBFloat16)
      throw InvalidArgument("q", std::string("dtype must be float16 or bfloat16 on CUDA, got ") +
                                     dtype_name(q.dtype));
  }

  const AttnShape s{q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]};
  if (k.shape[0] != s.batch)
    throw InvalidArgument("k", "batch size must match q (" + std::to_string(s.batch) + "), got " +
                                   shape_str(k));
  if (k.shape[3] != s.head_dim)
    throw InvalidArgument("k", "head dim must match q (" + std::to_string(s.head_dim) +
                                   "), got " + shape_str(k));
  check_same_shape(v, "v", k, "k");
  check_same_shape(out, "out", q, "q");
  // Every count may be 0 (B, Sq, Skv, Hq, Hkv: an empty problem, an empty or all-zero output);
  // only the GQA rule ties Hq to Hkv, and Hkv == 0 leaves nothing for a query head to use.
  if (s.heads_kv == 0 && s.heads_q != 0)
    throw InvalidArgument("k", "Hkv is 0 but Hq is " + std::to_string(s.heads_q) +
                                   "; Hq must be a multiple of Hkv (GQA/MQA), so Hkv == 0 needs "
                                   "Hq == 0");
  if (s.heads_kv != 0 && s.heads_q % s.heads_kv != 0)
    throw InvalidArgument("k", "Hq (" + std::to_string(s.heads_q) +
                                   ") must be a multiple of Hkv (" + std::to_string(s.heads_kv) +
                                   ") for GQA/MQA");
  if (s.head_dim < 1)
    throw InvalidArgument("q", "head dim must be >= 1, got " + std::to_string(s.head_dim));
  if (cuda && (s.batch > 65535 || s.heads_q > 65535))  // grid dims y and z
    throw InvalidArgument("q", "batch size and head count must each be <= 65535 on CUDA");
  constexpr int64_t kMaxLen = std::numeric_limits<int32_t>::max() / 2;
  if (s.seqlen_q > kMaxLen) throw InvalidArgument("q", "sequence length must be below 2^30");
  if (s.seqlen_k > kMaxLen) throw InvalidArgument("k", "sequence length must be below 2^30");

  for (int i = 0; i < 4; ++i) {
    const TensorView& t = *all[i];
    if (t.shape[3] > 1 && t.stride[3] != 1)
      throw InvalidArgument(names[i], "last dimension (head dim) must be contiguous (stride 1), "
                                      "got stride " + std::to_string(t.stride[3]));
  }
  check_no_self_overlap(out, "out");

  if (lse) {
    check_rank(*lse, "lse", 3, "[B, Hq, Sq]");
    if (lse->dtype != DType::kFloat32)
      throw InvalidArgument("lse", std::string("dtype must be float32, got ") +
                                       dtype_name(lse->dtype));
    if (lse->device.type != q.device.type || lse->device.index != q.device.index)
      throw InvalidArgument("lse", "must be on the same device as q (" + device_str(q.device) +
                                       "), got " + device_str(lse->device));
    if (lse->shape[0] != s.batch || lse->shape[1] != s.heads_q || lse->shape[2] != s.seqlen_q)
      throw InvalidArgument("lse", "must have shape [B, Hq, Sq] = [" + std::to_string(s.batch) +
                                       ", " + std::to_string(s.heads_q) + ", " +
                                       std::to_string(s.seqlen_q) + "], got " + shape_str(*lse));
    check_no_self_overlap(*lse, "lse");
  }

  check_outputs_disjoint(q, k, v, out, lse);

  if (cuda) {
    if (!head_dim_supported(s.head_dim))
      throw InvalidArgument("q", "head dim must be 64 or 128 on CUDA, got " +
                                     std::to_string(s.head_dim));
    for (int i = 0; i < 4; ++i) check_cuda_vector_layout(*all[i], names[i]);
  } else if (s.head_dim > 1024) {
    throw InvalidArgument("q", "head dim must be <= 1024, got " + std::to_string(s.head_dim));
  }
  return s;
}

void check_cuda_device(const Device& device, const char* name) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();
    throw Unsupported(std::string(name) + " is a CUDA tensor but CUDA is unusable here: " +
                      cudaGetErrorString(err));
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw CudaError(std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err));
  }
  if (device.index < 0 || device.index >= count)
    throw InvalidArgument(name, "is on " + device_str(device) + " but this process sees " +
                                    std::to_string(count) + " CUDA device(s)");
}

void check_cuda_pointer(const TensorView& t, const char* name) {
  if (t.numel() == 0) return;
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, t.data);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so later calls are not blamed
    throw InvalidArgument(name, "is marked as a CUDA tensor but its pointer is not known to CUDA (" +
                                    std::string(cudaGetErrorString(err)) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw InvalidArgument(name, "is marked as a CUDA tensor but its pointer is host memory");
  if (attr.device != t.device.index)
    throw InvalidArgument(name, "pointer lives on cuda:" + std::to_string(attr.device) +
                                    " but the tensor says " + device_str(t.device));
}

void check_cuda_pointers(const TensorView& q, const TensorView& k, const TensorView& v,
                         const TensorView& out, const TensorView* lse) {
  check_cuda_pointer(q, "q");
  check_cuda_pointer(k, "k");
  check_cuda_pointer(v, "v");
  check_cuda_pointer(out, "out");
  if (lse) check_cuda_pointer(*lse, "lse");
}

void check_disjoint(const TensorView& out, const char* out_name, const TensorView& in,
                    const char* in_name) {
  if (spans_overlap(out, in))
    throw InvalidArgument(out_name, std::string("overlaps ") + in_name +
                                        "'s memory (an output must not alias an input)");
}

double resolve_softmax_scale(const std::optional<double>& softmax_scale, int64_t head_dim,
                             const Device& device) {
  if (!softmax_scale) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  const double s = *softmax_scale;
  // The kernels mask with -inf before scaling, which needs a positive scale.
  if (!std::isfinite(s) || s <= 0.0)
    throw InvalidArgument("softmax_scale", "must be finite and > 0 (leave it unset for "
                                           "1/sqrt(head_dim)), got " + number_str(s));
  if (device.type == DeviceType::kCUDA) {
    const float f = static_cast<float>(s);
    if (!(f >= std::numeric_limits<float>::min() && f <= std::numeric_limits<float>::max()))
      throw InvalidArgument("softmax_scale", "must be a normal float32 on CUDA (between about "
                                             "1.2e-38 and 3.4e38: the kernels scale in float32), "
                                             "got " + number_str(s));
  }
  return s;
}

}  // namespace bsk::detail
