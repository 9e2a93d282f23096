// Tuning harness for the dense forward. Two parts:
//   paths     (default): the shipped sm80 and sm90 (Hopper) kernels side by side on the seed and
//             long shapes, TFLOP/s and max|diff| between them, after a float64 CPU check of both
//             on small cases (GPU-free numbers: no cuDNN or PyTorch involved).
//   variants: sm80 configurations the dispatcher does not ship against the one it does.
// Usage: bsk_dense_tune [paths|variants|all|profile] (profile: one sm90 launch per shape, for
// ncu). Built only with -DBSK_BUILD_TUNING=ON; run by
// scripts/gpu_check.sh and scripts/sm90_check.sh.
// Timing: CUDA events around each launch (paths: around 10 back-to-back launches, so host-side
// launch work hides behind the GPU as it does in a model), median of 30 after 10 warm-ups, one
// input set (the large shapes are >= 4x the L2). Numbers from here guide choices; quotable numbers
// come from python -m blackwell_sparsek.bench.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dispatch/dense_fwd_launch.cuh"
#include "dispatch/dense_fwd_sm90_launch.cuh"

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
  set_dense_path_override(DensePath::kSm80);  // the variants are sm80 configurations
  dense_fwd_cuda(a, 0, nullptr);
  BSK_CUDA_CHECK(cudaDeviceSynchronize());
}

// ---- paths: sm80 vs sm90 -----------------------------------------------------------------------

template <typename Elem>
void run_path(DensePath path, const DenseFwdArgs& a) {
  set_dense_path_override(path);
  dense_fwd_cuda(a, 0, nullptr);
}

template <typename Elem>
float median_ms_batched(DensePath path, const DenseFwdArgs& a, int batch) {
  return median_ms([&] {
           for (int i = 0; i < batch; ++i) run_path<Elem>(path, a);
         }) /
         batch;
}

// Float64 reference of one (b, h) on the host, bottom-right causal; out [Sq, D], lse [Sq].
void cpu_attention(const std::vector<double>& q, const std::vector<double>& k,
                   const std::vector<double>& v, int sq, int skv, int d, bool causal,
                   std::vector<double>& out, std::vector<double>& lse) {
  const double scale = 1.0 / std::sqrt(double(d));
  out.assign(size_t(sq) * d, 0.0);
  lse.assign(sq, -INFINITY);
  std::vector<double> s(skv);
  for (int i = 0; i < sq; ++i) {
    const int last = causal ? std::min(skv - 1, i + skv - sq) : skv - 1;
    if (last < 0) continue;
    double mx = -INFINITY;
    for (int j = 0; j <= last; ++j) {
      double acc = 0;
      for (int c = 0; c < d; ++c) acc += q[size_t(i) * d + c] * k[size_t(j) * d + c];
      s[j] = acc * scale;
      mx = std::max(mx, s[j]);
    }
    double sum = 0;
    for (int j = 0; j <= last; ++j) sum += (s[j] = std::exp(s[j] - mx));
    for (int j = 0; j <= last; ++j)
      for (int c = 0; c < d; ++c) out[size_t(i) * d + c] += s[j] / sum * v[size_t(j) * d + c];
    lse[i] = mx + std::log(sum);
  }
}

template <typename Elem>
std::vector<double> download_f64(const Elem* p, int64_t n) {
  std::vector<Elem> h(n);
  BSK_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(Elem), cudaMemcpyDeviceToHost));
  std::vector<double> r(n);
  for (int64_t i = 0; i < n; ++i) r[i] = double(float(h[i]));
  return r;
}

