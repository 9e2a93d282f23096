// SparseK forward on CUDA: score check + radix sort (CUB) -> selection -> per-block key lists ->
// fused attention kernel, all on the caller's stream. Scratch memory comes from the stream-ordered
// allocator (cudaMallocAsync), so repeated calls reuse the pool instead of calling cudaMalloc.
// Four kernel instantiations per path (2 dtypes x 2 head dims): sm90 (Hopper) where the dense
// path selection picks Hopper (hopper_path_selected), sm80 elsewhere.
#include <cub/device/device_radix_sort.cuh>

#include <string>

#include "bsk/error.h"
#include "common/cuda_check.h"
#include "dispatch/sparsek_fwd.h"
#include "dispatch/workspace.h"
#include "dispatch/dense_fwd_launch.cuh"
#include "dispatch/dense_fwd_sm90_launch.cuh"
#include "kernels/sparsek_fwd_sm80.cuh"
#include "kernels/sparsek_fwd_sm90.cuh"
#include "kernels/sparsek_select.cuh"

namespace bsk::detail {
namespace {

namespace sk = kernels::sparsek;

// 128 rows per CTA (4 warps, two 16-row tiles each, like the dense kernel): up to 4 query heads
// of one KV group times 32..128 positions, so gathered K/V rows serve several heads at once.
// Head dim 128 takes 32-key blocks and Q from shared memory: with 64-key blocks (or Q in
// registers at head dim 64) the selection masks push the kernel past 255 registers and it spills.
template <typename Elem, int kHeadDim>
using SparseKSm80Config =
    kernels::DenseFwdConfig<Elem, kHeadDim, /*kBlockM=*/128, /*kBlockN=*/kHeadDim == 64 ? 64 : 32,
                            /*kWarps=*/4, /*kQInRegs=*/false, /*kStages=*/2>;

int grid_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

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
  const int positions = 128 / p.heads;
  const dim3 grid((d.seqlen_q + positions - 1) / positions, d.heads_q / p.heads, d.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p, maps);
  BSK_CUDA_CHECK_LAUNCH();
}

template <typename Elem>
void run(const SparseKFwdArgs& a, bool sm90, cudaStream_t stream) {
  const DenseFwdArgs& d = a.attn;
  const int n = d.seqlen_k, nseg = d.batch * d.heads_kv;
  const int group = d.heads_q / d.heads_kv;
  const int heads = group % 4 == 0 ? 4 : (group % 2 == 0 ? 2 : 1);  // query heads per CTA
  const int m_max = sk::candidates_of_row(d.seqlen_q - 1, d.seqlen_q, n, a.window);
  const bool select = a.budget > 0 && m_max > a.budget;
  const int list_tiles = (d.seqlen_q + sk::kListRows - 1) / sk::kListRows;
  const int list_cap = std::min(a.budget, n) + sk::kListRows;
  const int64_t items = static_cast<int64_t>(nseg) * n;

  Workspace ws(stream);
  const size_t o_bad = ws.reserve(2 * sizeof(unsigned long long));  // non-finite, span
  size_t o_keys_in = 0, o_keys_out = 0, o_vals_in = 0, o_sorted_j = 0, o_sorted_u = 0, o_rank = 0,
         o_thr_u = 0, o_thr_j = 0, o_tau = 0, o_states = 0, o_list = 0, o_count = 0, o_cub = 0;
  const int chunks = select ? sk::ChunkPlan(n, a.budget, m_max).count() : 0;
  size_t cub_bytes = 0;
  int end_bit = 32;
  while (end_bit < 64 && (int64_t{1} << (end_bit - 32)) < nseg) ++end_bit;
  if (select) {
    o_keys_in = ws.reserve(items * sizeof(unsigned long long));
    o_keys_out = ws.reserve(items * sizeof(unsigned long long));
    o_vals_in = ws.reserve(items * sizeof(int));
    o_sorted_j = ws.reserve(items * sizeof(int));
    o_sorted_u = ws.reserve(items * sizeof(float));
    o_rank = ws.reserve(items * sizeof(int));
    const int64_t thr_items = static_cast<int64_t>(nseg) * (n + 1);
    o_thr_u = ws.reserve(thr_items * sizeof(float));
    o_thr_j = ws.reserve(thr_items * sizeof(int));
    o_tau = ws.reserve(thr_items * sizeof(float));
    o_states = ws.reserve(static_cast<int64_t>(nseg) * chunks * sizeof(sk::ChunkState));
    o_list = ws.reserve(static_cast<int64_t>(nseg) * list_tiles * list_cap * sizeof(int));
    BSK_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(
        nullptr, cub_bytes, static_cast<unsigned long long*>(nullptr),
        static_cast<unsigned long long*>(nullptr), static_cast<int*>(nullptr),
        static_cast<int*>(nullptr), static_cast<int>(items), 0, end_bit, stream));
    o_cub = ws.reserve(cub_bytes);
  }
  if (a.budget > 0) o_count = ws.reserve(static_cast<int64_t>(nseg) * list_tiles * sizeof(int));
  ws.allocate();

