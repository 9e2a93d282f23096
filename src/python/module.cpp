// blackwell_sparsek._C: thin nanobind binding of libbsk.
//
// Every tensor argument is an nb::ndarray<> without constraints, so nanobind never copies or
// converts: any DLPack producer (a capsule, or an object with __dlpack__) on CPU or CUDA, with
// any strides, arrives as a zero-copy view and is translated into a bsk::TensorView. All rule
// checking happens in libbsk's front doors (or, for the reference-only helpers that have no front
// door, right here), so a bad argument surfaces as ValueError naming the argument.
//
// Exceptions: bsk::InvalidArgument -> ValueError, bsk::Unsupported -> NotImplementedError,
// bsk::CudaError -> RuntimeError, each keeping libbsk's message. The GIL is released while libbsk
// runs (CPU reference calls can take a while; CUDA calls only enqueue work).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "api/validate.h"
#include "bsk/bsk.h"
#include "dispatch/dense_fwd.h"

#ifndef BSK_PY_CUDA_ARCHS
#define BSK_PY_CUDA_ARCHS ""
#endif

namespace nb = nanobind;

namespace {

using Array = nb::ndarray<>;

// DLPack device types (dlpack.h: kDLCPU, kDLCUDA, kDLCUDAManaged).
constexpr int kDLCPU = 1;
constexpr int kDLCUDA = 2;
constexpr int kDLCUDAManaged = 13;

std::string dlpack_dtype_str(const nb::dlpack::dtype& dt) {
  std::string code;
  switch (static_cast<nb::dlpack::dtype_code>(dt.code)) {
    case nb::dlpack::dtype_code::Int: code = "int"; break;
    case nb::dlpack::dtype_code::UInt: code = "uint"; break;
    case nb::dlpack::dtype_code::Float: code = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: code = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: code = "complex"; break;
    case nb::dlpack::dtype_code::Bool: code = "bool"; break;
    default: code = "code" + std::to_string(dt.code) + "_";
  }
  std::string s = code + std::to_string(dt.bits);
  if (dt.lanes != 1) s += "x" + std::to_string(dt.lanes);
  return s;
}

bsk::DType to_dtype(const nb::dlpack::dtype& dt, const char* name) {
  if (dt.lanes == 1) {
    const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
    if (code == nb::dlpack::dtype_code::Float) {
      if (dt.bits == 16) return bsk::DType::kFloat16;
      if (dt.bits == 32) return bsk::DType::kFloat32;
      if (dt.bits == 64) return bsk::DType::kFloat64;
    } else if (code == nb::dlpack::dtype_code::Bfloat && dt.bits == 16) {
      return bsk::DType::kBFloat16;
    } else if (code == nb::dlpack::dtype_code::Int && dt.bits == 64) {
      return bsk::DType::kInt64;
    } else if (code == nb::dlpack::dtype_code::Int && dt.bits == 32) {
      return bsk::DType::kInt32;
    }
  }
  throw bsk::InvalidArgument(name, "dtype " + dlpack_dtype_str(dt) +
                                       " is not supported (float16, bfloat16, float32, float64 "
                                       "int32 or int64)");
}

// A zero-copy description of `a`. Only representability is checked here (dtype, device kind,
// rank <= 4); the rules of each op are libbsk's.
bsk::TensorView to_view(const Array& a, const char* name) {
  if (!a.is_valid()) throw bsk::InvalidArgument(name, "must be a tensor, got None");
  bsk::TensorView t;
  t.dtype = to_dtype(a.dtype(), name);
  const int dev = a.device_type();
  if (dev == kDLCPU) {
    t.device = {bsk::DeviceType::kCPU, 0};
  } else if (dev == kDLCUDA || dev == kDLCUDAManaged) {
    t.device = {bsk::DeviceType::kCUDA, a.device_id()};
  } else {
    throw bsk::InvalidArgument(name, "lives on DLPack device type " + std::to_string(dev) +
                                         "; only CPU and CUDA tensors are supported");
  }
  const size_t ndim = a.ndim();
  if (ndim > static_cast<size_t>(bsk::kMaxDims))
    throw bsk::InvalidArgument(name, "has " + std::to_string(ndim) +
                                         " dimensions; at most 4 are supported");
  t.ndim = static_cast<int>(ndim);
  for (size_t i = 0; i < ndim; ++i) {
    t.shape[i] = static_cast<int64_t>(a.shape(i));
    t.stride[i] = a.stride(i);
  }
  t.data = a.data();
  return t;
}

bsk::Stream to_stream(std::uintptr_t stream) { return reinterpret_cast<bsk::Stream>(stream); }

bsk::Gate to_gate(const std::string& gate) {
  if (gate == "key_value") return bsk::Gate::kKeyValue;
  if (gate == "value") return bsk::Gate::kValue;
  if (gate == "none") return bsk::Gate::kNone;
  throw bsk::InvalidArgument("gate", "must be 'key_value', 'value' or 'none', got '" + gate + "'");
}

// ---- checks for the reference-only helpers (libbsk's bsk::ref functions do not validate) ----

void check_cpu(const bsk::TensorView& t, const char* name, bsk::DType dtype) {
  if (t.device.type != bsk::DeviceType::kCPU)
    throw bsk::InvalidArgument(name, "must be a CPU tensor (this is a CPU reference)");
  if (t.dtype != dtype)
    throw bsk::InvalidArgument(name, std::string("dtype must be ") + bsk::dtype_name(dtype) +
                                         ", got " + bsk::dtype_name(t.dtype));
  for (int i = 0; i < t.ndim; ++i)
    if (t.stride[i] < 0) throw bsk::InvalidArgument(name, "strides must be non-negative");
}

// A contiguous 1-D CPU vector of the given dtype; returns its length.
int64_t check_vector(const bsk::TensorView& t, const char* name, bsk::DType dtype) {
  check_cpu(t, name, dtype);
  if (t.ndim != 1)
    throw bsk::InvalidArgument(name, "must be a 1-D tensor, got " + std::to_string(t.ndim) + "-D");
  if (t.shape[0] > 1 && t.stride[0] != 1)
    throw bsk::InvalidArgument(name, "must be contiguous (stride 1), got stride " +
                                         std::to_string(t.stride[0]));
  return t.shape[0];
}

void check_len(int64_t n, int64_t want, const char* name, const char* what) {
  if (n != want)
    throw bsk::InvalidArgument(name, std::string("must have ") + what + " (" +
                                         std::to_string(want) + ") entries, got " +
                                         std::to_string(n));
}

void check_budget(int64_t k) {
  if (k < 0) throw bsk::InvalidArgument("k", "must be >= 0, got " + std::to_string(k));
}

// ---- bound functions ----

// [B, H, S, D] -> the [B, S, H, D] view libbsk takes (dims 1 and 2 swapped; no data moves).
bsk::TensorView bshd_of_bhsd(bsk::TensorView t) {
  if (t.ndim == 4) {
    std::swap(t.shape[1], t.shape[2]);
    std::swap(t.stride[1], t.stride[2]);
  }
  return t;
}

void attention_forward(const Array& q, const Array& k, const Array& v, const Array& out,
                       const Array& lse, bool causal, std::optional<double> softmax_scale,
                       std::uintptr_t stream, bool bhsd) {
  // bhsd: q, k, v and out arrive as [B, H, S, D] (torch's SDPA layout), which saves the front
  // door four transposes, each a torch dispatcher call.
  const auto view = [bhsd](const Array& a, const char* name) {
    return bhsd ? bshd_of_bhsd(to_view(a, name)) : to_view(a, name);
  };
  const bsk::TensorView tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"),
                        to = view(out, "out");
  bsk::TensorView tl;
  const bool has_lse = lse.is_valid();
  if (has_lse) tl = to_view(lse, "lse");
  bsk::AttentionParams p;
  p.causal = causal;
  p.softmax_scale = softmax_scale;
  nb::gil_scoped_release release;
  bsk::attention_forward(tq, tk, tv, to, has_lse ? &tl : nullptr, p, to_stream(stream));
}

void sparsek_attention_forward(const Array& q, const Array& k, const Array& v, const Array& u,
                               const Array& out, const Array& lse, int64_t k_budget,
                               int64_t window, const std::string& gate,
                               std::optional<double> softmax_scale, std::uintptr_t stream) {
  const bsk::TensorView tq = to_view(q, "q"), tk = to_view(k, "k"), tv = to_view(v, "v"),
                        tu = to_view(u, "u"), to = to_view(out, "out");
  bsk::TensorView tl;
  const bool has_lse = lse.is_valid();
  if (has_lse) tl = to_view(lse, "lse");
  bsk::SparseKParams p;
  p.k = k_budget;
  p.w = window;
  p.gate = to_gate(gate);
  p.softmax_scale = softmax_scale;
  nb::gil_scoped_release release;
  bsk::sparsek_attention_forward(tq, tk, tv, tu, to, has_lse ? &tl : nullptr, p,
                                 to_stream(stream));
}

void attention_backward(const Array& q, const Array& k, const Array& v, const Array& out,
                        const Array& lse, const Array& dout, const Array& dq, const Array& dk,
                        const Array& dv, bool causal, std::optional<double> softmax_scale,
                        std::uintptr_t stream, const Array& dlse) {
  const bsk::TensorView tq = to_view(q, "q"), tk = to_view(k, "k"), tv = to_view(v, "v"),
                        to = to_view(out, "out"), tl = to_view(lse, "lse"),
                        tdo = to_view(dout, "dout"), tdq = to_view(dq, "dq"),
                        tdk = to_view(dk, "dk"), tdv = to_view(dv, "dv");
  bsk::TensorView tdl;
  if (dlse.is_valid()) tdl = to_view(dlse, "dlse");
  bsk::AttentionParams p;
  p.causal = causal;
  p.softmax_scale = softmax_scale;
  nb::gil_scoped_release release;
  bsk::attention_backward(tq, tk, tv, to, tl, tdo, dlse.is_valid() ? &tdl : nullptr, tdq, tdk,
                          tdv, p, to_stream(stream));
}

void sparsek_attention_backward(const Array& q, const Array& k, const Array& v, const Array& u,
                                const Array& out, const Array& lse, const Array& dout,
                                const Array& dq, const Array& dk, const Array& dv,
                                const Array& du, int64_t k_budget, int64_t window,
                                const std::string& gate, std::optional<double> softmax_scale,
                                std::uintptr_t stream, const Array& dlse) {
  const bsk::TensorView tq = to_view(q, "q"), tk = to_view(k, "k"), tv = to_view(v, "v"),
                        tu = to_view(u, "u"), to = to_view(out, "out"), tl = to_view(lse, "lse"),
                        tdo = to_view(dout, "dout"), tdq = to_view(dq, "dq"),
                        tdk = to_view(dk, "dk"), tdv = to_view(dv, "dv"),
                        tdu = to_view(du, "du");
  bsk::SparseKParams p;
  p.k = k_budget;
  p.w = window;
  p.gate = to_gate(gate);
  p.softmax_scale = softmax_scale;
  bsk::TensorView tdl;
  if (dlse.is_valid()) tdl = to_view(dlse, "dlse");
  nb::gil_scoped_release release;
  bsk::sparsek_attention_backward(tq, tk, tv, tu, to, tl, tdo, dlse.is_valid() ? &tdl : nullptr,
                                  tdq, tdk, tdv, tdu, p, to_stream(stream));
}

double sparsek_gates(const Array& z, int64_t k, const Array& gates) {
  const bsk::TensorView tz = to_view(z, "z"), tg = to_view(gates, "gates");
  const int64_t m = check_vector(tz, "z", bsk::DType::kFloat32);
  check_len(check_vector(tg, "gates", bsk::DType::kFloat32), m, "gates", "the length of z");
  check_budget(k);
  nb::gil_scoped_release release;
  return bsk::ref::sparsek_gates(static_cast<const float*>(tz.data), m, k,
                                 static_cast<float*>(tg.data));
}

void sparsek_gates_vjp(const Array& gates, const Array& grad_gates, const Array& grad_z) {
  const bsk::TensorView tg = to_view(gates, "gates"), tgg = to_view(grad_gates, "grad_gates"),
                        tgz = to_view(grad_z, "grad_z");
  const int64_t m = check_vector(tg, "gates", bsk::DType::kFloat32);
  check_len(check_vector(tgg, "grad_gates", bsk::DType::kFloat32), m, "grad_gates",
            "the length of gates");
  check_len(check_vector(tgz, "grad_z", bsk::DType::kFloat32), m, "grad_z",
            "the length of gates");
  nb::gil_scoped_release release;
  bsk::ref::sparsek_gates_vjp(static_cast<const float*>(tg.data),
                              static_cast<const float*>(tgg.data), m,
                              static_cast<float*>(tgz.data));
}

int64_t topk_select(const Array& z, int64_t k, const Array& idx) {
  const bsk::TensorView tz = to_view(z, "z"), ti = to_view(idx, "idx");
  const int64_t m = check_vector(tz, "z", bsk::DType::kFloat32);
  const int64_t n = check_vector(ti, "idx", bsk::DType::kInt64);
  check_budget(k);
  const int64_t want = std::min(k, m);
  if (n < want)
    throw bsk::InvalidArgument("idx", "must hold min(k, len(z)) = " + std::to_string(want) +
                                          " entries, got " + std::to_string(n));
  nb::gil_scoped_release release;
  return bsk::ref::topk_select(static_cast<const float*>(tz.data), m, k,
                               static_cast<int64_t*>(ti.data));
}

void sparsek_scores(const Array& x, const Array& w_score, const Array& slope, const Array& u) {
  const bsk::TensorView tx = to_view(x, "x"), tw = to_view(w_score, "w_score"),
                        ts = to_view(slope, "slope"), tu = to_view(u, "u");
  const struct {
    const bsk::TensorView* t;
    const char* name;
    int ndim;
    const char* layout;
  } args[] = {{&tx, "x", 3, "[B, S, Dmodel]"},
              {&tw, "w_score", 2, "[Dmodel, Hkv]"},
              {&ts, "slope", 1, "[Hkv]"},
              {&tu, "u", 3, "[B, Hkv, S]"}};
  for (const auto& a : args) {
    check_cpu(*a.t, a.name, bsk::DType::kFloat32);
    if (a.t->ndim != a.ndim)
      throw bsk::InvalidArgument(a.name, "must be a " + std::to_string(a.ndim) + "-D tensor " +
                                             a.layout + ", got " + std::to_string(a.t->ndim) +
                                             "-D");
  }
  const int64_t B = tx.shape[0], S = tx.shape[1], Dm = tx.shape[2], H = tw.shape[1];
  if (tw.shape[0] != Dm)
    throw bsk::InvalidArgument("w_score", "first dim must match x's last dim (" +
                                              std::to_string(Dm) + "), got " +
                                              std::to_string(tw.shape[0]));
  check_len(ts.shape[0], H, "slope", "Hkv = w_score.shape[1]");
  if (tu.shape[0] != B || tu.shape[1] != H || tu.shape[2] != S)
    throw bsk::InvalidArgument("u", "must have shape [B, Hkv, S] = [" + std::to_string(B) + ", " +
                                        std::to_string(H) + ", " + std::to_string(S) + "]");
  for (int i = 0; i < 3; ++i)
    if (tu.shape[i] > 1 && tu.stride[i] == 0)
      throw bsk::InvalidArgument("u", "is an output and must not have a zero stride");
  bsk::detail::check_disjoint(tu, "u", tx, "x");
  bsk::detail::check_disjoint(tu, "u", tw, "w_score");
  bsk::detail::check_disjoint(tu, "u", ts, "slope");
  nb::gil_scoped_release release;
  bsk::ref::sparsek_scores(tx, tw, ts, tu);
}

// ---- reference backward passes (CPU only; no front door yet, so the checks live here) ----

// A gradient output: a CPU float tensor shaped like `like`, no zero strides (it is written), not
// overlapping any input.
void check_grad_out(const bsk::TensorView& t, const char* name, const bsk::TensorView& like,
                    const char* like_name, std::initializer_list<const bsk::TensorView*> inputs) {
  if (t.device.type != bsk::DeviceType::kCPU)
    throw bsk::InvalidArgument(name, "must be a CPU tensor (this is a CPU reference)");
  if (t.dtype == bsk::DType::kInt32 || t.dtype == bsk::DType::kInt64)
    throw bsk::InvalidArgument(name, "must be a floating-point tensor");
  if (t.ndim != like.ndim)
    throw bsk::InvalidArgument(name, std::string("must have the shape of ") + like_name);
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] != like.shape[i])
      throw bsk::InvalidArgument(name, std::string("must have the shape of ") + like_name);
    if (t.stride[i] < 0 || (t.shape[i] > 1 && t.stride[i] == 0))
      throw bsk::InvalidArgument(name, "is an output: strides must be positive");
  }
  for (const bsk::TensorView* in : inputs) bsk::detail::check_disjoint(t, name, *in, "an input");
}

