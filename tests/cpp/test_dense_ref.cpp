// bsk::ref::attention_forward against a naive float64 implementation written here (strided
// element reads, two-pass softmax, no buffers shared with the reference).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"

namespace {

using namespace bsk_test;
using bsk::DType;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

using Naive = RefResult;


// Plain definition: row t at absolute position i = Skv - Sq + t sees keys j <= i when causal.
// Only rows listed in `rows` (all when empty) are computed.
Naive naive_attention(const HostTensor& q, const HostTensor& k, const HostTensor& v, bool causal,
                      double scale, const std::vector<int64_t>& rows = {}) {
  const int64_t B = q.shape[0], Sq = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Skv = k.shape[1], Hkv = k.shape[2];
  Naive r;
  r.out.assign(static_cast<size_t>(B * Sq * Hq * D), 0.0);
  r.lse.assign(static_cast<size_t>(B * Hq * Sq), kNegInf);
  std::vector<int64_t> ts = rows;
  if (ts.empty())
    for (int64_t t = 0; t < Sq; ++t) ts.push_back(t);
  std::vector<double> s(static_cast<size_t>(Skv));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t g = h / (Hq / Hkv);
      for (int64_t t : ts) {
        const int64_t i = Skv - Sq + t;
        const int64_t n = causal ? std::max<int64_t>(0, std::min(i + 1, Skv)) : Skv;
        if (n == 0) continue;  // zeros and -inf already there
        double mx = kNegInf;
        for (int64_t j = 0; j < n; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += q.get({b, t, h, d}) * k.get({b, j, g, d});
          s[j] = scale * dot;
          mx = std::max(mx, s[j]);
        }
        double denom = 0.0;
        for (int64_t j = 0; j < n; ++j) denom += std::exp(s[j] - mx);
        for (int64_t d = 0; d < D; ++d) {
          double o = 0.0;
          for (int64_t j = 0; j < n; ++j) o += std::exp(s[j] - mx) / denom * v.get({b, j, g, d});
          r.out[static_cast<size_t>(((b * Sq + t) * Hq + h) * D + d)] = o;
        }
        r.lse[static_cast<size_t>((b * Hq + h) * Sq + t)] = mx + std::log(denom);
      }
    }
  return r;
}

enum class Layout { kBSHD, kBHSD, kPadded };

struct DenseCase {
  std::string name;
  int64_t B, Sq, Skv, Hq, Hkv, D;
  bool causal;
  DType dtype;
  Layout layout = Layout::kBSHD;
  float scale = 0.0f;  // 0: 1/sqrt(D)
};

void PrintTo(const DenseCase& c, std::ostream* os) { *os << c.name; }

HostTensor make_qkv(DType dt, Layout layout, int64_t B, int64_t S, int64_t H, int64_t D) {
  switch (layout) {
    case Layout::kBSHD: return HostTensor(dt, {B, S, H, D});
    case Layout::kBHSD: return make_bhsd_as_bshd(dt, B, S, H, D);
    case Layout::kPadded:  // every row padded by 8 elements, batch padded by 3 rows
      return HostTensor(dt, {B, S, H, D}, {(S * H + 3) * (D + 8), H * (D + 8), D + 8, 1});
  }
  return {};
}

class DenseRefTest : public ::testing::TestWithParam<DenseCase> {};

TEST_P(DenseRefTest, MatchesNaive) {
  const DenseCase& c = GetParam();
  std::mt19937_64 rng(std::hash<std::string>{}(c.name));
  HostTensor q = make_qkv(c.dtype, c.layout, c.B, c.Sq, c.Hq, c.D);
  HostTensor k = make_qkv(c.dtype, c.layout, c.B, c.Skv, c.Hkv, c.D);
  HostTensor v = make_qkv(c.dtype, c.layout, c.B, c.Skv, c.Hkv, c.D);
  HostTensor out = make_qkv(c.dtype, c.layout, c.B, c.Sq, c.Hq, c.D);
  // lse with non-contiguous strides as well when the layout is not plain.
  HostTensor lse = c.layout == Layout::kBSHD
                       ? HostTensor(DType::kFloat32, {c.B, c.Hq, c.Sq})
                       : HostTensor(DType::kFloat32, {c.B, c.Hq, c.Sq}, {1, c.B, c.B * c.Hq + 1});
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);

  bsk::AttentionParams p;
  p.causal = c.causal;
  p.softmax_scale = c.scale != 0.0f ? c.scale : static_cast<float>(1.0 / std::sqrt(double(c.D)));
  bsk::TensorView lv = lse.view();
  bsk::ref::attention_forward(q.view(), k.view(), v.view(), out.view(), &lv, p);

  const Naive nv = naive_attention(q, k, v, c.causal, *p.softmax_scale);
  expect_matches(out, &lse, nv);
  EXPECT_TRUE(out.gaps_untouched()) << "the reference wrote outside the out view";
  EXPECT_TRUE(lse.gaps_untouched()) << "the reference wrote outside the lse view";

  // Rows with no key are exactly 0 / -inf (already covered above; spelled out for clarity).
  if (c.causal)
    for (int64_t t = 0; t < c.Sq && c.Skv - c.Sq + t < 0; ++t) {
      EXPECT_EQ(out.get({0, t, 0, 0}), 0.0);
      EXPECT_EQ(lse.get({0, 0, t}), kNegInf);
    }

  // Same call, no lse: same output bits.
  HostTensor out2 = make_qkv(c.dtype, c.layout, c.B, c.Sq, c.Hq, c.D);
  bsk::ref::attention_forward(q.view(), k.view(), v.view(), out2.view(), nullptr, p);
  EXPECT_EQ(out.storage, out2.storage);
}