  // Scores must be finite (and, where a selection with soft gates runs, span at most
  // kMaxScoreSpan within each (batch, KV head)): checked on the device, then one synchronization
  // to raise the error.
  sk::Scores scores{a.u, a.u_stride[0], a.u_stride[1], a.u_stride[2], d.heads_kv, n};
  unsigned long long flags[2] = {~0ull, ~0ull};
  auto* bad = ws.at<unsigned long long>(o_bad);
  if (items > 0) {  // Skv = 0: no score to check (and no grid to launch)
    BSK_CUDA_CHECK(cudaMemsetAsync(bad, 0xff, 2 * sizeof(unsigned long long), stream));
    sk::encode_scores_kernel<<<grid_for(items, 256), 256, 0, stream>>>(
        scores, nseg, select ? ws.at<unsigned long long>(o_keys_in) : nullptr,
        select ? ws.at<int>(o_vals_in) : nullptr, bad);
    BSK_CUDA_CHECK_LAUNCH();
  }
  if (select) {
    BSK_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(
        ws.at<void>(o_cub), cub_bytes, ws.at<unsigned long long>(o_keys_in),
        ws.at<unsigned long long>(o_keys_out), ws.at<int>(o_vals_in), ws.at<int>(o_sorted_j),
        static_cast<int>(items), 0, end_bit, stream));
    sk::finish_sort_kernel<<<grid_for(items, 256), 256, 0, stream>>>(
        ws.at<unsigned long long>(o_keys_out), ws.at<int>(o_sorted_j), nseg, n,
        ws.at<float>(o_sorted_u), ws.at<int>(o_rank));
    BSK_CUDA_CHECK_LAUNCH();
    if (a.gate != Gate::kNone) {  // hard top-k needs no tau: any finite span is exact
      sk::check_span_kernel<<<(nseg + 127) / 128, 128, 0, stream>>>(ws.at<float>(o_sorted_u),
                                                                    nseg, n, bad + 1);
      BSK_CUDA_CHECK_LAUNCH();
    }
  }
  if (items > 0) {
    BSK_CUDA_CHECK(cudaMemcpyAsync(flags, bad, sizeof(flags), cudaMemcpyDeviceToHost, stream));
    BSK_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  if (flags[0] != ~0ull) {
    const unsigned long long e = flags[0] - 1;
    const int64_t seg = static_cast<int64_t>(e / n), j = static_cast<int64_t>(e % n);
    throw InvalidArgument("u", "scores must be finite (no NaN or inf); u[" +
                                   std::to_string(seg / d.heads_kv) + ", " +
                                   std::to_string(seg % d.heads_kv) + ", " + std::to_string(j) +
                                   "] is not");
  }
  if (flags[1] != ~0ull) {
    const int64_t seg = static_cast<int64_t>(flags[1] - 1);
    throw InvalidArgument("u", "on CUDA the scores of each (batch, KV head) must span at most "
                               "2^20 (max - min <= 1048576) with gate key_value or value; u[" +
                                   std::to_string(seg / d.heads_kv) + ", " +
                                   std::to_string(seg % d.heads_kv) +
                                   ", :] spans more (the CPU path takes any finite scores)");
  }

  if (select) {
    sk::SelectParams sp{};
    sp.sorted_u = ws.at<float>(o_sorted_u);
    sp.sorted_j = ws.at<int>(o_sorted_j);
    sp.rank = ws.at<int>(o_rank);
    sp.thr_u = ws.at<float>(o_thr_u);
    sp.thr_j = ws.at<int>(o_thr_j);
    sp.tau_rel = ws.at<float>(o_tau);
    sp.n = n;
    sp.k = a.budget;
    sp.m_max = m_max;
    sp.soft = a.gate != Gate::kNone;
    sp.segments = nseg;
    const dim3 grid(chunks, nseg);
    sk::select_init_kernel<<<grid, sk::kSelectThreads, 0, stream>>>(sp, ws.at<sk::ChunkState>(o_states));
    BSK_CUDA_CHECK_LAUNCH();
    sk::select_walk_kernel<<<(chunks * nseg + 63) / 64, 64, 0, stream>>>(
        sp, ws.at<sk::ChunkState>(o_states), chunks);
    BSK_CUDA_CHECK_LAUNCH();
  }
  if (a.budget > 0) {
    sk::ListParams lp{};
    lp.sorted_j = select ? ws.at<int>(o_sorted_j) : nullptr;
    lp.rank = select ? ws.at<int>(o_rank) : nullptr;
    lp.thr_u = select ? ws.at<float>(o_thr_u) : nullptr;
    lp.thr_j = select ? ws.at<int>(o_thr_j) : nullptr;
    lp.scores = scores;
    lp.list = select ? ws.at<int>(o_list) : nullptr;
    lp.count = ws.at<int>(o_count);
    lp.cap = list_cap;
    lp.n = n;
    lp.seqlen_q = d.seqlen_q;
    lp.k = a.budget;
    lp.w = a.window;
    lp.tiles = list_tiles;
    sk::list_kernel<<<dim3(list_tiles, nseg), sk::kSelectThreads, 0, stream>>>(lp);
    BSK_CUDA_CHECK_LAUNCH();
  }

  kernels::SparseKFwdParams<Elem> p{};
  p.attn = make_dense_params<Elem>(d);
  p.u = a.u;
  p.u_sb = a.u_stride[0], p.u_sh = a.u_stride[1], p.u_sj = a.u_stride[2];
  p.thr_u = select ? ws.at<float>(o_thr_u) : nullptr;
  p.thr_j = select ? ws.at<int>(o_thr_j) : nullptr;
  p.tau_rel = select ? ws.at<float>(o_tau) : nullptr;
  p.list = select ? ws.at<int>(o_list) : nullptr;
  p.count = a.budget > 0 ? ws.at<int>(o_count) : nullptr;
  p.list_cap = list_cap;
  p.list_tiles = list_tiles;
  p.heads_kv = d.heads_kv;
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

void sparsek_fwd_cuda(const SparseKFwdArgs& a, int device, cudaStream_t stream) {
  const int cc = device_cc(device);
  if (cc < 80)
    throw Unsupported("SparseK attention needs a GPU of compute capability 8.0 or newer; cuda:" +
                      std::to_string(device) + " is " + std::to_string(cc / 10) + "." +
                      std::to_string(cc % 10));
  // Empty problems and inputs TMA cannot describe stay on the sm80 kernel.
  const DenseFwdArgs& d = a.attn;
  const int64_t kv_size[3] = {d.batch, d.seqlen_k, d.heads_kv};
  const bool sm90 = hopper_path_selected(device) && d.batch > 0 && d.seqlen_q > 0 &&
                    d.seqlen_k > 0 && d.heads_q > 0 && tma_describable(d.k, d.k_stride, kv_size) &&
                    tma_describable(d.v, d.v_stride, kv_size);
  switch (a.attn.dtype) {
    case DType::kFloat16: return run<__half>(a, sm90, stream);
    case DType::kBFloat16: return run<__nv_bfloat16>(a, sm90, stream);
    default:
      throw InvalidArgument("q", std::string("dtype must be float16 or bfloat16 on CUDA, got ") +
                                     dtype_name(a.attn.dtype));
  }
}

}  // namespace bsk::detail