// Small cases (Sq != Skv, GQA, ragged tails): both paths against the float64 reference.
// Returns false on a miss (relative Frobenius error > 1e-2 or an LSE off by > 1e-3).
template <typename Elem>
bool cpu_check(const char* name, int b, int sq, int skv, int hq, int hkv, int d, bool causal,
               DType dt) {
  const Case c{name, b, std::max(sq, skv), hq, hkv, d, causal};
  Buffers<Elem> buf(c, dt);
  DenseFwdArgs a = buf.args;
  a.seqlen_q = sq, a.seqlen_k = skv;
  a.q_stride[0] = a.out_stride[0] = int64_t(sq) * hq * d;
  a.k_stride[0] = a.v_stride[0] = int64_t(skv) * hkv * d;
  a.lse_stride[0] = int64_t(hq) * sq, a.lse_stride[1] = sq;
  const int64_t nq = int64_t(b) * sq * hq * d, nkv = int64_t(b) * skv * hkv * d;
  const auto q = download_f64(buf.q, nq), k = download_f64(buf.k, nkv), v = download_f64(buf.v, nkv);
  bool ok = true;
  for (DensePath path : {DensePath::kSm80, DensePath::kSm90}) {
    BSK_CUDA_CHECK(cudaMemset(buf.out, 0xff, nq * sizeof(Elem)));
    BSK_CUDA_CHECK(cudaMemset(buf.lse, 0xff, int64_t(b) * hq * sq * sizeof(float)));
    run_path<Elem>(path, a);
    BSK_CUDA_CHECK(cudaDeviceSynchronize());
    const auto o = download_f64(buf.out, nq);
    std::vector<float> l(int64_t(b) * hq * sq);
    BSK_CUDA_CHECK(cudaMemcpy(l.data(), buf.lse, l.size() * 4, cudaMemcpyDeviceToHost));
    double num = 0, den = 0, lse_err = 0;
    std::vector<double> qh(size_t(sq) * d), kh(size_t(skv) * d), vh(size_t(skv) * d), ro, rl;
    for (int bi = 0; bi < b; ++bi)
      for (int h = 0; h < hq; ++h) {
        const int hk = h / (hq / hkv);
        for (int i = 0; i < sq; ++i)
          for (int x = 0; x < d; ++x) qh[size_t(i) * d + x] = q[((size_t(bi) * sq + i) * hq + h) * d + x];
        for (int j = 0; j < skv; ++j)
          for (int x = 0; x < d; ++x) {
            kh[size_t(j) * d + x] = k[((size_t(bi) * skv + j) * hkv + hk) * d + x];
            vh[size_t(j) * d + x] = v[((size_t(bi) * skv + j) * hkv + hk) * d + x];
          }
        cpu_attention(qh, kh, vh, sq, skv, d, causal, ro, rl);
        for (int i = 0; i < sq; ++i) {
          for (int x = 0; x < d; ++x) {
            const double g = o[((size_t(bi) * sq + i) * hq + h) * d + x], r = ro[size_t(i) * d + x];
            num += std::isnan(g) ? 1e30 : (g - r) * (g - r);
            den += r * r;
          }
          const double gl = l[(size_t(bi) * hq + h) * sq + i];
          lse_err = std::max(lse_err, std::isinf(rl[i]) ? (gl == rl[i] ? 0.0 : 1e30)
                                                         : std::fabs(gl - rl[i]));
        }
      }
    const double rel = std::sqrt(num / std::max(den, 1e-30));
    const bool pass = rel <= 1e-2 && lse_err <= 1e-3;
    ok = ok && pass;
    std::printf("| %-28s | %-5s | rel err %.2e | max lse err %.2e | %s |\n", name,
                path == DensePath::kSm90 ? "sm90" : "sm80", rel, lse_err, pass ? "ok" : "FAIL");
  }
  return ok;
}