const DenseCase kDenseCases[] = {
    {"S1", 1, 1, 1, 1, 1, 64, false, DType::kFloat32},
    {"S1_causal_f16", 2, 1, 1, 2, 2, 64, true, DType::kFloat16},
    {"S17_f32", 2, 17, 17, 2, 2, 64, false, DType::kFloat32},
    {"S17_causal_f16", 1, 17, 17, 3, 3, 64, true, DType::kFloat16},
    {"S17_causal_bf16", 1, 17, 17, 2, 1, 128, true, DType::kBFloat16},
    {"SqLtSkv_causal_bf16", 2, 33, 65, 4, 4, 32, true, DType::kBFloat16},
    {"SqLtSkv_f64", 1, 20, 45, 2, 2, 16, false, DType::kFloat64},
    {"SqGtSkv_causal_f32", 1, 65, 33, 2, 2, 64, true, DType::kFloat32},
    {"SqGtSkv_causal_f16", 2, 40, 7, 2, 1, 32, true, DType::kFloat16},
    {"SqGtSkv_f64", 1, 40, 24, 2, 1, 16, false, DType::kFloat64},
    {"GQA8to2_causal_f16", 2, 64, 64, 8, 2, 64, true, DType::kFloat16},
    {"GQA8to2_bf16", 1, 50, 70, 8, 2, 64, false, DType::kBFloat16},
    {"MQA_causal_bf16", 1, 48, 80, 4, 1, 128, true, DType::kBFloat16},
    {"MQA_f32", 1, 30, 30, 4, 1, 32, false, DType::kFloat32},
    {"BHSD_causal_f32", 2, 50, 50, 4, 2, 64, true, DType::kFloat32, Layout::kBHSD},
    {"BHSD_f16", 1, 31, 47, 2, 2, 64, false, DType::kFloat16, Layout::kBHSD},
    {"Padded_causal_bf16", 2, 29, 40, 4, 2, 32, true, DType::kBFloat16, Layout::kPadded},
    {"Padded_SqGtSkv_f64", 1, 33, 9, 2, 1, 8, true, DType::kFloat64, Layout::kPadded},
    {"Scale0p7_f32", 1, 24, 24, 2, 2, 64, true, DType::kFloat32, Layout::kBSHD, 0.7f},
    {"LargeScale_f64", 1, 24, 30, 2, 2, 64, false, DType::kFloat64, Layout::kBSHD, 4.0f},
    {"D1_f64", 1, 9, 9, 1, 1, 1, true, DType::kFloat64},
    {"NoKeys_f32", 2, 5, 0, 2, 1, 8, false, DType::kFloat32},
    {"NoKeys_causal_f16", 1, 5, 0, 2, 2, 8, true, DType::kFloat16},
};

INSTANTIATE_TEST_SUITE_P(Cases, DenseRefTest, ::testing::ValuesIn(kDenseCases),
                         [](const ::testing::TestParamInfo<DenseCase>& info) {
                           return info.param.name;
                         });

// Front door on CPU tensors: validates, resolves an unset softmax_scale to 1/sqrt(D), runs the
// reference.
TEST(DenseRef, FrontDoorOnCpuUsesDefaultScale) {
  std::mt19937_64 rng(7);
  const int64_t B = 1, S = 21, H = 2, D = 64;
  HostTensor q(DType::kFloat32, {B, S, H, D}), k(DType::kFloat32, {B, S, H, D}),
      v(DType::kFloat32, {B, S, H, D}), out(DType::kFloat32, {B, S, H, D}),
      lse(DType::kFloat32, {B, H, S});
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  bsk::AttentionParams p;
  p.causal = true;
  bsk::TensorView lv = lse.view();
  bsk::attention_forward(q.view(), k.view(), v.view(), out.view(), &lv, p);
  const Naive nv = naive_attention(q, k, v, true, 1.0 / std::sqrt(double(D)));
  // float32(1/sqrt(64)) is exact, so the naive double scale is the same number.
  expect_matches(out, &lse, nv);
}

