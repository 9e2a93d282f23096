// Every precondition of the front doors (src/api/validate.cpp, src/api/sparsek.cpp), through
// bsk::attention_forward and bsk::sparsek_attention_forward: the exception is bsk::InvalidArgument,
// argument() names the offending argument and the message states the rule. Each test starts
// from a valid call (checked in BaselineIsValid) and breaks one thing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>
#include <algorithm>
#include <string>

#include "test_util.h"
#include "api/validate.h"

namespace {

using namespace bsk_test;
using bsk::DType;
using bsk::TensorView;

template <class F>
void expect_invalid(F&& f, const std::string& arg, const std::string& rule, const char* call,
                    const char* file, int line) {
  SCOPED_TRACE(testing::Message() << call << " (" << file << ":" << line << ")");
  try {
    f();
  } catch (const bsk::InvalidArgument& e) {
    EXPECT_EQ(e.argument(), arg) << "message: " << e.what();
    const std::string msg = e.what();
    EXPECT_NE(msg.find("'" + arg + "'"), std::string::npos) << "message does not name '" << arg
                                                           << "': " << msg;
    EXPECT_NE(msg.find(rule), std::string::npos) << "message does not state the rule \"" << rule
                                                << "\": " << msg;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected bsk::InvalidArgument('" << arg << "'), got another exception: "
                  << e.what();
    return;
  }
  ADD_FAILURE() << "expected bsk::InvalidArgument('" << arg << "'), nothing was thrown";
}

#define EXPECT_INVALID(stmt, arg, rule) \
  expect_invalid([&] { stmt; }, arg, rule, #stmt, __FILE__, __LINE__)

// Dense and SparseK front doors with the given out and lse.
#define EXPECT_BOTH_INVALID_WITH(o, l, arg, rule)                                        \
  do {                                                                                  \
    EXPECT_INVALID(bsk::attention_forward(q, k, v, o, &l, ap), arg, rule);              \
    EXPECT_INVALID(bsk::sparsek_attention_forward(q, k, v, u, o, &l, sp), arg, rule);   \
  } while (0)

constexpr bsk::Device kCpu{bsk::DeviceType::kCPU, 0};
constexpr bsk::Device kCuda0{bsk::DeviceType::kCUDA, 0};

class Validation : public ::testing::Test {
 protected:
  static constexpr int64_t B = 2, S = 8, Hq = 4, Hkv = 2, D = 16;
  HostTensor hq{DType::kFloat32, {B, S, Hq, D}}, hk{DType::kFloat32, {B, S, Hkv, D}},
      hv{DType::kFloat32, {B, S, Hkv, D}}, hout{DType::kFloat32, {B, S, Hq, D}},
      hlse{DType::kFloat32, {B, Hq, S}}, hu{DType::kFloat32, {B, Hkv, S}};
  TensorView q, k, v, out, lse, u;
  bsk::AttentionParams ap;
  bsk::SparseKParams sp;

  void SetUp() override {
    std::mt19937_64 rng(1);
    hq.fill_normal(rng);
    hk.fill_normal(rng);
    hv.fill_normal(rng);
    hu.fill_normal(rng);
    q = hq.view();
    k = hk.view();
    v = hv.view();
    out = hout.view();
    lse = hlse.view();
    u = hu.view();
    ap.causal = true;
    sp.k = 2;
    sp.w = 2;
  }
  void dense() { bsk::attention_forward(q, k, v, out, &lse, ap); }
  void dense_no_lse() { bsk::attention_forward(q, k, v, out, nullptr, ap); }
  void sparse() { bsk::sparsek_attention_forward(q, k, v, u, out, &lse, sp); }
};

// Checks shared by both front doors (check_attention_args) are exercised through both.
#define EXPECT_BOTH_INVALID(arg, rule)         \
  do {                                         \
    EXPECT_INVALID(dense(), arg, rule);        \
    EXPECT_INVALID(sparse(), arg, rule);       \
  } while (0)

TEST_F(Validation, BaselineIsValid) {
  EXPECT_NO_THROW(dense());
  EXPECT_NO_THROW(dense_no_lse());
  EXPECT_NO_THROW(sparse());
  EXPECT_NO_THROW(bsk::sparsek_attention_forward(q, k, v, u, out, nullptr, sp));
}

TEST_F(Validation, WrongRank) {
  for (TensorView* t : {&q, &k, &v, &out}) {
    const TensorView saved = *t;
    t->ndim = 3;
    const char* name = t == &q ? "q" : t == &k ? "k" : t == &v ? "v" : "out";
    EXPECT_BOTH_INVALID(name, "must be a 4-D tensor");
    *t = saved;
  }
  lse.ndim = 2;
  EXPECT_BOTH_INVALID("lse", "must be a 3-D tensor [B, Hq, Sq]");
}

TEST_F(Validation, NegativeSize) {
  k.shape[1] = -1;
  EXPECT_BOTH_INVALID("k", "sizes must be non-negative");
}

TEST_F(Validation, NegativeStride) {
  const char* names[] = {"q", "k", "v", "out", "lse"};
  TensorView* ts[] = {&q, &k, &v, &out, &lse};
  for (int i = 0; i < 5; ++i) {
    const TensorView saved = *ts[i];
    ts[i]->stride[1] = -ts[i]->stride[1];
    EXPECT_BOTH_INVALID(names[i], "strides must be non-negative");
    *ts[i] = saved;
  }
}

TEST_F(Validation, NullData) {
  const char* names[] = {"q", "k", "v", "out", "lse"};
  TensorView* ts[] = {&q, &k, &v, &out, &lse};
  for (int i = 0; i < 5; ++i) {
    void* saved = ts[i]->data;
    ts[i]->data = nullptr;
    EXPECT_BOTH_INVALID(names[i], "data pointer is null");
    ts[i]->data = saved;
  }
}

TEST_F(Validation, NullDataAllowedForEmptyTensors) {
  for (TensorView* t : {&q, &k, &v, &out}) {
    t->shape[0] = 0;
    t->data = nullptr;
  }
  lse.shape[0] = 0;
  lse.data = nullptr;
  u.shape[0] = 0;
  u.data = nullptr;
  EXPECT_NO_THROW(dense());
  EXPECT_NO_THROW(sparse());
}

TEST_F(Validation, DeviceMismatch) {
  k.device = kCuda0;
  EXPECT_BOTH_INVALID("k", "must be on the same device as q");
  k.device = kCpu;
  v.device = bsk::Device{bsk::DeviceType::kCPU, 1};
  EXPECT_BOTH_INVALID("v", "must be on the same device as q");
  v.device = kCpu;
  out.device = kCuda0;
  EXPECT_BOTH_INVALID("out", "must be on the same device as q");
  out.device = kCpu;
  lse.device = kCuda0;
  EXPECT_BOTH_INVALID("lse", "must be on the same device as q");
}

TEST_F(Validation, DtypeMismatch) {
  k.dtype = DType::kFloat16;
  EXPECT_BOTH_INVALID("k", "must have the dtype of q (float32), got float16");
  k.dtype = DType::kFloat32;
  v.dtype = DType::kBFloat16;
  EXPECT_BOTH_INVALID("v", "must have the dtype of q");
  v.dtype = DType::kFloat32;
  out.dtype = DType::kFloat64;
  EXPECT_BOTH_INVALID("out", "must have the dtype of q");
}

TEST_F(Validation, Int64Rejected) {
  for (TensorView* t : {&q, &k, &v, &out}) t->dtype = DType::kInt64;
  EXPECT_BOTH_INVALID("q", "must be a floating-point type, got int64");
}

TEST_F(Validation, ShapeMismatches) {
  k.shape[0] = 1;
  v.shape[0] = 1;
  EXPECT_BOTH_INVALID("k", "batch size must match q");
  k.shape[0] = v.shape[0] = B;
  k.shape[3] = 8;
  EXPECT_BOTH_INVALID("k", "head dim must match q");
  k.shape[3] = D;
  v.shape[1] = S - 1;
  EXPECT_BOTH_INVALID("v", "must have the shape of k");
  v.shape[1] = S;
  v.shape[2] = 1;
  EXPECT_BOTH_INVALID("v", "must have the shape of k");
  v.shape[2] = Hkv;
  out.shape[1] = S - 1;
  EXPECT_BOTH_INVALID("out", "must have the shape of q");
  out.shape[1] = S;
  out.shape[2] = Hq / 2;
  EXPECT_BOTH_INVALID("out", "must have the shape of q");
}

TEST_F(Validation, HeadsNotAMultiple) {
  q.shape[2] = out.shape[2] = 3;
  lse.shape[1] = 3;
  EXPECT_BOTH_INVALID("k", "must be a multiple of Hkv");
}

// One rule for every count: B, Sq, Skv, Hq and Hkv may each be 0 (an empty problem); only the
// GQA rule ties Hq to Hkv.
TEST_F(Validation, ZeroHeads) {
  k.shape[2] = v.shape[2] = 0;
  u.shape[1] = 0;
  EXPECT_BOTH_INVALID("k", "Hkv == 0 needs Hq == 0");
  q.shape[2] = out.shape[2] = 0;
  lse.shape[1] = 0;
  EXPECT_NO_THROW(dense());
  EXPECT_NO_THROW(sparse());
  k.shape[2] = v.shape[2] = Hkv;
  u.shape[1] = Hkv;
  EXPECT_NO_THROW(dense());
  EXPECT_NO_THROW(sparse());
}

TEST_F(Validation, ZeroHeadDim) {
  for (TensorView* t : {&q, &k, &v, &out}) t->shape[3] = 0;
  EXPECT_BOTH_INVALID("q", "head dim must be >= 1");
}

TEST_F(Validation, SequenceTooLong) {
  // Empty batch, so nothing is read even if a check were missing.
  const int64_t big = int64_t{1} << 30;
  for (TensorView* t : {&q, &k, &v, &out}) t->shape[0] = 0;
  q.shape[1] = out.shape[1] = big;
  EXPECT_INVALID(dense_no_lse(), "q", "sequence length must be below 2^30");
  q.shape[1] = out.shape[1] = big - 1;
  EXPECT_NO_THROW(dense_no_lse());
  q.shape[1] = out.shape[1] = S;
  k.shape[1] = v.shape[1] = big;
  EXPECT_INVALID(dense_no_lse(), "k", "sequence length must be below 2^30");
}

TEST_F(Validation, LastDimNotContiguous) {
  const char* names[] = {"q", "k", "v", "out"};
  TensorView* ts[] = {&q, &k, &v, &out};
  for (int i = 0; i < 4; ++i) {
    // Every head dim halved so the shapes agree; only ts[i] steps over every other element.
    q.shape[3] = out.shape[3] = k.shape[3] = v.shape[3] = D / 2;
    ts[i]->stride[3] = 2;
    EXPECT_BOTH_INVALID(names[i], "last dimension (head dim) must be contiguous (stride 1)");
    ts[i]->stride[3] = 1;
    q.shape[3] = out.shape[3] = k.shape[3] = v.shape[3] = D;
  }
}

TEST_F(Validation, ZeroStrideOutput) {
  out.stride[2] = 0;
  EXPECT_BOTH_INVALID("out", "must not have a zero stride (dim 2)");
  out = hout.view();
  out.stride[0] = 0;
  EXPECT_BOTH_INVALID("out", "must not have a zero stride (dim 0)");
  out = hout.view();
  lse.stride[2] = 0;
  EXPECT_BOTH_INVALID("lse", "must not have a zero stride (dim 2)");
}

// Inputs may broadcast (zero strides), and a zero stride on a size-1 output dim is harmless.
TEST_F(Validation, ZeroStridesAllowedWhereHarmless) {
  k.stride[0] = 0;
  v.stride[2] = 0;
  u.stride[0] = 0;
  EXPECT_NO_THROW(dense());
  EXPECT_NO_THROW(sparse());
  HostTensor o1(DType::kFloat32, {B, 1, Hq, D}, {Hq * D, 0, D, 1}),
      q1(DType::kFloat32, {B, 1, Hq, D}, {Hq * D, 0, D, 1});
  q1.fill(0.5);
  EXPECT_NO_THROW(bsk::attention_forward(q1.view(), k, v, o1.view(), nullptr, ap));
}

// An empty output has no element that could alias another: the row-major strides that
// bsk::make_view (and PyTorch) give it, with zeros after a size-0 dim, must be accepted.
// Fails while check_no_self_overlap in src/api/validate.cpp ignores numel() == 0.
TEST_F(Validation, EmptyOutputsMayHaveZeroStrides) {
  TensorView q0 = bsk::make_view(nullptr, DType::kFloat32, kCpu, {B, 0, Hq, D});
  TensorView o0 = bsk::make_view(nullptr, DType::kFloat32, kCpu, {B, 0, Hq, D});
  TensorView l0 = bsk::make_view(nullptr, DType::kFloat32, kCpu, {B, Hq, 0});
  ASSERT_EQ(o0.stride[0], 0);  // the premise: row-major strides of an empty shape
  ASSERT_EQ(l0.stride[1], 0);
  EXPECT_NO_THROW(bsk::attention_forward(q0, k, v, o0, &l0, ap));
}

TEST_F(Validation, LseDtype) {
  lse.dtype = DType::kFloat64;
  EXPECT_BOTH_INVALID("lse", "dtype must be float32, got float64");
  lse.dtype = DType::kFloat16;
  EXPECT_BOTH_INVALID("lse", "dtype must be float32, got float16");
}

TEST_F(Validation, LseShape) {
  lse.shape[2] = S - 1;
  EXPECT_BOTH_INVALID("lse", "must have shape [B, Hq, Sq] = [2, 4, 8]");
  lse.shape[2] = S;
  lse.shape[1] = Hkv;
  EXPECT_BOTH_INVALID("lse", "must have shape [B, Hq, Sq]");
  lse.shape[1] = Hq;
  lse.shape[0] = 1;
  EXPECT_BOTH_INVALID("lse", "must have shape [B, Hq, Sq]");
}

TEST_F(Validation, HeadDimTooLargeOnCpu) {
  HostTensor a(DType::kFloat32, {1, 1, 1, 1025}), b(DType::kFloat32, {1, 1, 1, 1025}),
      c(DType::kFloat32, {1, 1, 1, 1025}), o(DType::kFloat32, {1, 1, 1, 1025});
  EXPECT_INVALID(bsk::attention_forward(a.view(), b.view(), c.view(), o.view(), nullptr, ap), "q",
                 "head dim must be <= 1024");
  HostTensor a2(DType::kFloat32, {1, 1, 1, 1024}), b2(DType::kFloat32, {1, 1, 1, 1024}),
      c2(DType::kFloat32, {1, 1, 1, 1024}), o2(DType::kFloat32, {1, 1, 1, 1024});
  a2.fill(0.0);
  b2.fill(0.0);
  c2.fill(1.0);
  EXPECT_NO_THROW(
      bsk::attention_forward(a2.view(), b2.view(), c2.view(), o2.view(), nullptr, ap));
}

TEST_F(Validation, SoftmaxScaleMustBeFiniteAndPositive) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  for (double s : {std::numeric_limits<double>::quiet_NaN(), kInf, -kInf, 0.0, -0.0, -0.25}) {
    ap.softmax_scale = sp.softmax_scale = s;
    EXPECT_BOTH_INVALID("softmax_scale", "must be finite and > 0");
  }
  // The CPU reference takes the scale in double: no float32 range applies.
  for (double s : {0.25, 1e-45, 1e-300, 1e39}) {
    ap.softmax_scale = sp.softmax_scale = s;
    EXPECT_NO_THROW(dense());
    EXPECT_NO_THROW(sparse());
  }
}

// A tiny scale used to travel as float32, where it became 0, which meant "default": the result
// was silently computed with 1/sqrt(D) instead. It must be used as given.
TEST_F(Validation, TinySoftmaxScaleIsNotTheDefault) {
  ap.softmax_scale = 1e-46;
  dense();
  std::vector<double> tiny(static_cast<size_t>(out.numel()));
  for (int64_t i = 0; i < out.numel(); ++i) tiny[i] = static_cast<float*>(out.data)[i];
  ap.softmax_scale.reset();
  dense();
  double max_diff = 0.0;
  for (int64_t i = 0; i < out.numel(); ++i)
    max_diff = std::max(max_diff, std::abs(tiny[i] - static_cast<float*>(out.data)[i]));
  EXPECT_GT(max_diff, 1e-3) << "softmax_scale 1e-46 gave the default scale's output";
}

// ---- CUDA-marked tensors: rejected before any CUDA call, so these run without a GPU ----------

class CudaMarkedValidation : public Validation {
 protected:
  // fp16 host buffers marked cuda:0 (never dereferenced: the checks below come first).
  HostTensor cq{DType::kFloat16, {1, 16, 2, 96}}, ck{DType::kFloat16, {1, 16, 2, 96}},
      cv{DType::kFloat16, {1, 16, 2, 96}}, co{DType::kFloat16, {1, 16, 2, 96}};
};

TEST_F(CudaMarkedValidation, HeadDim96NamesQ) {
  const TensorView Q = cq.view(kCuda0), K = ck.view(kCuda0), V = cv.view(kCuda0),
                   O = co.view(kCuda0);
  EXPECT_INVALID(bsk::attention_forward(Q, K, V, O, nullptr, ap), "q",
                 "head dim must be 64 or 128 on CUDA, got 96");
  HostTensor cu(DType::kFloat32, {1, 2, 16});
  EXPECT_INVALID(bsk::sparsek_attention_forward(Q, K, V, cu.view(kCuda0), O, nullptr, sp), "q",
                 "head dim must be 64 or 128 on CUDA, got 96");
}

TEST_F(CudaMarkedValidation, Float32OnCudaRejected) {
  EXPECT_INVALID(bsk::attention_forward(hq.view(kCuda0), hk.view(kCuda0), hv.view(kCuda0),
                                        hout.view(kCuda0), nullptr, ap),
                 "q", "dtype must be float16 or bfloat16 on CUDA, got float32");
  HostTensor a(DType::kFloat64, {1, 4, 1, 64}), b(DType::kFloat64, {1, 4, 1, 64}),
      c(DType::kFloat64, {1, 4, 1, 64}), o(DType::kFloat64, {1, 4, 1, 64});
  EXPECT_INVALID(bsk::attention_forward(a.view(kCuda0), b.view(kCuda0), c.view(kCuda0),
                                        o.view(kCuda0), nullptr, ap),
                 "q", "dtype must be float16 or bfloat16 on CUDA, got float64");
}

TEST_F(CudaMarkedValidation, GridLimits) {
  HostTensor a(DType::kFloat16, {1, 16, 2, 64}), b(DType::kFloat16, {1, 16, 2, 64}),
      c(DType::kFloat16, {1, 16, 2, 64}), o(DType::kFloat16, {1, 16, 2, 64});
  TensorView Q = a.view(kCuda0), K = b.view(kCuda0), V = c.view(kCuda0), O = o.view(kCuda0);
  // Never dereferenced: the limit is checked before any CUDA call.
  Q.shape[0] = K.shape[0] = V.shape[0] = O.shape[0] = 65536;
  Q.stride[0] = K.stride[0] = V.stride[0] = O.stride[0] = 0;
  O.stride[0] = 16 * 2 * 64;
  EXPECT_INVALID(bsk::attention_forward(Q, K, V, O, nullptr, ap), "q",
                 "batch size and head count must each be <= 65535 on CUDA");
}

// The CUDA kernels scale in float32: a scale that would become 0, a denormal or inf there is
// refused rather than changed.
TEST_F(CudaMarkedValidation, SoftmaxScaleMustFitFloat32OnCuda) {
  HostTensor a(DType::kFloat16, {1, 16, 2, 64}), b(DType::kFloat16, {1, 16, 2, 64}),
      c(DType::kFloat16, {1, 16, 2, 64}), o(DType::kFloat16, {1, 16, 2, 64});
  const TensorView Q = a.view(kCuda0), K = b.view(kCuda0), V = c.view(kCuda0),
                   O = o.view(kCuda0);
  HostTensor cu(DType::kFloat32, {1, 2, 16});
  for (double s : {1e-45, 1e-39, 1e39}) {
    ap.softmax_scale = sp.softmax_scale = s;
    EXPECT_INVALID(bsk::attention_forward(Q, K, V, O, nullptr, ap), "softmax_scale",
                   "must be a normal float32 on CUDA");
    EXPECT_INVALID(bsk::sparsek_attention_forward(Q, K, V, cu.view(kCuda0), O, nullptr, sp),
                   "softmax_scale", "must be a normal float32 on CUDA");
  }
}

TEST_F(Validation, SparseKOutputsMustNotOverlapScores) {
  // u placed inside each output's own buffer (u is the smaller one).
  TensorView uu = u;
  uu.data = hout.view().data;
  EXPECT_INVALID(bsk::sparsek_attention_forward(q, k, v, uu, out, &lse, sp), "out",
                 "overlaps u's memory");
  uu.data = hlse.view().data;
  EXPECT_INVALID(bsk::sparsek_attention_forward(q, k, v, uu, out, &lse, sp), "lse",
                 "overlaps u's memory");
}

TEST_F(Validation, OutputsMustNotOverlapInputs) {
  TensorView o = out;
  o.data = hk.view().data;  // out on top of k
  EXPECT_BOTH_INVALID_WITH(o, lse, "out", "overlaps k's memory");
  o.data = hv.view().data;
  EXPECT_BOTH_INVALID_WITH(o, lse, "out", "overlaps v's memory");
  o.data = static_cast<float*>(hq.view().data) + 1;  // shifted onto q: rows would race
  EXPECT_BOTH_INVALID_WITH(o, lse, "out", "overlaps q's memory");
  TensorView l = lse;
  l.data = hout.view().data;
  EXPECT_BOTH_INVALID_WITH(out, l, "lse", "overlaps out's memory");
  // out == q with q's exact layout is allowed: each output row replaces the q row it came from.
  EXPECT_NO_THROW(bsk::attention_forward(q, k, v, q, &lse, ap));
}

// ---- SparseK-only preconditions ---------------------------------------------------------------

TEST_F(Validation, SparseKBudgetAndWindow) {
  sp.k = -1;
  EXPECT_INVALID(sparse(), "k", "selection budget must be >= 0, got -1");
  sp.k = 2;
  sp.w = -3;
  EXPECT_INVALID(sparse(), "w", "window must be >= 0, got -3");
  sp.k = 0;
  sp.w = 0;
  EXPECT_INVALID(sparse(), "k", "k == 0 together with w == 0");
  sp.k = 0;
  sp.w = 3;
  EXPECT_NO_THROW(sparse());
  sp.k = 3;
  sp.w = 0;
  EXPECT_NO_THROW(sparse());
}

TEST_F(Validation, SparseKGate) {
  sp.gate = static_cast<bsk::Gate>(7);
  EXPECT_INVALID(sparse(), "gate", "must be key_value, value or none");
}

TEST_F(Validation, SparseKScoresTensor) {
  u.ndim = 2;
  EXPECT_INVALID(sparse(), "u", "must be a 3-D tensor [B, Hkv, Skv], got 2-D");
  u = hu.view();
  u.dtype = DType::kFloat64;
  EXPECT_INVALID(sparse(), "u", "dtype must be float32, got float64");
  u.dtype = DType::kFloat16;
  EXPECT_INVALID(sparse(), "u", "dtype must be float32, got float16");
  u = hu.view();
  u.device = kCuda0;
  EXPECT_INVALID(sparse(), "u", "must be on the same device as q");
  u = hu.view();
  for (int d = 0; d < 3; ++d) {
    u.shape[d] -= 1;
    EXPECT_INVALID(sparse(), "u", "must have shape [B, Hkv, Skv] = [2, 2, 8]");
    u.shape[d] += 1;
  }
  u.stride[2] = -1;
  EXPECT_INVALID(sparse(), "u", "strides must be non-negative");
  u = hu.view();
  u.data = nullptr;
  EXPECT_INVALID(sparse(), "u", "data pointer is null");
}

TEST_F(Validation, SparseKScoresMustBeFinite) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    const double saved = hu.get({1, 0, 5});
    hu.set({1, 0, 5}, bad);
    EXPECT_INVALID(sparse(), "u", "scores must be finite (no NaN or inf); u[1, 0, 5]");
    hu.set({1, 0, 5}, saved);
  }
  EXPECT_NO_THROW(sparse());
}

// An empty tensor addresses nothing, so the CUDA layout rules (16-byte alignment, strides in
// multiples of 8 elements) do not apply to it; the fuzz suite found Skv = 0 with a sliced V
// (stride 134 in dim 0) refused on the GPU although the same call is valid.
TEST(CudaLayoutRules, EmptyTensorsAreExempt) {
  HostTensor a(DType::kFloat16, {2, 1, 1, 64}), o(DType::kFloat16, {2, 1, 1, 64});
  HostTensor b(DType::kFloat16, {2, 1, 1, 64});
  TensorView Q = a.view(kCuda0), O = o.view(kCuda0), K = b.view(kCuda0);
  K.shape[1] = 0;  // Skv = 0
  TensorView V = K;
  V.stride[0] = 134;
  EXPECT_NO_THROW(bsk::detail::check_attention_args(Q, K, V, O, nullptr));
  V.shape[1] = 1;  // no longer empty: the rule applies again
  K.shape[1] = 1;
  EXPECT_THROW(bsk::detail::check_attention_args(Q, K, V, O, nullptr), bsk::InvalidArgument);
}

}  // namespace