void attention_backward_ref(const Array& q, const Array& k, const Array& v, const Array& dout,
                            const Array& dq, const Array& dk, const Array& dv, bool causal,
                            std::optional<double> softmax_scale) {
  const bsk::TensorView tq = to_view(q, "q"), tk = to_view(k, "k"), tv = to_view(v, "v"),
                        tdo = to_view(dout, "dout"), tdq = to_view(dq, "dq"),
                        tdk = to_view(dk, "dk"), tdv = to_view(dv, "dv");
  const auto s = bsk::detail::check_attention_args(tq, tk, tv, tdo, nullptr);
  if (tq.device.type != bsk::DeviceType::kCPU)
    throw bsk::InvalidArgument("q", "must be a CPU tensor (this is a CPU reference)");
  check_grad_out(tdq, "dq", tq, "q", {&tq, &tk, &tv, &tdo});
  check_grad_out(tdk, "dk", tk, "k", {&tq, &tk, &tv, &tdo, &tdq});
  check_grad_out(tdv, "dv", tv, "v", {&tq, &tk, &tv, &tdo, &tdq, &tdk});
  bsk::AttentionParams p;
  p.causal = causal;
  p.softmax_scale = bsk::detail::resolve_softmax_scale(softmax_scale, s.head_dim, tq.device);
  nb::gil_scoped_release release;
  bsk::ref::attention_backward(tq, tk, tv, tdo, nullptr, tdq, tdk, tdv, p);
}

