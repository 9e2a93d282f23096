// Tuning harness for the dense forward: times kernel configurations the dispatcher does not ship
// against the one it does, on the seed and long shapes, and checks each variant's output against
// the shipped kernel's. Built only with -DBSK_BUILD_TUNING=ON; run by scripts/gpu_check.sh.
// Timing: CUDA events around each launch, median of 30 after 10 warm-ups, one input set (the
// shapes are all >= 4x the L2). Numbers from here guide choices; quotable numbers come from
// python -m blackwell_sparsek.bench.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "dispatch/dense_fwd_launch.cuh"

using namespace bsk;
using namespace bsk::detail;

namespace {

template <typename Elem>
__global__ void fill_random(Elem* x, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
    uint32_t g = h * 747796405u + 2891336453u;
    g ^= g >> 17, g *= 0xed5ad4bbu, g ^= g >> 11;
    // Sum of two uniforms minus one: zero-mean, never all zeros; good enough for timing.
    const float u = (h >> 8) * (1.0f / 16777216.0f) + (g >> 8) * (1.0f / 16777216.0f) - 1.0f;
    x[i] = static_cast<Elem>(u * 1.7f);
  }
}

struct Case {
  const char* name;
  int b, s, hq, hkv, d;
  bool causal;
};

template <typename Elem>
struct Buffers {
  Elem *q, *k, *v, *out, *ref;
  float* lse;
  int64_t nq, nkv;
  DenseFwdArgs args{};
  Buffers(const Case& c, DType dt) {
    nq = int64_t(c.b) * c.s * c.hq * c.d;
    nkv = int64_t(c.b) * c.s * c.hkv * c.d;
    BSK_CUDA_CHECK(cudaMalloc(&q, nq * sizeof(Elem)));
    BSK_CUDA_CHECK(cudaMalloc(&k, nkv * sizeof(Elem)));
    BSK_CUDA_CHECK(cudaMalloc(&v, nkv * sizeof(Elem)));
    BSK_CUDA_CHECK(cudaMalloc(&out, nq * sizeof(Elem)));
    BSK_CUDA_CHECK(cudaMalloc(&ref, nq * sizeof(Elem)));
    BSK_CUDA_CHECK(cudaMalloc(&lse, int64_t(c.b) * c.hq * c.s * sizeof(float)));
    fill_random<<<1024, 256>>>(q, nq, 1u);
    fill_random<<<1024, 256>>>(k, nkv, 2u);
    fill_random<<<1024, 256>>>(v, nkv, 3u);
    BSK_CUDA_CHECK_LAUNCH();
    DenseFwdArgs& a = args;
    a.q = q, a.k = k, a.v = v, a.out = out, a.lse = lse;
    const int64_t qs[3] = {int64_t(c.s) * c.hq * c.d, int64_t(c.hq) * c.d, c.d};
    const int64_t ks[3] = {int64_t(c.s) * c.hkv * c.d, int64_t(c.hkv) * c.d, c.d};
    for (int i = 0; i < 3; ++i) {
      a.q_stride[i] = a.out_stride[i] = qs[i];
      a.k_stride[i] = a.v_stride[i] = ks[i];
    }
    a.lse_stride[0] = int64_t(c.hq) * c.s, a.lse_stride[1] = c.s, a.lse_stride[2] = 1;
    a.batch = c.b, a.seqlen_q = a.seqlen_k = c.s, a.heads_q = c.hq, a.heads_kv = c.hkv;
    a.head_dim = c.d, a.softmax_scale = 1.0f / std::sqrt(float(c.d)), a.causal = c.causal;
    a.dtype = dt;
  }
  ~Buffers() {
    cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(out), cudaFree(ref), cudaFree(lse);
  }
};

template <typename Elem>
float max_abs_diff(const Elem* a, const Elem* b, int64_t n) {
  std::vector<Elem> ha(n), hb(n);
  BSK_CUDA_CHECK(cudaMemcpy(ha.data(), a, n * sizeof(Elem), cudaMemcpyDeviceToHost));
  BSK_CUDA_CHECK(cudaMemcpy(hb.data(), b, n * sizeof(Elem), cudaMemcpyDeviceToHost));
  float m = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float d = std::fabs(float(ha[i]) - float(hb[i]));
    m = std::isnan(d) ? INFINITY : std::max(m, d);
  }
  return m;
}

