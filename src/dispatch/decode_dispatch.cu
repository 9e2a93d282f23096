// Decode dispatch: (dtype, head dim) -> the split-rows decode kernel; and the SparseK cache's
// build and append kernels. Instantiations: decode 2 dtypes x 2 head dims, cache 2 + 2.
#include <algorithm>
#include <mutex>
#include <cmath>
#include <string>

#include "bsk/error.h"
#include "common/cuda_check.h"
#include "dispatch/decode.h"
#include "dispatch/workspace.h"
#include "kernels/decode_attention.cuh"
#include "kernels/sparsek_cache.cuh"

namespace bsk::detail {
namespace {

namespace dk = kernels::decode;
namespace sc = kernels::skcache;

constexpr int kMaxDevices = 64;


// The append half of a fused decode step (sparsek_cache_step_cuda), launched by launch_decode
// right before the attention, which it links to (skcache::StepLink).
template <typename Elem>
struct StepAppend {
  sc::CacheParams<Elem> cache;
  sc::KVSource<Elem> kv;
  sc::ScoreSource u;
  int batch, groups;
};

// Splits of the rows: with fewer groups than resident CTAs, as many as fill the GPU once (batch 1
// is latency-bound: every CTA runs at once); otherwise the fewest whose waves are >= 90% full.
// The last CTA of each group combines the splits (no second kernel). With `step`, the cache
// append runs first and the attention is its programmatic dependent (sm_90+): it is resident and
// loading while the append runs, and the append zeroes the split counters (no memset).
template <typename Elem, int kD>
void launch_decode(const dk::DecodeParams<Elem>& p, int max_rows, int device, cudaStream_t stream,
                   const StepAppend<Elem>* step = nullptr) {
  auto* kernel = dk::decode_attention_kernel<Elem, kD>;
  constexpr int kSmem = dk::DecodeSmem<kD, Elem>::kBytes;
  // The shared-memory attribute and the occupancy, once per device (both are per device).
  static std::mutex mu;
  static int per_sm_of[kMaxDevices] = {};
  int per_sm = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    int& cached = per_sm_of[device < kMaxDevices ? device : 0];
    if (cached == 0 || device >= kMaxDevices) {
      BSK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
      BSK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&cached, kernel, dk::kThreads, kSmem));
      cached = std::max(1, cached);
    }
    per_sm = cached;
  }
  const int sms = device_sm_count(device);
  dk::DecodeParams<Elem> q = p;
  q.head_chunks = (p.group + dk::kHeads - 1) / dk::kHeads;
  const int64_t groups = static_cast<int64_t>(p.batch) * p.heads_kv * q.head_chunks;
  const int64_t slots = static_cast<int64_t>(sms) * per_sm;
  const int max_splits = std::max(1, std::min(dk::kMaxSplits, (max_rows + dk::kChunk - 1) / dk::kChunk));
  int splits = 1;
  if (groups < slots) {
    splits = static_cast<int>(std::min<int64_t>(max_splits, slots / groups));
  } else {
    for (; splits < std::min(max_splits, 8); ++splits) {
      const double waves = static_cast<double>(groups * splits) / slots;
      if (waves / std::ceil(waves) >= 0.9) break;
    }
  }
  q.split_rows = ((max_rows + splits - 1) / splits + dk::kChunk - 1) / dk::kChunk * dk::kChunk;
  if (q.split_rows == 0) q.split_rows = dk::kChunk;  // no rows (Skv = 0): one empty split
  q.splits = splits = std::max(1, (max_rows + q.split_rows - 1) / q.split_rows);
  Workspace ws(stream);
  const size_t o_changed = step ? ws.reserve(static_cast<size_t>(step->groups) * 2 * sizeof(int)) : 0;
  size_t o_part_o = 0, o_part_ml = 0, o_counters = 0;
  if (splits > 1) {
    const int64_t rows = static_cast<int64_t>(splits) * p.batch * p.heads_q;
    o_part_o = ws.reserve(rows * kD * sizeof(float));
    o_part_ml = ws.reserve(rows * 2 * sizeof(float));
    o_counters = ws.reserve(groups * sizeof(int));
  }
  ws.allocate();
  if (splits > 1) {
    q.part_o = ws.at<float>(o_part_o);
    q.part_ml = ws.at<float>(o_part_ml);
    q.counters = ws.at<int>(o_counters);
    if (step == nullptr)
      BSK_CUDA_CHECK(cudaMemsetAsync(q.counters, 0, groups * sizeof(int), stream));
  }
  const dim3 grid(splits, p.heads_kv * q.head_chunks, p.batch);
  // The overlap needs sm_90 and pays within one wave: past it the attention's early loads would
  // only take SMs from the append.
  const bool overlap = step != nullptr && groups * splits <= slots && device_cc(device) >= 90;
  if (step != nullptr) {
    const sc::StepLink link{ws.at<int>(o_changed), q.counters, q.head_chunks};
    sc::cache_append_kernel<Elem><<<step->groups, sc::kAppendThreads, 0, stream>>>(
        step->cache, step->kv, step->u, step->batch, link);
    BSK_CUDA_CHECK_LAUNCH();
    if (overlap) q.changed = link.changed;
  }
  // A trace build (kernels/decode_trace.cuh) prints each step's stamps after its attention.
  auto trace_dump = [&] {
#ifdef BSK_DECODE_TRACE
    if (step != nullptr)
      bsk::kernels::decode_trace::dump_kernel<<<1, 1, 0, stream>>>(grid.x * grid.y * grid.z, step->groups);
#endif
  };
  if (!overlap) {
    kernel<<<grid, dk::kThreads, kSmem, stream>>>(q);
    BSK_CUDA_CHECK_LAUNCH();
    trace_dump();
    return;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(dk::kThreads);
  cfg.dynamicSmemBytes = kSmem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  BSK_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, q));
  BSK_CUDA_CHECK_LAUNCH();
  trace_dump();
}

