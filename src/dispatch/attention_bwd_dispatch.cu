// Backward on CUDA (kernels/attention_bwd_sm80.cuh): delta = rowsum(dO * O); for SparseK the
// forward's selection plan again (recomputed, not saved: the forward stays allocation-light) and
// the per-key row intervals; then dQ and dK/dV; then du. Four instantiations per kernel
// (2 dtypes x 2 head dims); the sm80 kernels run on every GPU of compute capability 8.0 or newer.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <optional>
#include <string>

#include "bsk/error.h"
#include "common/cuda_check.h"
#include "dispatch/attention_bwd.h"
#include "dispatch/dense_fwd_launch.cuh"
#include "dispatch/sparsek_plan.h"
#include "dispatch/workspace.h"
#include "kernels/attention_bwd_sm80.cuh"

namespace bsk::detail {
namespace {

namespace bw = kernels::bwd;

template <typename Elem, int D>
using DqConfig = kernels::DenseFwdConfig<Elem, D, 128, D == 64 ? 64 : 32, 4, false, 2>;
template <typename Elem, int D>
using DkDvConfig = kernels::DenseFwdConfig<Elem, D, bw::kGroupKeys, 64, 4, false, 2>;

int bits_for(int64_t x) {  // bits to hold 0..x
  int b = 1;
  while ((int64_t{1} << b) <= x) ++b;
  return b;
}

template <typename Elem, int D>
void launch_kernels(const bw::BwdParams<Elem>& p, int nseg, cudaStream_t stream) {
  if (p.seqlen_q > 0) {
    using Cfg = DqConfig<Elem, D>;
    auto* kernel = bw::dq_kernel<Cfg>;
    constexpr int kSmem = bw::DqSmem<Cfg>::kBytes;
    BSK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    const int positions = 128 / p.heads;
    const dim3 grid((p.seqlen_q + positions - 1) / positions, p.heads_q / p.heads, p.batch);
    kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(p);
    BSK_CUDA_CHECK_LAUNCH();
  }
  if (p.seqlen_k > 0) {  // Sq = 0 still writes dK = dV = 0
    using Cfg = DkDvConfig<Elem, D>;
    auto* kernel = bw::dk_dv_kernel<Cfg>;
    constexpr int kSmem = bw::DkDvSmem<Cfg>::kBytes;
    BSK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    const dim3 grid((p.seqlen_k + bw::kGroupKeys - 1) / bw::kGroupKeys, nseg);
    kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(p);
    BSK_CUDA_CHECK_LAUNCH();
  }
}

template <typename Elem>
void run(const AttentionBwdArgs& a, cudaStream_t stream) {
  const DenseFwdArgs& d = a.attn;
  const int n = d.seqlen_k, nseg = d.batch * d.heads_kv, group = d.heads_q / d.heads_kv;
  const int64_t keys = static_cast<int64_t>(nseg) * n;
  const int64_t rows = static_cast<int64_t>(d.batch) * d.heads_q * d.seqlen_q;

  Workspace ws(stream);
  SparseKPlanArgs pa{};
  if (a.sparse) {
    pa.u = a.u;
    for (int i = 0; i < 3; ++i) pa.u_stride[i] = a.u_stride[i];
    pa.batch = d.batch, pa.heads_kv = d.heads_kv, pa.seqlen_q = d.seqlen_q, pa.seqlen_k = n;
    pa.budget = a.budget, pa.window = a.window, pa.gate = a.gate;
  }
  // No query row (Sq = 0) or no key: nothing is selected; dK = dV = du = 0 where they exist.
  const bool use_plan = a.sparse && d.seqlen_q > 0 && n > 0;
  std::optional<SparseKPlan> plan;
  if (use_plan) plan.emplace(pa, ws);
  const bool select = use_plan && plan->select();
  const bool soft = select && a.gate != Gate::kNone;
  const int bits_j = bits_for(n), bits_bucket = bits_for(n / bw::kGroupBucket + 1);
  const int end_bit = bits_j + bits_bucket + bits_for(nseg);
  const size_t o_delta = ws.reserve(rows * sizeof(float));
  size_t o_end = 0, o_sel = 0, o_frac = 0, o_diff = 0, o_kin = 0, o_kout = 0, o_perm = 0,
         o_cub = 0, o_dm = 0, o_duk = 0, o_pre = 0, cub_bytes = 0;
  if (use_plan) {
    o_end = ws.reserve(keys * sizeof(int));
    o_sel = ws.reserve(keys * sizeof(int));
    o_kin = ws.reserve(keys * sizeof(unsigned long long));
    o_kout = ws.reserve(keys * sizeof(unsigned long long));
    o_perm = ws.reserve(keys * sizeof(int));
    BSK_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(
        nullptr, cub_bytes, static_cast<unsigned long long*>(nullptr),
        static_cast<unsigned long long*>(nullptr), static_cast<int>(keys), 0, end_bit, stream));
    o_cub = ws.reserve(cub_bytes);
    if (soft) {
      o_frac = ws.reserve(keys * sizeof(int2));
      o_diff = ws.reserve(static_cast<int64_t>(nseg) * (n + 1) * sizeof(int));
      o_dm = ws.reserve(rows * sizeof(float));
      o_duk = ws.reserve(keys * sizeof(float));
      o_pre = ws.reserve(static_cast<int64_t>(nseg) * (n + 1) * sizeof(double));
    }
  }
  ws.allocate();
  if (plan) plan->run(stream);