template <typename Fn>
float median_ms(Fn&& fn) {
  cudaEvent_t e0, e1;
  BSK_CUDA_CHECK(cudaEventCreate(&e0));
  BSK_CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 10; ++i) fn();
  std::vector<float> t;
  for (int i = 0; i < 30; ++i) {
    BSK_CUDA_CHECK(cudaEventRecord(e0));
    fn();
    BSK_CUDA_CHECK(cudaEventRecord(e1));
    BSK_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0.f;
    BSK_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  cudaEventDestroy(e0), cudaEventDestroy(e1);
  return t[t.size() / 2];
}

double flops(const Case& c) {
  const double kavg = c.causal ? (c.s + 1) / 2.0 : c.s;
  return 4.0 * c.b * c.hq * c.s * kavg * c.d;
}

template <class Cfg>
void run_variant(const char* label, const Case& c, Buffers<typename Cfg::Elem>& buf) {
  cudaMemset(buf.out, 0xff, buf.nq * sizeof(typename Cfg::Elem));
  const float ms = median_ms([&] { launch_dense_fwd_sm80<Cfg>(buf.args, nullptr); });
  BSK_CUDA_CHECK(cudaDeviceSynchronize());
  const float diff = max_abs_diff(buf.out, buf.ref, buf.nq);
  std::printf("| %-28s | %-34s | %8.4f | %7.1f | %9.2e |\n", c.name, label, ms,
              flops(c) / (ms * 1e-3) / 1e12, diff);
}

template <typename Elem, int D>
using Cfg = kernels::DenseFwdConfig<Elem, D, 128, 64, 4, D == 64>;

template <typename Elem>
void shipped_reference(Buffers<Elem>& buf) {
  DenseFwdArgs a = buf.args;
  a.out = buf.ref;
  dense_fwd_cuda(a, 0, nullptr);
  BSK_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace

int main() {
  std::printf("| case | config (BM,BN,warps,QinRegs,stages) | ms | TFLOP/s | max|diff| vs shipped |\n");
  std::printf("|---|---|---:|---:|---:|\n");
  using namespace bsk::kernels;
  {
    const Case c{"seed B16 S512 H96 D64 fp16", 16, 512, 96, 96, 64, false};
    Buffers<__half> buf(c, DType::kFloat16);
    shipped_reference(buf);
    using E = __half;
    run_variant<DenseFwdConfig<E, 64, 128, 64, 4, true, 2>>("128,64,4,Q,2 (shipped)", c, buf);
    run_variant<DenseFwdConfig<E, 64, 128, 64, 4, true, 1>>("128,64,4,Q,1", c, buf);
    run_variant<DenseFwdConfig<E, 64, 64, 64, 4, true, 2>>("64,64,4,Q,2", c, buf);
    run_variant<DenseFwdConfig<E, 64, 64, 128, 4, true, 2>>("64,128,4,Q,2", c, buf);
    run_variant<DenseFwdConfig<E, 64, 128, 64, 8, true, 2>>("128,64,8,Q,2", c, buf);
    run_variant<DenseFwdConfig<E, 64, 128, 128, 8, true, 2>>("128,128,8,Q,2", c, buf);
  }
  for (bool causal : {false, true}) {
    const Case c{causal ? "long B8 S4096 32/8 D128 causal" : "long B8 S4096 32/8 D128", 8, 4096,
                 32, 8, 128, causal};
    Buffers<__nv_bfloat16> buf(c, DType::kBFloat16);
    shipped_reference(buf);
    using E = __nv_bfloat16;
    run_variant<DenseFwdConfig<E, 128, 128, 64, 4, false, 1>>("128,64,4,-,1 (shipped)", c, buf);
    run_variant<DenseFwdConfig<E, 128, 64, 64, 4, true, 1>>("64,64,4,Q,1", c, buf);
    run_variant<DenseFwdConfig<E, 128, 64, 64, 4, true, 2>>("64,64,4,Q,2", c, buf);
    run_variant<DenseFwdConfig<E, 128, 64, 128, 4, true, 1>>("64,128,4,Q,1", c, buf);
    run_variant<DenseFwdConfig<E, 128, 64, 128, 4, true, 2>>("64,128,4,Q,2", c, buf);
    run_variant<DenseFwdConfig<E, 128, 128, 64, 8, true, 1>>("128,64,8,Q,1", c, buf);
    run_variant<DenseFwdConfig<E, 128, 128, 64, 8, true, 2>>("128,64,8,Q,2", c, buf);
    run_variant<DenseFwdConfig<E, 128, 128, 128, 8, true, 2>>("128,128,8,Q,2", c, buf);
  }
  return 0;
}