template <typename Elem>
void compare_paths(const Case& c, DType dt) {
  Buffers<Elem> buf(c, dt);
  const int batch = c.s <= 1024 ? 10 : 1;
  DenseFwdArgs a = buf.args;
  a.out = buf.ref;
  const float ms80 = median_ms_batched<Elem>(DensePath::kSm80, a, batch);
  BSK_CUDA_CHECK(cudaMemset(buf.out, 0xff, buf.nq * sizeof(Elem)));
  const float ms90 = median_ms_batched<Elem>(DensePath::kSm90, buf.args, batch);
  BSK_CUDA_CHECK(cudaDeviceSynchronize());
  const float diff = max_abs_diff(buf.out, buf.ref, buf.nq);
  const double tf = flops(c) / 1e12;
  std::printf("| %-34s | %8.4f | %8.4f | %6.1f | %6.1f | %5.2fx | %7.3f | %9.2e |\n", c.name, ms80,
              ms90, tf / (ms80 * 1e-3), tf / (ms90 * 1e-3), ms80 / ms90, ms90 * 1e3 / c.hq, diff);
}

// sm90 configurations (keys per block, stages) beside the shipped one, on one case.
template <class Cfg, typename Elem>
void sm90_variant(const char* label, const Case& c, Buffers<Elem>& buf) {
  BSK_CUDA_CHECK(cudaMemset(buf.out, 0xff, buf.nq * sizeof(Elem)));
  const int batch = c.s <= 1024 ? 10 : 1;
  const float ms = median_ms([&] {
                     for (int i = 0; i < batch; ++i) launch_dense_fwd_sm90<Cfg>(buf.args, nullptr);
                   }) /
                   batch;
  BSK_CUDA_CHECK(cudaDeviceSynchronize());
  const float diff = max_abs_diff(buf.out, buf.ref, buf.nq);
  std::printf("| %-34s | %-31s | %8.4f | %7.1f | %9.2e |\n", c.name, label, ms,
              flops(c) / (ms * 1e-3) / 1e12, diff);
}

template <typename Elem, int D>
void sm90_variants(const Case& c, DType dt) {
  using CE = typename CuteElem<Elem>::type;
  using kernels::sm90::Config;
  Buffers<Elem> buf(c, dt);
  DenseFwdArgs a = buf.args;
  a.out = buf.ref;
  run_path<Elem>(DensePath::kSm80, a);  // reference output: the sm80 kernel
  // The shipped configurations (src/dispatch/dense_fwd_dispatch.cu) and one change at a time.
  // Caution: in one process the variant measured fifth came out 10% faster than the first
  // twice, whichever it was (tuning.md, run 6); compare pairs measured in both orders.
  if constexpr (D == 64) {
    sm90_variant<Config<CE, D, 128, 2, false, false, 192>>("BM 192 (shipped non-causal)", c, buf);
    sm90_variant<Config<CE, D, 128, 2, false, true, 128>>("BM 128 (shipped causal)", c, buf);
    sm90_variant<Config<CE, D, 128, 2, false, false, 192, false>>("BM 192, round robin", c, buf);
    sm90_variant<Config<CE, D, 128, 3, false, false, 192>>("BM 192, 3 stages", c, buf);
    sm90_variant<Config<CE, D, 128, 3, false, true, 128>>("BM 128, 3 stages", c, buf);
    sm90_variant<Config<CE, D, 128, 2, false, false, 192>>("BM 192 (again)", c, buf);
  } else {
    sm90_variant<Config<CE, D, 128, 2>>("shipped", c, buf);
    sm90_variant<Config<CE, D, 128, 2, false, true, 128, false>>("round robin (no snake)", c, buf);
    sm90_variant<Config<CE, D, 128, 2, true>>("ping-pong", c, buf);
    sm90_variant<Config<CE, D, 128, 2, false, false>>("no tile overlap", c, buf);
    sm90_variant<Config<CE, D, 128, 2>>("shipped (again)", c, buf);
  }
}