void sparsek_attention_backward_ref(const Array& q, const Array& k, const Array& v,
                                    const Array& u, const Array& dout, const Array& dq,
                                    const Array& dk, const Array& dv, const Array& du,
                                    int64_t k_budget, int64_t window, const std::string& gate,
                                    std::optional<double> softmax_scale) {
  const bsk::TensorView tq = to_view(q, "q"), tk = to_view(k, "k"), tv = to_view(v, "v"),
                        tu = to_view(u, "u"), tdo = to_view(dout, "dout"),
                        tdq = to_view(dq, "dq"), tdk = to_view(dk, "dk"),
                        tdv = to_view(dv, "dv"), tdu = to_view(du, "du");
  const auto s = bsk::detail::check_attention_args(tq, tk, tv, tdo, nullptr);
  if (tq.device.type != bsk::DeviceType::kCPU)
    throw bsk::InvalidArgument("q", "must be a CPU tensor (this is a CPU reference)");
  check_budget(k_budget);
  if (window < 0) throw bsk::InvalidArgument("w", "window must be >= 0");
  if (k_budget == 0 && window == 0)
    throw bsk::InvalidArgument("k", "k == 0 together with w == 0 leaves no key to attend");
  check_cpu(tu, "u", bsk::DType::kFloat32);
  if (tu.ndim != 3 || tu.shape[0] != s.batch || tu.shape[1] != s.heads_kv ||
      tu.shape[2] != s.seqlen_k)
    throw bsk::InvalidArgument("u", "must have shape [B, Hkv, Skv]");
  check_cpu(tdu, "du", bsk::DType::kFloat32);
  check_grad_out(tdq, "dq", tq, "q", {&tq, &tk, &tv, &tu, &tdo});
  check_grad_out(tdk, "dk", tk, "k", {&tq, &tk, &tv, &tu, &tdo, &tdq});
  check_grad_out(tdv, "dv", tv, "v", {&tq, &tk, &tv, &tu, &tdo, &tdq, &tdk});
  check_grad_out(tdu, "du", tu, "u", {&tq, &tk, &tv, &tu, &tdo, &tdq, &tdk, &tdv});
  bsk::SparseKParams p;
  p.k = k_budget;
  p.w = window;
  p.gate = to_gate(gate);
  p.softmax_scale = bsk::detail::resolve_softmax_scale(softmax_scale, s.head_dim, tq.device);
  nb::gil_scoped_release release;
  bsk::ref::sparsek_attention_backward(tq, tk, tv, tu, tdo, nullptr, tdq, tdk, tdv, tdu, p);
}