  bw::BwdParams<Elem> p{};
  p.q = static_cast<const Elem*>(d.q);
  p.k = static_cast<const Elem*>(d.k);
  p.v = static_cast<const Elem*>(d.v);
  p.dout = static_cast<const Elem*>(a.dout);
  p.lse = d.lse;
  p.dq = static_cast<Elem*>(a.dq);
  p.dk = static_cast<Elem*>(a.dk);
  p.dv = static_cast<Elem*>(a.dv);
  p.q_sb = d.q_stride[0], p.q_ss = d.q_stride[1], p.q_sh = d.q_stride[2];
  p.k_sb = d.k_stride[0], p.k_ss = d.k_stride[1], p.k_sh = d.k_stride[2];
  p.v_sb = d.v_stride[0], p.v_ss = d.v_stride[1], p.v_sh = d.v_stride[2];
  p.do_sb = a.dout_stride[0], p.do_ss = a.dout_stride[1], p.do_sh = a.dout_stride[2];
  p.dq_sb = a.dq_stride[0], p.dq_ss = a.dq_stride[1], p.dq_sh = a.dq_stride[2];
  p.dk_sb = a.dk_stride[0], p.dk_ss = a.dk_stride[1], p.dk_sh = a.dk_stride[2];
  p.dv_sb = a.dv_stride[0], p.dv_ss = a.dv_stride[1], p.dv_sh = a.dv_stride[2];
  p.lse_sb = d.lse_stride[0], p.lse_sh = d.lse_stride[1], p.lse_ss = d.lse_stride[2];
  p.delta = ws.at<float>(o_delta);
  p.batch = d.batch, p.seqlen_q = d.seqlen_q, p.seqlen_k = n;
  p.heads_q = d.heads_q, p.heads_kv = d.heads_kv, p.group = group;
  p.scale = d.softmax_scale;
  p.scale_log2 = static_cast<float>(d.softmax_scale * 1.4426950408889634);
  p.causal = a.sparse || d.causal;
  p.budget = a.sparse ? a.budget : 0;
  p.window = a.sparse ? a.window : n;  // dense causal: a window over every earlier key
  p.gate = static_cast<int>(a.sparse ? a.gate : Gate::kNone);
  p.heads = a.sparse ? (group % 4 == 0 ? 4 : (group % 2 == 0 ? 2 : 1)) : 1;

  if (rows > 0) {
    bw::delta_kernel<Elem><<<grid_1d(rows * 32, 256), 256, 0, stream>>>(
        static_cast<const Elem*>(d.out), d.out_stride[0], d.out_stride[1], d.out_stride[2],
        p.dout, p.do_sb, p.do_ss, p.do_sh, a.dlse, a.dlse_stride[0], a.dlse_stride[1],
        a.dlse_stride[2], d.batch, d.heads_q, d.seqlen_q, d.head_dim, ws.at<float>(o_delta));
    BSK_CUDA_CHECK_LAUNCH();
  }