int paths() {
  if (!dense_sm90_available(0)) {
    std::printf("sm90 kernel not available on this GPU/binary; paths skipped\n");
    return 0;
  }
  std::printf("| small case vs float64 CPU | path | error | lse | |\n|---|---|---|---|---|\n");
  bool ok = true;
  ok &= cpu_check<__half>("fp16 D64 Sq200 Skv333 GQA4/2", 2, 200, 333, 4, 2, 64, false,
                          DType::kFloat16);
  ok &= cpu_check<__half>("fp16 D64 Sq333 Skv200 causal", 1, 333, 200, 2, 1, 64, true,
                          DType::kFloat16);
  ok &= cpu_check<__nv_bfloat16>("bf16 D128 S300 causal MQA", 1, 300, 300, 4, 1, 128, true,
                                 DType::kBFloat16);
  ok &= cpu_check<__nv_bfloat16>("bf16 D128 Sq77 Skv500", 2, 77, 500, 2, 2, 128, false,
                                 DType::kBFloat16);
  std::printf("\n| case | sm80 ms | sm90 ms | sm80 TFLOP/s | sm90 TFLOP/s | speedup | sm90 us/head | "
              "max|diff| |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
  static char names[32][64];
  int ni = 0;
  for (int h : {8, 32, 96, 128}) {
    std::snprintf(names[ni], 64, "seed B16 S512 H%d D64 fp16", h);
    compare_paths<__half>(Case{names[ni++], 16, 512, h, h, 64, false}, DType::kFloat16);
  }
  for (bool causal : {false, true})
    for (int hkv : {32, 8})
      for (int s : {1024, 4096, 16384, 32768}) {
        std::snprintf(names[ni], 64, "long B%d S%d 32/%d D128%s", 32768 / s, s, hkv,
                      causal ? " causal" : "");
        compare_paths<__nv_bfloat16>(Case{names[ni++], 32768 / s, s, 32, hkv, 128, causal},
                                     DType::kBFloat16);
      }
  std::printf("\n| case | sm90 config | ms | TFLOP/s | max|diff| vs sm80 |\n|---|---|---:|---:|---:|\n");
  sm90_variants<__half, 64>(Case{"seed B16 S512 H96 D64 fp16", 16, 512, 96, 96, 64, false},
                            DType::kFloat16);
  sm90_variants<__half, 64>(Case{"B16 S1024 H32 D64 fp16 causal", 16, 1024, 32, 32, 64, true},
                            DType::kFloat16);
  sm90_variants<__nv_bfloat16, 128>(Case{"long B8 S4096 32/8 D128", 8, 4096, 32, 8, 128, false},
                                    DType::kBFloat16);
  sm90_variants<__nv_bfloat16, 128>(
      Case{"long B2 S16384 32/8 D128 causal", 2, 16384, 32, 8, 128, true}, DType::kBFloat16);
  sm90_variants<__nv_bfloat16, 128>(
      Case{"long B32 S1024 32/32 D128 causal", 32, 1024, 32, 32, 128, true}, DType::kBFloat16);
  sm90_variants<__nv_bfloat16, 128>(
      Case{"long B1 S32768 32/32 D128 causal", 1, 32768, 32, 32, 128, true}, DType::kBFloat16);
  set_dense_path_override(DensePath::kAuto);
  return ok ? 0 : 1;
}

int variants() {
  std::printf("\n| case | config (BM,BN,warps,QinRegs,stages) | ms | TFLOP/s | max|diff| vs shipped |\n");
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

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "paths";
  int rc = 0;
  if (what == "profile") {  // one sm90 launch per shape, for ncu
    const Case seed{"seed", 16, 512, 96, 96, 64, false};
    Buffers<__half> b1(seed, DType::kFloat16);
    run_path<__half>(DensePath::kSm90, b1.args);
    const Case lc{"long causal", 8, 4096, 32, 8, 128, true};
    Buffers<__nv_bfloat16> b2(lc, DType::kBFloat16);
    run_path<__nv_bfloat16>(DensePath::kSm90, b2.args);
    BSK_CUDA_CHECK(cudaDeviceSynchronize());
    return 0;
  }
  if (what == "paths" || what == "all") rc |= paths();
  if (what == "variants" || what == "all") rc |= variants();
  if (what != "paths" && what != "variants" && what != "all") {
    std::fprintf(stderr, "usage: bsk_dense_tune [paths|variants|all]\n");
    return 2;
  }
  return rc;
}
