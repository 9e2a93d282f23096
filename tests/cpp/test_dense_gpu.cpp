// bsk::attention_forward on CUDA tensors against the float64 CPU reference. Every test skips
// (GTEST_SKIP) when cudaGetDeviceCount fails or finds no GPU.
//
// Accuracy bound. Inputs are drawn, rounded to the dtype, and the reference sees exactly those
// rounded values, so the only differences come from the kernel's arithmetic. With
// err(x) = ||x - ref|| / ||ref|| (Frobenius norm over the whole output) and err_round =
// err(round_to_dtype(ref)), the error the output rounding alone must cause, we require
//     err(gpu) <= 2 * err_round + floor,   floor = 1e-3 (float16), 8e-3 (bfloat16).
// Why: a flash-attention kernel rounds its output once (err_round) and additionally rounds the
// softmax probabilities P to the dtype before the tensor-core P.V product, which perturbs each
// output by a weighted average of relative errors of the same unit roundoff u, i.e. at most about
// another err_round. Accumulations are float32 (error ~1e-7, negligible). The floor, about 2u
// (u = 2^-11 for float16, 2^-8 for bfloat16), keeps the bound meaningful when err_round happens
// to be small (e.g. many exactly representable outputs); a kernel with a real bug (a wrong mask,
// a missed tile, a wrong scale) is off by orders of magnitude more. LSE is float32 from float32
// scores: within 1e-3 absolute.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// The bsk headers first: include/bsk/tensor.h spells bsk::Stream as `struct CUstream_st*` inside
// namespace bsk, which names ::CUstream_st only when a CUDA header came before it. libbsk's own
// sources see bsk::CUstream_st, so this order is the one that links (see
// StreamType.IsCudaStreamT below).
#include "test_util.h"

#include <cuda_runtime_api.h>

#include "gpu_test_util.h"

namespace {

using namespace bsk_test;
using bsk::DType;
using bsk::TensorView;

struct GpuCase {
  std::string name;
  int64_t B, Sq, Skv, Hq, Hkv, D;
  bool causal;
  DType dt;
  bool bhsd = false;  // BHSD buffers viewed as BSHD (non-contiguous)
};

void PrintTo(const GpuCase& c, std::ostream* os) { *os << c.name; }

HostTensor make_t(const GpuCase& c, int64_t S, int64_t H) {
  return c.bhsd ? make_bhsd_as_bshd(c.dt, c.B, S, H, c.D) : HostTensor(c.dt, {c.B, S, H, c.D});
}

// One launch on poisoned out/lse.
void run_gpu(const GpuCase& c, HostTensor& q, HostTensor& k, HostTensor& v, DeviceBuffer& dq,
             DeviceBuffer& dk, DeviceBuffer& dv, HostTensor& out, HostTensor& lse,
             const bsk::AttentionParams& p) {
  run_poisoned(c.name, out, lse, [&](const TensorView& ov, const TensorView& lv) {
    bsk::attention_forward(device_view(q, dq), device_view(k, dk), device_view(v, dv), ov, &lv, p);
  });
}

void check_case(const GpuCase& c) {
  SCOPED_TRACE(c.name);
  std::mt19937_64 rng(std::hash<std::string>{}(c.name));
  HostTensor q = make_t(c, c.Sq, c.Hq), k = make_t(c, c.Skv, c.Hkv), v = make_t(c, c.Skv, c.Hkv);
  q.fill_normal(rng);
  k.fill_normal(rng);
  v.fill_normal(rng);
  DeviceBuffer dq, dk, dv;
  ASSERT_NO_FATAL_FAILURE(upload(dq, q));
  ASSERT_NO_FATAL_FAILURE(upload(dk, k));
  ASSERT_NO_FATAL_FAILURE(upload(dv, v));

  bsk::AttentionParams p;
  p.causal = c.causal;  // softmax_scale unset: 1/sqrt(D), resolved by the front door
  HostTensor out = make_t(c, c.Sq, c.Hq), lse(DType::kFloat32, {c.B, c.Hq, c.Sq});
  ASSERT_NO_FATAL_FAILURE(run_gpu(c, q, k, v, dq, dk, dv, out, lse, p));

  // Reference in float64 output, from the same (rounded) inputs.
  HostTensor ref(DType::kFloat64, {c.B, c.Sq, c.Hq, c.D}), ref_lse(DType::kFloat32, {c.B, c.Hq, c.Sq});
  bsk::AttentionParams rp = p;
  rp.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.D)));
  const TensorView rlv = ref_lse.view();
  bsk::ref::attention_forward(q.view(), k.view(), v.view(), ref.view(), &rlv, rp);

  expect_close_to_reference(out, lse, ref, ref_lse, [&](const Index& i) {
    return c.causal && c.Skv - c.Sq + i[1] < 0;
  });

  // Deterministic: a second launch gives the same bits.
  HostTensor out2 = make_t(c, c.Sq, c.Hq), lse2(DType::kFloat32, {c.B, c.Hq, c.Sq});
  ASSERT_NO_FATAL_FAILURE(run_gpu(c, q, k, v, dq, dk, dv, out2, lse2, p));
  expect_same_bits(out, lse, out2, lse2);
}

