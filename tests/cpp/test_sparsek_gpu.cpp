// bsk::sparsek_attention_forward on CUDA tensors against the float64 CPU reference, with the
// dense tests' accuracy bound (gpu_test_util.h). The cases cover what breaks a selection: ties and
// repeated scores, flat scores (every gate fractional), few candidates (|C_i| <= k), k = 0,
// w = 0, w >= S, Sq < Skv, lengths that are not tile multiples, long runs across selection
// chunks, GQA and MQA, every gate mode. Every test skips without a GPU.
#include "test_util.h"

#include <cmath>

#include <cuda_runtime_api.h>

#include "gpu_test_util.h"

namespace {

using namespace bsk_test;
using bsk::Gate;

enum class Scores { kNormal, kTies, kFlat, kHuge, kRamp };

struct SparseKCase {
  std::string name;
  int64_t B, Sq, Skv, Hq, Hkv, D, k, w;
  Gate gate;
  Scores scores;
  DType dt;
  bool bhsd = false;
};

void PrintTo(const SparseKCase& c, std::ostream* os) { *os << c.name; }

void fill_scores(HostTensor& u, Scores kind, std::mt19937_64& rng) {
  std::normal_distribution<double> nd(0.0, 1.0);
  for_each_index(u.shape, [&](const Index& i) {
    double x = nd(rng);
    switch (kind) {
      case Scores::kNormal: break;
      case Scores::kTies: x = std::floor(2.0 * x); break;     // a handful of values, many ties
      case Scores::kFlat: x = 0.25; break;                    // every candidate tied
      case Scores::kHuge: x = 1e6 + std::floor(4.0 * x); break;  // large and tied
      case Scores::kRamp: x = 0.01 * static_cast<double>(i[2]) + 0.5 * x; break;  // recency bias
    }
    u.set(i, x);
  });
}

HostTensor make_t(const SparseKCase& c, int64_t S, int64_t H) {
  return c.bhsd ? make_bhsd_as_bshd(c.dt, c.B, S, H, c.D) : HostTensor(c.dt, {c.B, S, H, c.D});
}

void run_gpu(const SparseKCase& c, HostTensor& q, HostTensor& k, HostTensor& v, HostTensor& u,
             DeviceBuffer& dq, DeviceBuffer& dk, DeviceBuffer& dv, DeviceBuffer& du,
             HostTensor& out, HostTensor& lse, const bsk::SparseKParams& p) {
  run_poisoned(c.name, out, lse, [&](const TensorView& ov, const TensorView& lv) {
    bsk::sparsek_attention_forward(device_view(q, dq), device_view(k, dk), device_view(v, dv),
                                   device_view(u, du), ov, &lv, p);
  });
}

void check_case(const SparseKCase& c) {
  SCOPED_TRACE(c.name);
  std::mt19937_64 rng(std::hash<std::string>{}(c.name));
  HostTensor q = make_t(c, c.Sq, c.Hq), k = make_t(c, c.Skv, c.Hkv), v = make_t(c, c.Skv, c.Hkv);
  HostTensor u(DType::kFloat32, {c.B, c.Hkv, c.Skv});
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  fill_scores(u, c.scores, rng);
  DeviceBuffer dq, dk, dv, du;
  ASSERT_NO_FATAL_FAILURE(upload(dq, q));
  ASSERT_NO_FATAL_FAILURE(upload(dk, k));
  ASSERT_NO_FATAL_FAILURE(upload(dv, v));
  ASSERT_NO_FATAL_FAILURE(upload(du, u));

  bsk::SparseKParams p;
  p.k = c.k;
  p.w = c.w;
  p.gate = c.gate;
  HostTensor out = make_t(c, c.Sq, c.Hq), lse(DType::kFloat32, {c.B, c.Hq, c.Sq});
  ASSERT_NO_FATAL_FAILURE(run_gpu(c, q, k, v, u, dq, dk, dv, du, out, lse, p));

  HostTensor ref(DType::kFloat64, {c.B, c.Sq, c.Hq, c.D}), ref_lse(DType::kFloat32, {c.B, c.Hq, c.Sq});
  const TensorView rlv = ref_lse.view();
  bsk::SparseKParams rp = p;
  rp.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.D)));
  bsk::ref::sparsek_attention_forward(q.view(), k.view(), v.view(), u.view(), ref.view(), &rlv, rp);
  expect_close_to_reference(out, lse, ref, ref_lse,
                            [&](const Index& i) { return c.Skv - c.Sq + i[1] < 0; });

  HostTensor out2 = make_t(c, c.Sq, c.Hq), lse2(DType::kFloat32, {c.B, c.Hq, c.Sq});
  ASSERT_NO_FATAL_FAILURE(run_gpu(c, q, k, v, u, dq, dk, dv, du, out2, lse2, p));
  expect_same_bits(out, lse, out2, lse2);
}