// Empty problems write nothing and do not crash.
TEST(DenseRef, EmptyBatchOrQueries) {
  HostTensor q(DType::kFloat32, {0, 4, 2, 8}), k(DType::kFloat32, {0, 4, 2, 8}),
      v(DType::kFloat32, {0, 4, 2, 8}), out(DType::kFloat32, {0, 4, 2, 8});
  bsk::AttentionParams p;
  p.softmax_scale = 0.5f;
  EXPECT_NO_THROW(bsk::ref::attention_forward(q.view(), k.view(), v.view(), out.view(), nullptr, p));
  HostTensor q2(DType::kFloat32, {1, 0, 2, 8}), k2(DType::kFloat32, {1, 4, 2, 8}),
      v2(DType::kFloat32, {1, 4, 2, 8}), out2(DType::kFloat32, {1, 0, 2, 8}),
      lse2(DType::kFloat32, {1, 2, 0}, {2, 1, 1});  // (row-major strides would be 0: see
                                                    // Validation.EmptyOutputsMayHaveZeroStrides)
  bsk::TensorView lv = lse2.view();
  EXPECT_NO_THROW(bsk::attention_forward(q2.view(), k2.view(), v2.view(), out2.view(), &lv, p));
}

// A non-finite K or V entry at a key that a row cannot see (causal) must not reach that row, for
// every position of the key relative to the reference's row blocks and key tiles. P.V used to
// multiply it by the row's probability 0, and 0 * inf is NaN.
TEST(DenseRef, MaskedNonFiniteKeyDoesNotLeak) {
  const int64_t S = 19, H = 1, D = 8;
  for (int64_t j = 0; j < S; ++j) {
    for (double bad : {std::numeric_limits<double>::infinity(), std::nan("")}) {
      SCOPED_TRACE("key " + std::to_string(j) + " value " + std::to_string(bad));
      std::mt19937_64 rng(5);
      HostTensor q(DType::kFloat64, {1, S, H, D}), k(DType::kFloat64, {1, S, H, D}),
          v(DType::kFloat64, {1, S, H, D}), clean(DType::kFloat64, {1, S, H, D}),
          out(DType::kFloat64, {1, S, H, D});
      q.fill_normal(rng);
      k.fill_normal(rng);
      v.fill_normal(rng);
      bsk::AttentionParams p;
      p.causal = true;
      bsk::attention_forward(q.view(), k.view(), v.view(), clean.view(), nullptr, p);
      v.set({0, j, 0, 2}, bad);
      k.set({0, j, 0, 1}, bad);
      bsk::attention_forward(q.view(), k.view(), v.view(), out.view(), nullptr, p);
      for (int64_t t = 0; t < j; ++t)
        for (int64_t d = 0; d < D; ++d)
          ASSERT_EQ(out.get({0, t, 0, d}), clean.get({0, t, 0, d})) << "row " << t << " d " << d;
    }
  }
}

// The size the reference must handle quickly: S = 2048, D = 128, GQA 2/1, causal, fp16. Rows
// sampled across the sequence are checked against the naive loop.
TEST(DenseRef, LongSequenceSampledRows) {
  std::mt19937_64 rng(2048);
  const int64_t B = 1, S = 2048, Hq = 2, Hkv = 1, D = 128;
  HostTensor q(DType::kFloat16, {B, S, Hq, D}), k(DType::kFloat16, {B, S, Hkv, D}),
      v(DType::kFloat16, {B, S, Hkv, D}), out(DType::kFloat16, {B, S, Hq, D}),
      lse(DType::kFloat32, {B, Hq, S});
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  bsk::AttentionParams p;
  p.causal = true;
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(double(D)));
  bsk::TensorView lv = lse.view();
  const auto t0 = std::chrono::steady_clock::now();
  bsk::ref::attention_forward(q.view(), k.view(), v.view(), out.view(), &lv, p);
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  RecordProperty("reference_seconds", std::to_string(secs));
  const std::vector<int64_t> rows = {0, 1, 2, 3, 4, 5, 127, 128, 1000, 1023, 1024, 2046, 2047};
  const Naive nv = naive_attention(q, k, v, true, *p.softmax_scale, rows);
  expect_matches(out, &lse, nv, rows);
  // Every row written (no NaN left from the poison).
  int64_t nans = 0;
  for_each_index(out.shape, [&](const Index& i) { nans += std::isnan(out.get(i)); });
  EXPECT_EQ(nans, 0);
}

}  // namespace
