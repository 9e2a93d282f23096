// Helpers shared by the CUDA tests: GPU detection, device buffers mirroring HostTensors, and
// the accuracy / determinism / error-message checks.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>

#include <cuda_runtime_api.h>

#include "dispatch/dense_fwd.h"  // DensePath: GPU tests run on each kernel family
#include "test_util.h"

namespace bsk_test {

using bsk::DType;
using bsk::TensorView;

constexpr bsk::Device kCuda0{bsk::DeviceType::kCUDA, 0};

// Empty when a GPU is usable, else why not.
inline std::string no_gpu_reason() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  if (n == 0) return "cudaGetDeviceCount found 0 devices";
  return {};
}

#define REQUIRE_GPU()                                                       \
  do {                                                                      \
    const std::string why_ = no_gpu_reason();                               \
    if (!why_.empty()) GTEST_SKIP() << "no CUDA GPU: " << why_;             \
  } while (0)

// Device memory mirroring a HostTensor's storage (same strides, same byte span).
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr) {
      EXPECT_EQ(cudaSuccess, cudaFree(ptr));
    }
  }
};

inline void alloc(DeviceBuffer& d, size_t bytes) {
  d.bytes = bytes;
  ASSERT_EQ(cudaSuccess, cudaMalloc(&d.ptr, bytes == 0 ? 16 : bytes));
}

inline void upload(DeviceBuffer& d, const HostTensor& h) {
  ASSERT_NO_FATAL_FAILURE(alloc(d, h.bytes()));
  if (h.bytes()) {
    ASSERT_EQ(cudaSuccess, cudaMemcpy(d.ptr, h.data(), h.bytes(), cudaMemcpyHostToDevice));
  }
}

inline void poison(DeviceBuffer& d) {
  if (d.bytes) {
    ASSERT_EQ(cudaSuccess, cudaMemset(d.ptr, 0xFF, d.bytes));  // NaN in every dtype
  }
}

inline void download(HostTensor& h, const DeviceBuffer& d) {
  if (h.bytes()) {
    ASSERT_EQ(cudaSuccess, cudaMemcpy(h.data(), d.ptr, h.bytes(), cudaMemcpyDeviceToHost));
  }
}

inline TensorView device_view(HostTensor& h, const DeviceBuffer& d) {
  TensorView t = h.view(kCuda0);
  t.data = d.ptr;
  return t;
}

// Runs call(out_view, lse_view) on poisoned (NaN) device copies of out and lse, synchronizes,
// checks for CUDA errors and copies both back.
template <class Call>
void run_poisoned(const std::string& name, HostTensor& out, HostTensor& lse, Call&& call) {
  DeviceBuffer dout, dlse;
  ASSERT_NO_FATAL_FAILURE(alloc(dout, out.bytes()));
  ASSERT_NO_FATAL_FAILURE(alloc(dlse, lse.bytes()));
  ASSERT_NO_FATAL_FAILURE(poison(dout));
  ASSERT_NO_FATAL_FAILURE(poison(dlse));
  ASSERT_EQ(cudaSuccess, cudaDeviceSynchronize());
  try {
    call(device_view(out, dout), device_view(lse, dlse));
  } catch (const std::exception& e) {
    FAIL() << name << ": threw: " << e.what();
  }
  ASSERT_EQ(cudaSuccess, cudaGetLastError());
  ASSERT_EQ(cudaSuccess, cudaDeviceSynchronize());
  ASSERT_NO_FATAL_FAILURE(download(out, dout));
  ASSERT_NO_FATAL_FAILURE(download(lse, dlse));
}