template <typename Elem>
void run_decode(const DecodeArgs& a, int device, cudaStream_t stream,
                const StepAppend<Elem>* step = nullptr) {
  dk::DecodeParams<Elem> p{};
  p.q = static_cast<const Elem*>(a.q);
  p.q_sb = a.q_stride[0], p.q_sh = a.q_stride[1];
  p.k = static_cast<const Elem*>(a.k);
  p.v = static_cast<const Elem*>(a.v);
  p.k_sb = a.k_stride[0], p.k_sr = a.k_stride[1], p.k_sh = a.k_stride[2];
  p.v_sb = a.v_stride[0], p.v_sr = a.v_stride[1], p.v_sh = a.v_stride[2];
  p.out = static_cast<Elem*>(a.out);
  p.o_sb = a.out_stride[0], p.o_sh = a.out_stride[1];
  p.lse = a.lse;
  p.l_sb = a.lse_stride[0], p.l_sh = a.lse_stride[1];
  p.batch = a.batch, p.heads_q = a.heads_q, p.heads_kv = a.heads_kv;
  p.group = a.heads_q / a.heads_kv;
  p.scale_log2 = a.softmax_scale * 1.4426950408889634f;
  int max_rows = a.rows_dense;
  if (a.cache != nullptr) {
    const SparseKCache& c = *a.cache;
    p.counts = static_cast<const int*>(c.counts.data);
    p.slot_u = static_cast<const float*>(c.slot_u.data);
    p.tau = static_cast<const double*>(c.tau.data);
    p.status = static_cast<const int*>(c.status.data);
    p.window = static_cast<int>(c.window);
    p.slot_rows = static_cast<int>(c.k.shape[2]);
    p.gate = static_cast<int>(c.gate);
    max_rows = static_cast<int>(c.k.shape[2]);
  } else {
    p.rows_dense = a.rows_dense;
    p.gate = 2;
  }
  if (a.head_dim == 64) return launch_decode<Elem, 64>(p, max_rows, device, stream, step);
  return launch_decode<Elem, 128>(p, max_rows, device, stream, step);
}

template <typename Elem>
sc::CacheParams<Elem> cache_params(const SparseKCache& c) {
  sc::CacheParams<Elem> p{};
  p.k = static_cast<Elem*>(c.k.data);
  p.v = static_cast<Elem*>(c.v.data);
  p.slot_u = static_cast<float*>(c.slot_u.data);
  p.cand_u = static_cast<float*>(c.cand_u.data);
  p.cand_pos = static_cast<int*>(c.cand_pos.data);
  p.cand_row = static_cast<int*>(c.cand_row.data);
  p.tau = static_cast<double*>(c.tau.data);
  p.counts = static_cast<int*>(c.counts.data);
  p.status = static_cast<int*>(c.status.data);
  p.heads_kv = static_cast<int>(c.k.shape[1]);
  p.rows = static_cast<int>(c.k.shape[2]);
  p.head_dim = static_cast<int>(c.k.shape[3]);
  p.window = static_cast<int>(c.window);
  p.budget = static_cast<int>(c.budget);
  p.cap = static_cast<int>(c.cand_u.shape[2]);
  p.soft = c.gate != Gate::kNone;
  return p;
}

template <typename Elem>
sc::KVSource<Elem> kv_source(const TensorView& k, const TensorView& v) {
  return {static_cast<const Elem*>(k.data), static_cast<const Elem*>(v.data), k.stride[0],
          k.stride[1], k.stride[2], v.stride[0], v.stride[1], v.stride[2]};
}

sc::ScoreSource score_source(const TensorView& u) {
  return {static_cast<const float*>(u.data), u.stride[0], u.stride[1], u.stride[2]};
}

