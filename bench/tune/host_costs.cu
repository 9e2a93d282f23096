// Host cost of each CUDA runtime/driver call a small attention call can make, one at a time, on
// an idle GPU: the evidence behind the lean call path (issue 5). Stand-alone (no libbsk):
//   nvcc -O2 -std=c++17 -o host_costs bench/tune/host_costs.cu && ./host_costs
// Prints the median and 90th percentile of N calls of each, in nanoseconds.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

#define CHECK(x)                                                                      \
  do {                                                                                \
    cudaError_t e_ = (x);                                                             \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

__global__ void empty_kernel(int) {}
__global__ void big_smem_kernel(int x) {
  extern __shared__ int smem[];
  if (x < 0) smem[threadIdx.x] = x;
}

template <class F>
void time_it(const char* name, F&& f, int n = 2000) {
  std::vector<double> ns(n);
  for (int i = 0; i < 50; ++i) f();
  for (int i = 0; i < n; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const auto t1 = std::chrono::steady_clock::now();
    ns[i] = std::chrono::duration<double, std::nano>(t1 - t0).count();
  }
  std::sort(ns.begin(), ns.end());
  std::printf("%-58s %9.0f %9.0f\n", name, ns[n / 2], ns[n * 9 / 10]);
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
using ReplaceAddress = CUresult (*)(CUtensorMap*, void*);

}  // namespace

int main() {
  CHECK(cudaSetDevice(0));
  CHECK(cudaFree(nullptr));
  void* buf = nullptr;
  CHECK(cudaMalloc(&buf, 1 << 24));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::printf("%-58s %9s %9s\n", "call (host time, idle GPU)", "median ns", "p90 ns");

  time_it("cudaGetDeviceCount", [] { int c; cudaGetDeviceCount(&c); });
  time_it("cudaGetDevice", [] { int d; cudaGetDevice(&d); });
  time_it("cudaSetDevice (already current)", [] { cudaSetDevice(0); });
  time_it("cudaPointerGetAttributes (device pointer)", [&] {
    cudaPointerAttributes a;
    cudaPointerGetAttributes(&a, buf);
  });
  time_it("cudaDeviceGetAttribute (SM count)", [] {
    int v;
    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0);
  });
  time_it("cudaFuncSetAttribute (max dynamic smem 200 KB)", [] {
    cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
  });
  time_it("cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)", [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult r;
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &r);
  });

  void* fn = nullptr;
  cudaDriverEntryPointQueryResult r;
  CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                         &r));
  const auto encode = reinterpret_cast<EncodeTiled>(fn);
  CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapReplaceAddress", &fn, 12000,
                                         cudaEnableDefault, &r));
  const auto replace = reinterpret_cast<ReplaceAddress>(fn);
  // A (seq, d, heads, batch) fp16 view like the dense kernel's K: S=128, D=64, H=8, B=1.
  const cuuint64_t dims[4] = {64, 128, 8, 1};
  const cuuint64_t strides[3] = {8 * 64 * 2, 64 * 2, 128 * 8 * 64 * 2};
  const cuuint32_t box[4] = {64, 128, 1, 1}, estr[4] = {1, 1, 1, 1};
  CUtensorMap map;
  time_it("cuTensorMapEncodeTiled (cached entry point)", [&] {
    encode(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, buf, dims, strides, box, estr,
           CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
           CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  });
  time_it("cuTensorMapReplaceAddress (cached entry point)", [&] { replace(&map, buf); });

  time_it("launch empty kernel <<<1,32>>> (stream)", [&] { empty_kernel<<<1, 32, 0, stream>>>(0); },
          200);
  CHECK(cudaStreamSynchronize(stream));
  time_it("launch + cudaStreamSynchronize (round trip)", [&] {
    empty_kernel<<<1, 32, 0, stream>>>(0);
    cudaStreamSynchronize(stream);
  });
  time_it("cudaGetLastError", [] { cudaGetLastError(); });
  CHECK(cudaFree(buf));
  return 0;
}