using SparseKGpuTest = KernelPathTest<SparseKCase>;

TEST_P(SparseKGpuTest, MatchesReference) {
  REQUIRE_GPU();
  use_path();
  if (!IsSkipped()) check_case(std::get<0>(GetParam()));
}

constexpr auto kKV = Gate::kKeyValue;
constexpr auto kV = Gate::kValue;
constexpr auto kNone = Gate::kNone;
constexpr auto kF16 = DType::kFloat16;
constexpr auto kBF16 = DType::kBFloat16;

const SparseKCase kCases[] = {
    {"Basic_kv_fp16", 1, 300, 300, 4, 2, 64, 32, 16, kKV, Scores::kNormal, kF16},
    {"Basic_value_bf16", 1, 300, 300, 4, 2, 128, 32, 16, kV, Scores::kNormal, kBF16},
    {"Basic_none_fp16", 1, 300, 300, 4, 2, 64, 32, 16, kNone, Scores::kNormal, kF16},
    {"Chunks_kv_bf16", 1, 1500, 1500, 2, 1, 128, 100, 64, kKV, Scores::kNormal, kBF16},
    {"Chunks_none_fp16", 2, 1200, 1200, 2, 2, 64, 77, 30, kNone, Scores::kRamp, kF16},
    {"Ties_kv_fp16", 1, 700, 700, 2, 2, 64, 40, 10, kKV, Scores::kTies, kF16},
    {"Ties_none_bf16", 1, 700, 700, 2, 2, 128, 40, 10, kNone, Scores::kTies, kBF16},
    {"Flat_kv_fp16", 1, 500, 500, 2, 1, 64, 20, 8, kKV, Scores::kFlat, kF16},
    {"Flat_value_bf16", 1, 500, 500, 2, 1, 128, 20, 8, kV, Scores::kFlat, kBF16},
    {"Huge_kv_fp16", 1, 600, 600, 2, 1, 64, 30, 12, kKV, Scores::kHuge, kF16},
    {"FewCandidates_kv_fp16", 1, 90, 90, 2, 2, 64, 200, 16, kKV, Scores::kNormal, kF16},
    {"KZero_window_bf16", 1, 333, 333, 2, 2, 128, 0, 50, kKV, Scores::kNormal, kBF16},
    {"WZero_kv_fp16", 1, 257, 257, 2, 2, 64, 48, 0, kKV, Scores::kNormal, kF16},
    {"WZero_causal_none_fp16", 1, 200, 200, 2, 2, 128, 1000, 0, kNone, Scores::kNormal, kF16},
    {"WideWindow_kv_bf16", 1, 150, 150, 2, 2, 64, 8, 400, kKV, Scores::kNormal, kBF16},
    {"SqLtSkv_kv_fp16", 1, 100, 640, 4, 2, 128, 64, 32, kKV, Scores::kNormal, kF16},
    {"SqGtSkv_kv_bf16", 1, 300, 120, 2, 1, 64, 16, 8, kKV, Scores::kNormal, kBF16},
    {"S1_kv_fp16", 2, 1, 1, 2, 1, 64, 4, 4, kKV, Scores::kNormal, kF16},
    {"S17_kv_bf16", 1, 17, 17, 2, 2, 128, 3, 2, kKV, Scores::kNormal, kBF16},
    {"GQA32to8_kv_bf16", 1, 200, 200, 32, 8, 128, 24, 16, kKV, Scores::kNormal, kBF16},
    {"MQA_value_fp16", 1, 180, 180, 8, 1, 64, 24, 16, kV, Scores::kTies, kF16},
    {"BHSD_kv_fp16", 2, 260, 260, 4, 2, 64, 30, 20, kKV, Scores::kNormal, kF16, true},
    // Many key blocks per CTA: several selected blocks from key lists, a window band of several
    // blocks, 4 query heads per CTA (the pipelines' stage and slot rings wrap many times).
    {"Long_kv_bf16", 1, 2500, 2500, 8, 2, 128, 384, 200, kKV, Scores::kNormal, kBF16},
    {"Long_value_fp16", 1, 2100, 2100, 4, 1, 64, 300, 260, kV, Scores::kRamp, kF16},
    // More tiles of 128 rows than an H100 has SMs (376): the persistent Hopper kernel's CTAs take
    // two or three tiles each, through both Q buffers.
    {"ManyTiles_kv_bf16", 2, 3000, 3000, 8, 2, 128, 256, 128, kKV, Scores::kNormal, kBF16},
};

