// One dense attention forward through the installed libbsk, checked against its float64 CPU
// reference. Runs on the GPU when there is one; otherwise says so and exits 0 after checking the
// CPU path.
#include <bsk/bsk.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  const int64_t B = 2, Sq = 300, Skv = 300, Hq = 8, Hkv = 2, D = 64;
  const int64_t nq = B * Sq * Hq * D, nkv = B * Skv * Hkv * D;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<__half> q(nq), k(nkv), v(nkv), out(nq), ref(nq);
  for (auto& x : q) x = __float2half(normal(rng));
  for (auto& x : k) x = __float2half(normal(rng));
  for (auto& x : v) x = __float2half(normal(rng));

  bsk::AttentionParams params;
  params.causal = true;
  const bsk::Device cpu{bsk::DeviceType::kCPU, 0};
  auto view = [](void* p, bsk::Device dev, int64_t S, int64_t H) {
    return bsk::make_view(p, bsk::DType::kFloat16, dev, {2, S, H, 64});
  };
  bsk::ref::attention_forward(view(q.data(), cpu, Sq, Hq), view(k.data(), cpu, Skv, Hkv),
                              view(v.data(), cpu, Skv, Hkv), view(ref.data(), cpu, Sq, Hq),
                              nullptr, {true, 1.0f / std::sqrt(64.0f)});

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("bsk_example: libbsk %s found; no CUDA GPU here, so only the CPU reference ran\n",
                BSK_VERSION);
    return 0;
  }
  const bsk::Device gpu{bsk::DeviceType::kCUDA, 0};
  void *dq, *dk, *dv, *dout;
  cudaMalloc(&dq, nq * 2);
  cudaMalloc(&dk, nkv * 2);
  cudaMalloc(&dv, nkv * 2);
  cudaMalloc(&dout, nq * 2);
  cudaMemcpy(dq, q.data(), nq * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dk, k.data(), nkv * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dv, v.data(), nkv * 2, cudaMemcpyHostToDevice);
  try {
    bsk::attention_forward(view(dq, gpu, Sq, Hq), view(dk, gpu, Skv, Hkv), view(dv, gpu, Skv, Hkv),
                           view(dout, gpu, Sq, Hq), nullptr, params, /*stream=*/nullptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bsk_example: %s\n", e.what());
    return 1;
  }
  if (cudaMemcpy(out.data(), dout, nq * 2, cudaMemcpyDeviceToHost) != cudaSuccess) return 1;
  double num = 0, den = 0;
  for (int64_t i = 0; i < nq; ++i) {
    const double d = __half2float(out[i]) - __half2float(ref[i]);
    num += d * d;
    den += double(__half2float(ref[i])) * __half2float(ref[i]);
  }
  const double rel = std::sqrt(num / den);
  std::printf("bsk_example: GPU vs float64 reference, relative error %.3e\n", rel);
  cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dout);
  return rel < 2e-3 ? 0 : 1;
}
