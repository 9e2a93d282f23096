// SparseK forward on CUDA: the selection plan (dispatch/sparsek_plan.h: score check, radix sort,
// thresholds, per-block key lists) -> fused attention kernel, all on the caller's stream. Scratch
// memory comes from libbsk's stream-ordered pool (dispatch/workspace.h), never cudaMalloc.
// Four kernel instantiations per path (2 dtypes x 2 head dims): sm90 (Hopper) where the dense
// path selection picks Hopper (hopper_path_selected), sm80 elsewhere.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bsk/error.h"
#include "bsk/tensor.h"
#include "common/cuda_check.h"
#include "dispatch/sparsek_fwd.h"
#include "dispatch/sparsek_plan.h"
#include "dispatch/workspace.h"
#include "dispatch/dense_fwd_launch.cuh"
#include "dispatch/dense_fwd_sm90_launch.cuh"
#include "kernels/sparsek_fwd_sm80.cuh"
#include "kernels/sparsek_fwd_sm90.cuh"

namespace bsk::detail {
namespace {

// An A/B switch of the Hopper kernel, on unless the variable is "0". Read at every call, not
// once: the tests flip these in-process.
bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}


// 128 rows per CTA (4 warps, two 16-row tiles each, like the dense kernel): up to 4 query heads
// of one KV group times 32..128 positions, so gathered K/V rows serve several heads at once.
// Head dim 128 takes 32-key blocks and Q from shared memory: with 64-key blocks (or Q in
// registers at head dim 64) the selection masks push the kernel past 255 registers and it spills.
template <typename Elem, int kHeadDim>
using SparseKSm80Config =
    kernels::DenseFwdConfig<Elem, kHeadDim, /*kBlockM=*/128, /*kBlockN=*/kHeadDim == 64 ? 64 : 32,
                            /*kWarps=*/4, /*kQInRegs=*/false, /*kStages=*/2>;


template <class Cfg>
void launch_attention(const SparseKFwdArgs& a, const kernels::SparseKFwdParams<typename Cfg::Elem>& p,
                      cudaStream_t stream) {
  auto* kernel = kernels::sparsek_fwd_sm80_kernel<Cfg>;
  constexpr int kSmem = kernels::SparseKSmem<Cfg>::kBytes;
  if constexpr (kSmem > 48 * 1024)
    BSK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  const int positions = 128 / p.heads;
  const dim3 grid((a.attn.seqlen_q + positions - 1) / positions, a.attn.heads_q / p.heads,
                  a.attn.batch);
  kernel<<<grid, Cfg::kThreads, kSmem, stream>>>(p);
  BSK_CUDA_CHECK_LAUNCH();
}

// A tensor map over a (seq, d, heads, batch) input whose box is 128 rows of 64 columns, 128-byte
// swizzled as the wgmma operand tiles (kernels/sparsek_fwd_sm90.cuh: the window band's blocks);
// rows out of range read as zeros.
template <typename Elem>
cute::TmaDescriptor block_tma(const void* ptr, const int64_t st[3], int seqlen, int heads,
                              int batch, int head_dim) {
  const auto fix = tma_stride;
  const cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(seqlen), cuuint64_t(heads),
                              cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(fix(st[1], seqlen) * sizeof(Elem)),
                                 cuuint64_t(fix(st[2], heads) * sizeof(Elem)),
                                 cuuint64_t(fix(st[0], batch) * sizeof(Elem))};
  const cuuint32_t box[4] = {64, 128, 1, 1}, elem_strides[4] = {1, 1, 1, 1};
  cute::TmaDescriptor desc{};
  const CUresult r = cutlass::call_cuTensorMapEncodeTiled(
      &desc, std::is_same_v<Elem, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                          : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
      4, const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw Unsupported("cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) +
                      ") for a SparseK key/value block map");
  return desc;
}

// Hopper: the dense sm90 kernel's consumer pipeline (128 x 128 blocks, 2 stages) behind a
// producer that loads window blocks with TMA and gathers selected rows with cp.async
// (kernels/sparsek_fwd_sm90.cuh).
template <typename Elem, int kHeadDim>
void launch_attention_sm90(const SparseKFwdArgs& a, const kernels::SparseKFwdParams<Elem>& p,
                           cudaStream_t stream) {
  using Cfg = kernels::sm90::SparseKConfig<typename CuteElem<Elem>::type, kHeadDim>;
  auto* kernel = kernels::sm90::sparsek_fwd_sm90_kernel<Cfg, Elem>;
  BSK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      Cfg::kSmemBytes));
  const DenseFwdArgs& d = a.attn;
  const kernels::sm90::SparseKTmaMaps maps{
      block_tma<Elem>(d.k, d.k_stride, d.seqlen_k, d.heads_kv, d.batch, kHeadDim),
      block_tma<Elem>(d.v, d.v_stride, d.seqlen_k, d.heads_kv, d.batch, kHeadDim)};
  // Persistent: one CTA per SM (the shared memory allows no second), never more than tiles.
  const int positions = 128 / p.heads;
  const int64_t tiles =
      int64_t((d.seqlen_q + positions - 1) / positions) * (d.heads_q / p.heads) * d.batch;
  if (tiles >= (int64_t(1) << 31))
    throw Unsupported("SparseK attention: more than 2^31 tiles of 128 rows in one call");
  int device = 0;
  BSK_CUDA_CHECK(cudaGetDevice(&device));
  // BSK_SPARSEK_PERSISTENT=0: a CTA per tile instead (the same kernel; for A/B timings).
  const int64_t ctas = env_switch_on("BSK_SPARSEK_PERSISTENT")
                           ? std::min<int64_t>(tiles, device_sm_count(device))
                           : tiles;
  const int grid = static_cast<int>(ctas);
  if (grid == 0) return;
  // BSK_SPARSEK_FOLD=0: the lists keep their newer candidates (for A/B timings and tests).
  kernels::SparseKFwdParams<Elem> pf = p;
  pf.fold_newer = env_switch_on("BSK_SPARSEK_FOLD");
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(pf, maps);
  BSK_CUDA_CHECK_LAUNCH();
}