INSTANTIATE_TEST_SUITE_P(Cases, SparseKGpuTest,
                         ::testing::Combine(::testing::ValuesIn(kCases), BSK_KERNEL_PATHS),
                         kernel_path_name<SparseKCase>);

class SparseKGpuErrors : public ::testing::Test {
 protected:
  static constexpr int64_t B = 1, S = 64, H = 2, D = 64;
  HostTensor hq{DType::kFloat16, {B, S, H, D}}, hk{DType::kFloat16, {B, S, H, D}},
      hv{DType::kFloat16, {B, S, H, D}}, hout{DType::kFloat16, {B, S, H, D}},
      hu{DType::kFloat32, {B, H, S}};
  DeviceBuffer dq, dk, dv, dout, du;
  bsk::SparseKParams p;

  void SetUp() override {
    REQUIRE_GPU();
    std::mt19937_64 rng(5);
    hq.fill_normal(rng);
    hk.fill_normal(rng);
    hv.fill_normal(rng);
    hu.fill_normal(rng);
    ASSERT_NO_FATAL_FAILURE(upload(dq, hq));
    ASSERT_NO_FATAL_FAILURE(upload(dk, hk));
    ASSERT_NO_FATAL_FAILURE(upload(dv, hv));
    ASSERT_NO_FATAL_FAILURE(alloc(dout, hout.bytes()));
    ASSERT_NO_FATAL_FAILURE(upload(du, hu));
    p.k = 8;
    p.w = 4;
  }
  void call() {
    ASSERT_EQ(cudaSuccess, cudaMemcpy(du.ptr, hu.data(), hu.bytes(), cudaMemcpyHostToDevice));
    bsk::sparsek_attention_forward(device_view(hq, dq), device_view(hk, dk), device_view(hv, dv),
                                   device_view(hu, du), device_view(hout, dout), nullptr, p);
  }
};

TEST_F(SparseKGpuErrors, NonFiniteScores) {
  hu.set({0, 1, 37}, std::nan(""));
  expect_invalid([&] { call(); }, "u", "u[0, 1, 37]");
  hu.set({0, 1, 37}, 0.5);
  hu.set({0, 0, 3}, -INFINITY);
  expect_invalid([&] { call(); }, "u", "must be finite");
  ASSERT_EQ(cudaSuccess, cudaGetLastError());
}

// Soft gates need each (batch, KV head)'s scores to span at most 2^20 on CUDA (the selection's
// float64 tau, relative to a nearby threshold, is lost across spans like 1e17: the GPU fuzz found
// all-zero rows). Hard top-k takes any finite span.
TEST_F(SparseKGpuErrors, ScoresSpanTooWideForSoftGates) {
  hu.set({0, 1, 20}, 1e17);
  expect_invalid([&] { call(); }, "u", "u[0, 1, :] spans more");
  p.gate = bsk::Gate::kValue;
  expect_invalid([&] { call(); }, "u", "span at most 2^20");
  p.gate = bsk::Gate::kNone;
  EXPECT_NO_THROW(call());
  hu.set({0, 1, 20}, 1e6);  // within the limit
  p.gate = bsk::Gate::kKeyValue;
  EXPECT_NO_THROW(call());
  ASSERT_EQ(cudaSuccess, cudaGetLastError());
}

TEST_F(SparseKGpuErrors, ScoresOnHost) {
  TensorView u = device_view(hu, du);
  u.data = hu.data();  // host memory marked cuda:0
  expect_invalid(
      [&] {
        bsk::sparsek_attention_forward(device_view(hq, dq), device_view(hk, dk),
                                       device_view(hv, dv), u, device_view(hout, dout), nullptr, p);
      },
      "u", "is marked as a CUDA tensor but its pointer is");
}

}  // namespace