// include/bsk/tensor.h promises bsk::Stream is "the same type as cudaStream_t", so a caller can
// pass a cudaStream_t. Needs no GPU. Fails while tensor.h declares CUstream_st inside namespace
// bsk instead of at global scope.
TEST(StreamType, IsCudaStreamT) {
  EXPECT_TRUE((std::is_same_v<bsk::Stream, cudaStream_t>))
      << "bsk::Stream is not cudaStream_t: a cudaStream_t argument will not convert, and code "
         "that includes a CUDA header before bsk/tensor.h references a different symbol";
}

using DenseGpuTest = KernelPathTest<GpuCase>;

TEST_P(DenseGpuTest, MatchesReference) {
  REQUIRE_GPU();
  use_path();
  if (!IsSkipped()) check_case(std::get<0>(GetParam()));
}

const GpuCase kGpuCases[] = {
    {"Seed_fp16", 2, 512, 512, 4, 4, 64, false, DType::kFloat16},
    {"Seed_causal_fp16", 2, 512, 512, 4, 4, 64, true, DType::kFloat16},
    {"D128_bf16", 1, 384, 384, 4, 4, 128, false, DType::kBFloat16},
    {"D128_causal_bf16", 1, 384, 384, 4, 4, 128, true, DType::kBFloat16},
    {"S1_fp16", 2, 1, 1, 2, 2, 64, false, DType::kFloat16},
    {"S1_causal_bf16", 2, 1, 1, 2, 2, 128, true, DType::kBFloat16},
    {"S17_causal_fp16", 1, 17, 17, 2, 2, 128, true, DType::kFloat16},
    {"S17_bf16", 2, 17, 17, 2, 1, 64, false, DType::kBFloat16},
    {"S1000_fp16", 1, 1000, 1000, 2, 2, 64, false, DType::kFloat16},
    {"S1000_causal_bf16", 1, 1000, 1000, 2, 2, 128, true, DType::kBFloat16},
    {"SqLtSkv_causal_fp16", 1, 300, 700, 2, 2, 128, true, DType::kFloat16},
    {"SqGtSkv_causal_bf16", 1, 700, 300, 2, 2, 64, true, DType::kBFloat16},
    {"SqLtSkv_bf16", 1, 65, 333, 2, 1, 64, false, DType::kBFloat16},
    {"SqGtSkv_fp16", 1, 333, 65, 2, 1, 128, false, DType::kFloat16},
    {"GQA32to8_causal_fp16", 1, 256, 256, 32, 8, 128, true, DType::kFloat16},
    {"GQA32to8_bf16", 1, 200, 200, 32, 8, 64, false, DType::kBFloat16},
    {"MQA_causal_bf16", 1, 130, 130, 8, 1, 64, true, DType::kBFloat16},
    {"BHSD_causal_fp16", 2, 200, 200, 4, 2, 64, true, DType::kFloat16, true},
    {"BHSD_bf16", 1, 150, 190, 4, 4, 128, false, DType::kBFloat16, true},
    // More tiles (128 or 192 query rows) than an H100 has SMs (132), so the persistent sm90 kernel's
    // CTAs run several tiles each and the overlap from one tile into the next is exercised,
    // next to tiles with one key block and with none (rows that see no key).
    {"ManyTiles_causal_bf16", 2, 1000, 1000, 12, 4, 128, true, DType::kBFloat16},
    {"ManyTiles_SqGtSkv_causal_fp16", 3, 700, 300, 16, 4, 64, true, DType::kFloat16},
    {"ManyTiles_fp16", 4, 520, 520, 12, 12, 64, false, DType::kFloat16},
};