// The SparseK decoding cache's state tensors, translated once: append/attend then translate only
// their new inputs (each DLPack translation costs host time on every decode step). The arrays
// are kept referenced for the handle's lifetime.
class SparseKCacheHandle {
 public:
  SparseKCacheHandle(const Array& k, const Array& v, const Array& slot_u, const Array& cand_u,
                     const Array& cand_pos, const Array& cand_row, const Array& tau,
                     const Array& counts, const Array& status, int64_t budget, int64_t window,
                     const std::string& gate)
      : arrays_{k, v, slot_u, cand_u, cand_pos, cand_row, tau, counts, status} {
    c_.k = to_view(k, "k_cache");
    c_.v = to_view(v, "v_cache");
    c_.slot_u = to_view(slot_u, "slot_u");
    c_.cand_u = to_view(cand_u, "cand_u");
    c_.cand_pos = to_view(cand_pos, "cand_pos");
    c_.cand_row = to_view(cand_row, "cand_row");
    c_.tau = to_view(tau, "tau");
    c_.counts = to_view(counts, "counts");
    c_.status = to_view(status, "status");
    c_.budget = budget;
    c_.window = window;
    c_.gate = to_gate(gate);
    bsk::sparsek_cache_validate(c_);
  }
  void prefill(const Array& k, const Array& v, const Array& u, const Array& lengths,
               std::uintptr_t stream) {
    const bsk::TensorView tk = to_view(k, "k"), tv = to_view(v, "v"), tu = to_view(u, "u");
    bsk::TensorView tl;
    const bool has = lengths.is_valid();
    if (has) tl = to_view(lengths, "lengths");
    nb::gil_scoped_release release;
    bsk::sparsek_cache_prefill(c_, tk, tv, tu, has ? &tl : nullptr, to_stream(stream));
  }
  void append(const Array& k, const Array& v, const Array& u, std::uintptr_t stream) {
    const bsk::TensorView tk = to_view(k, "k_new"), tv = to_view(v, "v_new"),
                          tu = to_view(u, "u_new");
    bsk::sparsek_cache_append(c_, tk, tv, tu, to_stream(stream));
  }
  void attend(const Array& q, const Array& out, const Array& lse,
              std::optional<double> softmax_scale, std::uintptr_t stream) {
    const bsk::TensorView tq = to_view(q, "q"), to = to_view(out, "out");
    bsk::TensorView tl;
    const bool has = lse.is_valid();
    if (has) tl = to_view(lse, "lse");
    if (c_.k.device.type == bsk::DeviceType::kCPU) {
      nb::gil_scoped_release release;
      bsk::sparsek_cache_attend(c_, tq, to, has ? &tl : nullptr, softmax_scale, to_stream(stream));
      return;
    }
    bsk::sparsek_cache_attend(c_, tq, to, has ? &tl : nullptr, softmax_scale, to_stream(stream));
  }
  void step(const Array& q, const Array& k, const Array& v, const Array& u, const Array& out,
            const Array& lse, std::optional<double> softmax_scale, std::uintptr_t stream) {
    const bsk::TensorView tq = to_view(q, "q"), tk = to_view(k, "k_new"), tv = to_view(v, "v_new"),
                          tu = to_view(u, "u_new"), to = to_view(out, "out");
    bsk::TensorView tl;
    const bool has = lse.is_valid();
    if (has) tl = to_view(lse, "lse");
    if (c_.k.device.type == bsk::DeviceType::kCPU) {
      nb::gil_scoped_release release;
      bsk::sparsek_cache_step(c_, tq, tk, tv, tu, to, has ? &tl : nullptr, softmax_scale,
                              to_stream(stream));
      return;
    }
    bsk::sparsek_cache_step(c_, tq, tk, tv, tu, to, has ? &tl : nullptr, softmax_scale,
                            to_stream(stream));
  }