template <typename Elem>
void run(const SparseKFwdArgs& a, bool sm90, cudaStream_t stream) {
  const DenseFwdArgs& d = a.attn;
  const int group = d.heads_q / d.heads_kv;
  const int heads = group % 4 == 0 ? 4 : (group % 2 == 0 ? 2 : 1);  // query heads per CTA

  Workspace ws(stream);
  SparseKPlan plan(plan_args(a), ws);
  ws.allocate();
  plan.run(stream);

  kernels::SparseKFwdParams<Elem> p{};
  p.attn = make_dense_params<Elem>(d);
  p.u = a.u;
  p.u_sb = a.u_stride[0], p.u_sh = a.u_stride[1], p.u_sj = a.u_stride[2];
  p.thr_u = plan.thr_u();
  p.thr_j = plan.thr_j();
  p.tau_rel = plan.tau_rel();
  p.list = plan.list();
  p.count = plan.count();
  p.list_cap = plan.list_cap();
  p.list_tiles = plan.list_tiles();
  p.heads_kv = d.heads_kv, p.batch = d.batch;
  p.heads = heads;
  p.budget = a.budget;
  p.window = a.window;
  p.gate_logits = a.gate == Gate::kKeyValue;

  if (sm90) {
    if (d.head_dim == 64) return launch_attention_sm90<Elem, 64>(a, p, stream);
    if (d.head_dim == 128) return launch_attention_sm90<Elem, 128>(a, p, stream);
  }
  switch (d.head_dim) {
    case 64: return launch_attention<SparseKSm80Config<Elem, 64>>(a, p, stream);
    case 128: return launch_attention<SparseKSm80Config<Elem, 128>>(a, p, stream);
    default:
      throw InvalidArgument("q", "head dim must be 64 or 128 on CUDA, got " +
                                     std::to_string(d.head_dim));
  }
}

}  // namespace

SparseKPlanArgs plan_args(const SparseKFwdArgs& a) {
  SparseKPlanArgs p{};
  p.u = a.u;
  for (int i = 0; i < 3; ++i) p.u_stride[i] = a.u_stride[i];
  p.batch = a.attn.batch, p.heads_kv = a.attn.heads_kv;
  p.seqlen_q = a.attn.seqlen_q, p.seqlen_k = a.attn.seqlen_k;
  p.budget = a.budget, p.window = a.window, p.gate = a.gate;
  return p;
}

void sparsek_fwd_cuda(const SparseKFwdArgs& a, int device, cudaStream_t stream) {
  const int cc = device_cc(device);
  if (cc < 80)
    throw Unsupported("SparseK attention needs a GPU of compute capability 8.0 or newer; cuda:" +
                      std::to_string(device) + " is " + std::to_string(cc / 10) + "." +
                      std::to_string(cc % 10));
  // Empty problems and inputs TMA cannot describe stay on the sm80 kernel.
  const DenseFwdArgs& d = a.attn;
  const int64_t kv_size[3] = {d.batch, d.seqlen_k, d.heads_kv};
  // The sm90 kernel addresses a gathered row by a 32-bit count of 16-byte units from its head's
  // row 0, which covers 64 GiB of one sequence's rows.
  const auto elem_bytes = static_cast<int64_t>(dtype_size(d.dtype));
  auto rows_in_reach = [&](const int64_t stride[3]) {
    return (d.seqlen_k - 1) * stride[1] * elem_bytes / 16 < (int64_t(1) << 32);
  };
  const bool sm90 = hopper_path_selected(device) && d.batch > 0 && d.seqlen_q > 0 &&
                    d.seqlen_k > 0 && d.heads_q > 0 && tma_describable(d.k, d.k_stride, kv_size) &&
                    tma_describable(d.v, d.v_stride, kv_size) && rows_in_reach(d.k_stride) &&
                    rows_in_reach(d.v_stride);
  switch (a.attn.dtype) {
    case DType::kFloat16: return run<__half>(a, sm90, stream);
    case DType::kBFloat16: return run<__nv_bfloat16>(a, sm90, stream);
    default:
      throw InvalidArgument("q", std::string("dtype must be float16 or bfloat16 on CUDA, got ") +
                                     dtype_name(a.attn.dtype));
  }
}

}  // namespace bsk::detail