INSTANTIATE_TEST_SUITE_P(Cases, DenseGpuTest,
                         ::testing::Combine(::testing::ValuesIn(kGpuCases), BSK_KERNEL_PATHS),
                         kernel_path_name<GpuCase>);

// ---- CUDA-side argument errors (need a GPU: cudaPointerGetAttributes must work) --------------

class DenseGpuErrors : public ::testing::Test {
 protected:
  static constexpr int64_t B = 1, S = 32, H = 2, D = 64;
  HostTensor hq{DType::kFloat16, {B, S, H, D}}, hk{DType::kFloat16, {B, S, H, D}},
      hv{DType::kFloat16, {B, S, H, D}}, hout{DType::kFloat16, {B, S, H, D}},
      hlse{DType::kFloat32, {B, H, S}};
  DeviceBuffer dq, dk, dv, dout, dlse;
  TensorView q, k, v, out, lse;
  bsk::AttentionParams p;

  void SetUp() override {
    REQUIRE_GPU();
    std::mt19937_64 rng(3);
    hq.fill_normal(rng);
    hk.fill_normal(rng);
    hv.fill_normal(rng);
    ASSERT_NO_FATAL_FAILURE(upload(dq, hq));
    ASSERT_NO_FATAL_FAILURE(upload(dk, hk));
    ASSERT_NO_FATAL_FAILURE(upload(dv, hv));
    ASSERT_NO_FATAL_FAILURE(alloc(dout, hout.bytes()));
    ASSERT_NO_FATAL_FAILURE(alloc(dlse, hlse.bytes()));
    q = device_view(hq, dq);
    k = device_view(hk, dk);
    v = device_view(hv, dv);
    out = device_view(hout, dout);
    lse = device_view(hlse, dlse);
  }
  void call() { bsk::attention_forward(q, k, v, out, &lse, p); }
};

TEST_F(DenseGpuErrors, HostPointerMarkedCuda) {
  q.data = hq.data();  // host memory, marked cuda:0
  expect_invalid([&] { call(); }, "q", "is marked as a CUDA tensor but its pointer is");
  q = device_view(hq, dq);
  k.data = hk.data();
  expect_invalid([&] { call(); }, "k", "is marked as a CUDA tensor but its pointer is");
  k = device_view(hk, dk);
  lse.data = hlse.data();
  expect_invalid([&] { call(); }, "lse", "is marked as a CUDA tensor but its pointer is");
  ASSERT_EQ(cudaSuccess, cudaGetLastError()) << "a failed pointer query left a sticky error";
}

TEST_F(DenseGpuErrors, MisalignedPointer) {
  out.data = static_cast<char*>(dout.ptr) + 2;  // 2-byte aligned only
  out.shape[1] = S - 1;                          // keep within the allocation
  q.shape[1] = S - 1;
  lse.shape[2] = S - 1;
  expect_invalid([&] { call(); }, "out", "16-byte aligned");
}

TEST_F(DenseGpuErrors, RowStrideNotMultipleOf8) {
  // v's sequence stride becomes H*D - 4 = 124 elements (248 bytes): rows no longer start on
  // 16-byte boundaries. Sequence length shrunk so the view stays inside the allocation.
  v.stride[1] = H * D - 4;
  v.shape[1] = S - 2;
  k.shape[1] = S - 2;
  expect_invalid([&] { call(); }, "v", "multiples of 8 elements");
}

TEST_F(DenseGpuErrors, WrongDeviceIndex) {
  int n = 0;
  ASSERT_EQ(cudaSuccess, cudaGetDeviceCount(&n));
  if (n < 2) GTEST_SKIP() << "needs two GPUs";
  for (TensorView* t : {&q, &k, &v, &out, &lse}) t->device.index = 1;
  expect_invalid([&] { call(); }, "q", "pointer lives on cuda:0");
}

}  // namespace