 private:
  std::vector<Array> arrays_;
  bsk::SparseKCache c_;
};

std::vector<std::string> cuda_archs() {
  std::vector<std::string> archs;
  std::string s = BSK_PY_CUDA_ARCHS;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = std::min(s.find(',', start), s.size());
    if (end > start) archs.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return archs;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() =
      "Bindings of libbsk (BlackwellSparseK). Tensors are taken zero-copy through DLPack (capsules "
      "or objects with __dlpack__), on CPU or CUDA, with any strides. Use the blackwell_sparsek "
      "package instead of calling this directly.";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const bsk::InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const bsk::Unsupported& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what());
    } catch (const bsk::CudaError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  nb::class_<SparseKCacheHandle>(m, "SparseKCacheHandle",
                                 "The SparseK decoding cache's state (include/bsk/sparsek_cache.h); "
                                 "use blackwell_sparsek.SparseKCache.")
      .def(nb::init<const Array&, const Array&, const Array&, const Array&, const Array&,
                    const Array&, const Array&, const Array&, const Array&, int64_t, int64_t,
                    const std::string&>(),
           nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("slot_u"), nb::arg("cand_u"),
           nb::arg("cand_pos"), nb::arg("cand_row"), nb::arg("tau"), nb::arg("counts"),
           nb::arg("status"), nb::arg("k_budget"), nb::arg("window"), nb::arg("gate"))
      .def("prefill", &SparseKCacheHandle::prefill, nb::arg("k"), nb::arg("v"), nb::arg("u"),
           nb::arg("lengths").none(), nb::arg("stream") = 0)
      .def("append", &SparseKCacheHandle::append, nb::arg("k_new"), nb::arg("v_new"),
           nb::arg("u_new"), nb::arg("stream") = 0)
      .def("attend", &SparseKCacheHandle::attend, nb::arg("q"), nb::arg("out"),
           nb::arg("lse").none(), nb::arg("softmax_scale").none() = nb::none(),
           nb::arg("stream") = 0)
      .def("step", &SparseKCacheHandle::step, nb::arg("q"), nb::arg("k_new"), nb::arg("v_new"),
           nb::arg("u_new"), nb::arg("out"), nb::arg("lse").none(),
           nb::arg("softmax_scale").none() = nb::none(), nb::arg("stream") = 0);
  m.def("attention_forward", &attention_forward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("out"), nb::arg("lse").none(), nb::arg("causal") = false,
        nb::arg("softmax_scale").none() = nb::none(), nb::arg("stream") = 0,
        nb::arg("bhsd") = false,
        "Dense attention forward into `out` (and `lse` unless None). BSHD q [B,Sq,Hq,D], k/v "
        "[B,Skv,Hkv,D] (with bhsd=True, q/k/v/out are [B,H,S,D] views instead); causal is "
        "bottom-right aligned; softmax_scale None means 1/sqrt(D). CUDA work is queued on "
        "`stream` (a cudaStream_t as int, 0 = legacy default) and not waited for.");
  m.def("attention_backward", &attention_backward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("out"), nb::arg("lse"), nb::arg("dout"), nb::arg("dq"), nb::arg("dk"),
        nb::arg("dv"), nb::arg("causal") = false,
        nb::arg("softmax_scale").none() = nb::none(), nb::arg("stream") = 0,
        nb::arg("dlse").none() = nb::none(),
        "Attention backward into dq/dk/dv from dout (and dlse, the gradient of lse, or None) and "
        "the forward's out and lse (CPU: the float64 reference; CUDA: deterministic kernels on "
        "`stream`).");
  m.def("sparsek_attention_backward", &sparsek_attention_backward, nb::arg("q"), nb::arg("k"),
        nb::arg("v"), nb::arg("u"), nb::arg("out"), nb::arg("lse"), nb::arg("dout"),
        nb::arg("dq"), nb::arg("dk"), nb::arg("dv"), nb::arg("du"), nb::arg("k_budget"),
        nb::arg("window"), nb::arg("gate") = "key_value",
        nb::arg("softmax_scale").none() = nb::none(), nb::arg("stream") = 0,
        nb::arg("dlse").none() = nb::none(),
        "SparseK attention backward into dq/dk/dv and du (float32, like u) from dout (and dlse, "
        "or None) and the forward's out and lse; du comes through the soft gates only (0 for "
        "gate 'none').");
  m.def("sparsek_attention_forward", &sparsek_attention_forward, nb::arg("q"), nb::arg("k"),
        nb::arg("v"), nb::arg("u"), nb::arg("out"), nb::arg("lse").none(), nb::arg("k_budget"),
        nb::arg("window"), nb::arg("gate") = "key_value",
        nb::arg("softmax_scale").none() = nb::none(), nb::arg("stream") = 0,
        "SparseK attention forward (docs/SPARSEK_SPEC.md) into `out`/`lse`: window `window` plus "
        "the `k_budget` best-scored earlier keys by u [B,Hkv,Skv] float32; gate is 'key_value', "
        "'value' or 'none'.");
  m.def("sparsek_gates", &sparsek_gates, nb::arg("z"), nb::arg("k"), nb::arg("gates"),
        "SPARSEK operator on one contiguous float32 CPU vector z: writes gates, returns tau.");
  m.def("sparsek_gates_vjp", &sparsek_gates_vjp, nb::arg("gates"), nb::arg("grad_gates"),
        nb::arg("grad_z"),
        "Vector-Jacobian product of the SPARSEK gates w.r.t. z, written into grad_z.");
  m.def("topk_select", &topk_select, nb::arg("z"), nb::arg("k"), nb::arg("idx"),
        "Writes the indices of the min(k, len(z)) winners of z (larger value first, ties toward "
        "the larger index) into int64 idx; returns the count.");
  m.def("sparsek_scores", &sparsek_scores, nb::arg("x"), nb::arg("w_score"), nb::arg("slope"),
        nb::arg("u"),
        "The paper's scorer u[b,h,j] = x[b,j,:] . w_score[:,h] + slope[h] * j (float32 CPU).");
  m.def("attention_backward_ref", &attention_backward_ref, nb::arg("q"), nb::arg("k"),
        nb::arg("v"), nb::arg("dout"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"),
        nb::arg("causal") = false, nb::arg("softmax_scale").none() = nb::none(),
        "Float64 CPU reference backward of dense attention: writes dq, dk, dv (dk/dv summed over "
        "each GQA group). The forward is recomputed.");
  m.def("sparsek_attention_backward_ref", &sparsek_attention_backward_ref, nb::arg("q"),
        nb::arg("k"), nb::arg("v"), nb::arg("u"), nb::arg("dout"), nb::arg("dq"), nb::arg("dk"),
        nb::arg("dv"), nb::arg("du"), nb::arg("k_budget"), nb::arg("window"),
        nb::arg("gate") = "key_value", nb::arg("softmax_scale").none() = nb::none(),
        "Float64 CPU reference backward of SparseK attention: writes dq, dk, dv and du (float32 "
        "[B,Hkv,Skv], through the SPARSEK VJP; zero for gate 'none').");
  m.def(
      "_set_dense_path",
      [](const std::string& path) {
        using bsk::detail::DensePath;
        if (path == "auto") return bsk::detail::set_dense_path_override(DensePath::kAuto);
        if (path == "sm80") return bsk::detail::set_dense_path_override(DensePath::kSm80);
        if (path == "sm90") return bsk::detail::set_dense_path_override(DensePath::kSm90);
        throw bsk::InvalidArgument("path", "must be auto, sm80 or sm90, got '" + path + "'");
      },
      nb::arg("path"),
      "Test hook: force the dense kernel family for this process (overrides BSK_DENSE_PATH); "
      "'auto' restores the default choice.");
  m.def("_dense_sm90_available", &bsk::detail::dense_sm90_available, nb::arg("device"),
        "Whether the Hopper (sm_90a) dense kernel can run on this CUDA device.");
  m.def("cuda_archs", &cuda_archs, "The CUDA archs this build has machine code for.");
  m.def("version", []() { return std::string(BSK_VERSION); }, "libbsk's version string.");
}