// Accuracy against the float64 reference (see test_dense_gpu.cpp for the bound): no NaN or
// unwritten (poisoned) element, rows without keys exactly 0, relative error within twice what
// rounding the reference to the dtype costs plus a floor, lse within 1e-3.
template <class NoKey>
void expect_close_to_reference(const HostTensor& out, const HostTensor& lse, const HostTensor& ref,
                               const HostTensor& ref_lse, NoKey&& no_key_row) {
  const DType dt = out.dtype;
  double num = 0.0, den = 0.0, rnd = 0.0;
  int64_t nans = 0, bad_empty = 0;
  for_each_index(ref.shape, [&](const Index& i) {
    const double r = ref.get(i), g = out.get(i);
    nans += std::isnan(g);
    num += (g - r) * (g - r);
    den += r * r;
    const double rr = round_to(dt, r);
    rnd += (rr - r) * (rr - r);
    const bool no_key = no_key_row(i);
    if (no_key && g != 0.0) ++bad_empty;
  });
  EXPECT_EQ(nans, 0) << "output elements left unwritten (poison) or NaN";
  EXPECT_EQ(bad_empty, 0) << "rows with no key must be exactly 0";
  const double err = std::sqrt(num / den), err_round = std::sqrt(rnd / den);
  const double floor = dt == DType::kFloat16 ? 1e-3 : 8e-3;
  EXPECT_LE(err, 2 * err_round + floor) << "relative error " << err << ", rounding alone "
                                        << err_round;
  ::testing::Test::RecordProperty("rel_err", std::to_string(err));

  int64_t bad_lse = 0;
  for_each_index(lse.shape, [&](const Index& i) {
    const double r = ref_lse.get(i), g = lse.get(i);
    const bool ok = std::isinf(r) ? g == r : std::abs(g - r) <= 1e-3;
    if (!ok && bad_lse++ < 5)
      ADD_FAILURE() << "lse[" << i[0] << "," << i[1] << "," << i[2] << "] = " << g << ", ref "
                    << r;
  });
  EXPECT_EQ(bad_lse, 0);
}

// Two runs gave the same bits in every addressed element of out (gaps of a strided out hold
// poison either way) and in lse.
inline void expect_same_bits(const HostTensor& out, const HostTensor& lse, const HostTensor& out2,
                             const HostTensor& lse2) {
  const size_t es = bsk::dtype_size(out.dtype);
  int64_t diff = 0;
  for_each_index(out.shape, [&](const Index& i) {
    const int64_t o = out.offset(i) * static_cast<int64_t>(es);
    diff += std::memcmp(reinterpret_cast<const char*>(out.data()) + o,
                        reinterpret_cast<const char*>(out2.data()) + o,
                        es) != 0;
  });
  EXPECT_EQ(diff, 0) << "two runs differ in out";
  EXPECT_EQ(lse.storage, lse2.storage) << "two runs differ in lse";
}

template <class F>
void expect_invalid(F&& f, const std::string& arg, const std::string& rule) {
  try {
    f();
  } catch (const bsk::InvalidArgument& e) {
    EXPECT_EQ(e.argument(), arg) << e.what();
    EXPECT_NE(std::string(e.what()).find(rule), std::string::npos)
        << "message does not state \"" << rule << "\": " << e.what();
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected bsk::InvalidArgument('" << arg << "'), got: " << e.what();
    return;
  }
  ADD_FAILURE() << "expected bsk::InvalidArgument('" << arg << "'), nothing thrown";
}

// A GPU test parametrized by (case, kernel family). Each case runs once per family (sm80:
// mma.sync, any GPU; sm90: the Hopper kernels, skipped elsewhere), forced through the
// dispatcher's test hook and reset after the test.
template <class Case>
class KernelPathTest
    : public ::testing::TestWithParam<std::tuple<Case, bsk::detail::DensePath>> {
 protected:
  void TearDown() override {
    bsk::detail::set_dense_path_override(bsk::detail::DensePath::kAuto);
  }
  // Selects this test's family, or skips the test (check IsSkipped()) where it cannot run.
  void use_path() {
    const auto path = std::get<1>(this->GetParam());
    if (path == bsk::detail::DensePath::kSm90 && !bsk::detail::dense_sm90_available(0))
      GTEST_SKIP() << "the sm90 kernels need a compute-capability-9.0 GPU and sm_90a code";
    bsk::detail::set_dense_path_override(path);
  }
};

// The test-name generator of a KernelPathTest: the case's name, then _sm80 or _sm90.
template <class Case>
std::string kernel_path_name(
    const ::testing::TestParamInfo<std::tuple<Case, bsk::detail::DensePath>>& info) {
  return std::get<0>(info.param).name +
         (std::get<1>(info.param) == bsk::detail::DensePath::kSm90 ? "_sm90" : "_sm80");
}

#define BSK_KERNEL_PATHS \
  ::testing::Values(bsk::detail::DensePath::kSm80, bsk::detail::DensePath::kSm90)

}  // namespace bsk_test