  if (use_plan) {
    p.u = a.u;
    p.u_sb = a.u_stride[0], p.u_sh = a.u_stride[1], p.u_sj = a.u_stride[2];
    p.thr_u = plan->thr_u();
    p.thr_j = plan->thr_j();
    p.tau_rel = plan->tau_rel();
    p.list = plan->list();
    p.count = plan->count();
    p.list_cap = plan->list_cap();
    p.list_tiles = plan->list_tiles();
    p.key_end = ws.at<int>(o_end);
    p.sel_end = ws.at<int>(o_sel);
    p.perm = ws.at<int>(o_perm);
    if (soft) {
      p.frac = ws.at<int2>(o_frac);
      p.dm_row = ws.at<float>(o_dm);
      p.du_key = ws.at<float>(o_duk);
      BSK_CUDA_CHECK(cudaMemsetAsync(ws.at<int>(o_diff), 0,
                                     static_cast<int64_t>(nseg) * (n + 1) * sizeof(int), stream));
    }
    if (keys > 0) {
      bw::PlanParams pp{};
      pp.u = a.u;
      pp.u_sb = a.u_stride[0], pp.u_sh = a.u_stride[1], pp.u_sj = a.u_stride[2];
      pp.heads_kv = d.heads_kv, pp.n = n, pp.budget = a.budget, pp.window = a.window;
      pp.soft = soft;
      pp.thr_u = p.thr_u, pp.thr_j = p.thr_j, pp.tau_rel = p.tau_rel;
      pp.key_end = ws.at<int>(o_end);
      pp.sel_end = ws.at<int>(o_sel);
      pp.frac = soft ? ws.at<int2>(o_frac) : nullptr;
      pp.frac_diff = soft ? ws.at<int>(o_diff) : nullptr;
      pp.sort_key = ws.at<unsigned long long>(o_kin);
      pp.bits_j = bits_j, pp.bits_bucket = bits_bucket;
      pp.segments = nseg;
      bw::plan_kernel<<<grid_1d(keys, 256), 256, 0, stream>>>(pp);
      BSK_CUDA_CHECK_LAUNCH();
      BSK_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(
          ws.at<void>(o_cub), cub_bytes, ws.at<unsigned long long>(o_kin),
          ws.at<unsigned long long>(o_kout), static_cast<int>(keys), 0, end_bit, stream));
      bw::perm_kernel<<<grid_1d(keys, 256), 256, 0, stream>>>(
          ws.at<unsigned long long>(o_kout), keys, bits_j, ws.at<int>(o_perm));
      BSK_CUDA_CHECK_LAUNCH();
    }
  }

  switch (d.head_dim) {
    case 64: launch_kernels<Elem, 64>(p, nseg, stream); break;
    case 128: launch_kernels<Elem, 128>(p, nseg, stream); break;
    default:
      throw InvalidArgument("q", "head dim must be 64 or 128 on CUDA, got " +
                                     std::to_string(d.head_dim));
  }

  if (a.sparse && keys > 0) {
    if (soft) {
      bw::du_scan_kernel<<<nseg, bw::kScanThreads, 0, stream>>>(
          ws.at<int>(o_diff), p.dm_row, n, d.seqlen_q, d.heads_kv, group, ws.at<double>(o_pre));
      BSK_CUDA_CHECK_LAUNCH();
    }
    bw::du_finish_kernel<<<grid_1d(keys, 256), 256, 0, stream>>>(
        soft ? p.du_key : nullptr, soft ? p.frac : nullptr, soft ? ws.at<double>(o_pre) : nullptr,
        n, nseg, d.heads_kv, a.du, a.du_stride[0], a.du_stride[1], a.du_stride[2]);
    BSK_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace

void attention_bwd_cuda(const AttentionBwdArgs& a, int device, cudaStream_t stream) {
  const int cc = device_cc(device);
  if (cc < 80)
    throw Unsupported("the attention backward needs a GPU of compute capability 8.0 or newer; "
                      "cuda:" + std::to_string(device) + " is " + std::to_string(cc / 10) + "." +
                      std::to_string(cc % 10));
  switch (a.attn.dtype) {
    case DType::kFloat16: return run<__half>(a, stream);
    case DType::kBFloat16: return run<__nv_bfloat16>(a, stream);
    default:
      throw InvalidArgument("q", std::string("dtype must be float16 or bfloat16 on CUDA, got ") +
                                     dtype_name(a.attn.dtype));
  }
}

}  // namespace bsk::detail