template <typename Elem>
void run_prefill(const SparseKCache& c, const TensorView& k, const TensorView& v,
                 const TensorView& u, const TensorView* lengths, cudaStream_t stream) {
  const int groups = static_cast<int>(c.k.shape[0] * c.k.shape[1]);
  Workspace ws(stream);
  const size_t o_bad = ws.reserve(2 * sizeof(unsigned long long));  // non-finite, overflow
  ws.allocate();
  auto* bad = ws.at<unsigned long long>(o_bad);
  BSK_CUDA_CHECK(cudaMemsetAsync(bad, 0xff, 2 * sizeof(unsigned long long), stream));
  BSK_CUDA_CHECK(cudaMemsetAsync(c.status.data, 0, 2 * sizeof(int), stream));
  if (groups > 0) {
    sc::cache_prefill_kernel<Elem><<<groups, sc::kBuildThreads, 0, stream>>>(
        cache_params<Elem>(c), kv_source<Elem>(k, v), score_source(u),
        lengths ? static_cast<const int*>(lengths->data) : nullptr, static_cast<int>(k.shape[1]),
        bad);
    BSK_CUDA_CHECK_LAUNCH();
  }
  unsigned long long flags[2];
  BSK_CUDA_CHECK(cudaMemcpyAsync(flags, bad, sizeof(flags), cudaMemcpyDeviceToHost, stream));
  BSK_CUDA_CHECK(cudaStreamSynchronize(stream));
  const int64_t H = c.k.shape[1], L = k.shape[1];
  if (flags[0] != ~0ull) {
    const int64_t e = static_cast<int64_t>(flags[0] - 1), grp = e / L, j = e % L;
    throw InvalidArgument("u", "scores must be finite (no NaN or inf); u[" +
                                   std::to_string(grp / H) + ", " + std::to_string(grp % H) +
                                   ", " + std::to_string(j) + "] is not");
  }
  if (flags[1] != ~0ull) {
    const int64_t grp = static_cast<int64_t>(flags[1] - 1);
    // The state is partly built: mark it broken (as an append's overflow would) before raising.
    const int status[2] = {static_cast<int>(CacheStatus::kCapacityExceeded), static_cast<int>(grp)};
    BSK_CUDA_CHECK(cudaMemcpyAsync(c.status.data, status, sizeof(status), cudaMemcpyHostToDevice, stream));
    BSK_CUDA_CHECK(cudaStreamSynchronize(stream));
    throw InvalidArgument("cand_u", "sequence " + std::to_string(grp / H) + ", KV head " +
                                        std::to_string(grp % H) +
                                        " has more candidate scores above tau than the score "
                                        "capacity " + std::to_string(c.cand_u.shape[2]) +
                                        " (cand_u.shape[2]): allocate a larger capacity");
  }
}

}  // namespace

void decode_attention_cuda(const DecodeArgs& a, int device, cudaStream_t stream) {
  if (a.batch == 0 || a.heads_q == 0) return;
  if (a.dtype == DType::kFloat16) return run_decode<__half>(a, device, stream);
  return run_decode<__nv_bfloat16>(a, device, stream);
}

void sparsek_cache_prefill_cuda(const SparseKCache& c, const TensorView& k, const TensorView& v,
                                const TensorView& u, const TensorView* lengths,
                                cudaStream_t stream) {
  if (c.k.dtype == DType::kFloat16) return run_prefill<__half>(c, k, v, u, lengths, stream);
  return run_prefill<__nv_bfloat16>(c, k, v, u, lengths, stream);
}

void sparsek_cache_append_cuda(const SparseKCache& c, const TensorView& k_new,
                               const TensorView& v_new, const TensorView& u_new,
                               cudaStream_t stream) {
  const int groups = static_cast<int>(c.k.shape[0] * c.k.shape[1]);
  if (groups == 0) return;
  const int batch = static_cast<int>(c.k.shape[0]);
  if (c.k.dtype == DType::kFloat16) {
    sc::cache_append_kernel<__half><<<groups, sc::kAppendThreads, 0, stream>>>(
        cache_params<__half>(c), kv_source<__half>(k_new, v_new), score_source(u_new), batch,
        sc::StepLink{});
  } else {
    sc::cache_append_kernel<__nv_bfloat16><<<groups, sc::kAppendThreads, 0, stream>>>(
        cache_params<__nv_bfloat16>(c), kv_source<__nv_bfloat16>(k_new, v_new),
        score_source(u_new), batch, sc::StepLink{});
  }
  BSK_CUDA_CHECK_LAUNCH();
}

namespace {
template <typename Elem>
void run_step(const SparseKCache& c, const TensorView& k_new, const TensorView& v_new,
              const TensorView& u_new, const DecodeArgs& a, int device, cudaStream_t stream) {
  const StepAppend<Elem> step{cache_params<Elem>(c), kv_source<Elem>(k_new, v_new),
                              score_source(u_new), static_cast<int>(c.k.shape[0]),
                              static_cast<int>(c.k.shape[0] * c.k.shape[1])};
  run_decode<Elem>(a, device, stream, &step);
}
}  // namespace

void sparsek_cache_step_cuda(const SparseKCache& c, const TensorView& k_new,
                             const TensorView& v_new, const TensorView& u_new,
                             const DecodeArgs& a, int device, cudaStream_t stream) {
  if (a.batch == 0 || a.heads_q == 0) return sparsek_cache_append_cuda(c, k_new, v_new, u_new, stream);
  if (a.dtype == DType::kFloat16) return run_step<__half>(c, k_new, v_new, u_new, a, device, stream);
  return run_step<__nv_bfloat16>(c, k_new, v_new, u_new, a, device, stream);
}

}  // namespace bsk::detail
