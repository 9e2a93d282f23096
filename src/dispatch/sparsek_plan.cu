// Score check + radix sort (CUB) -> selection walk -> per-block key lists, on the caller's stream.
#include "dispatch/sparsek_plan.h"

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "bsk/error.h"
#include "common/cuda_check.h"
#include "kernels/sparsek_select.cuh"

namespace bsk::detail {
namespace {

namespace sk = kernels::sparsek;

sk::Scores scores_of(const SparseKPlanArgs& a) {
  return sk::Scores{a.u, a.u_stride[0], a.u_stride[1], a.u_stride[2], a.heads_kv, a.seqlen_k};
}

// ChunkPlan's lengths (sk::default_chunk_lengths); select_init bisects tau0 in `bisect` steps.
// BSK_SELECT_PLAN="late,travel[,bisect]" overrides them, for bench/tune/select_plan_sweep.py
// (the plan changes the selection's time, not its result).
void chunk_lengths(int n, int& late, int& travel, int& bisect) {
  sk::default_chunk_lengths(n, late, travel);
  bisect = sk::kBisect;
  if (const char* e = std::getenv("BSK_SELECT_PLAN")) {
    int l = 0, t = 0, b = 0;
    const int got = std::sscanf(e, "%d,%d,%d", &l, &t, &b);
    if (got >= 2 && l > 0 && t > 0) late = l, travel = t;
    if (got == 3 && b > 0 && b <= 30) bisect = b;
  }
}

}  // namespace

SparseKPlan::SparseKPlan(const SparseKPlanArgs& a, Workspace& ws) : a_(a), ws_(ws) {
  const int n = a.seqlen_k;
  nseg_ = a.batch * a.heads_kv;
  m_max_ = sk::candidates_of_row(a.seqlen_q - 1, a.seqlen_q, n, a.window);
  select_ = a.budget > 0 && m_max_ > a.budget;
  list_tiles_ = (a.seqlen_q + sk::kListRows - 1) / sk::kListRows;
  list_cap_ = std::min(a.budget, n) + sk::kListRows;
  int late = 0, travel = 0;
  chunk_lengths(n, late, travel, bisect_);
  chunks_ = 0;
  if (select_) {
    chunk_plan_ = sk::ChunkPlan(n, a.budget, m_max_, late, travel);
    chunks_ = chunk_plan_.count();
  }
  // Several lists per block where there are many (one pass over the sorted order serves
  // them): 350 -> 214 us at 131072 keys (8192 lists), but 47 -> 57 us at 32768 (2048 lists,
  // then too few blocks). bench/results/select-plan-sweep-lists-h100.txt.
  list_group_ = std::clamp(list_tiles_ * nseg_ / 2048, 1, sk::kListsPerBlock);
  // BSK_SPARSEK_LISTS_PER_BLOCK forces the grouping, so the tests cover it at small shapes.
  if (const char* e = std::getenv("BSK_SPARSEK_LISTS_PER_BLOCK")) {
    const int g = std::atoi(e);
    if (g >= 1 && g <= sk::kListsPerBlock) list_group_ = g;
  }
  end_bit_ = 32;
  while (end_bit_ < 64 && (int64_t{1} << (end_bit_ - 32)) < nseg_) ++end_bit_;
  const int64_t items = static_cast<int64_t>(nseg_) * n;

  o_bad_ = ws.reserve(2 * sizeof(unsigned long long));  // non-finite, span
  if (select_) {
    o_keys_in_ = ws.reserve(items * sizeof(unsigned long long));
    o_keys_out_ = ws.reserve(items * sizeof(unsigned long long));
    o_vals_in_ = ws.reserve(items * sizeof(int));
    o_sorted_j_ = ws.reserve(items * sizeof(int));
    o_sorted_u_ = ws.reserve(items * sizeof(float));
    o_rank_ = ws.reserve(items * sizeof(int));
    const int64_t thr_items = static_cast<int64_t>(nseg_) * (n + 1);
    o_thr_u_ = ws.reserve(thr_items * sizeof(float));
    o_thr_j_ = ws.reserve(thr_items * sizeof(int));
    o_tau_ = ws.reserve(thr_items * sizeof(float));
    o_states_ = ws.reserve(static_cast<int64_t>(nseg_) * chunks_ * sizeof(sk::ChunkState));
    o_list_ = ws.reserve(static_cast<int64_t>(nseg_) * list_tiles_ * list_cap_ * sizeof(int));
    BSK_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(
        nullptr, cub_bytes_, static_cast<unsigned long long*>(nullptr),
        static_cast<unsigned long long*>(nullptr), static_cast<int*>(nullptr),
        static_cast<int*>(nullptr), static_cast<int>(items), 0, end_bit_, nullptr));
    o_cub_ = ws.reserve(cub_bytes_);
  }
  if (a.budget > 0) o_count_ = ws.reserve(static_cast<int64_t>(nseg_) * list_tiles_ * sizeof(int));
}

const float* SparseKPlan::thr_u() const { return select_ ? ws_.at<float>(o_thr_u_) : nullptr; }
const int* SparseKPlan::thr_j() const { return select_ ? ws_.at<int>(o_thr_j_) : nullptr; }
const float* SparseKPlan::tau_rel() const { return select_ ? ws_.at<float>(o_tau_) : nullptr; }
const int* SparseKPlan::list() const { return select_ ? ws_.at<int>(o_list_) : nullptr; }
const int* SparseKPlan::count() const { return a_.budget > 0 ? ws_.at<int>(o_count_) : nullptr; }

void SparseKPlan::run(cudaStream_t stream) {
  const int n = a_.seqlen_k, nseg = nseg_;
  const int64_t items = static_cast<int64_t>(nseg) * n;
  Workspace& ws = ws_;
  const sk::Scores scores = scores_of(a_);

  // Scores must be finite (and, where a selection with soft gates runs, span at most
  // kMaxScoreSpan within each (batch, KV head)): checked on the device, then one synchronization
  // to raise the error.
  unsigned long long flags[2] = {~0ull, ~0ull};
  auto* bad = ws.at<unsigned long long>(o_bad_);
  if (items > 0) {  // Skv = 0: no score to check (and no grid to launch)
    BSK_CUDA_CHECK(cudaMemsetAsync(bad, 0xff, 2 * sizeof(unsigned long long), stream));
    sk::encode_scores_kernel<<<grid_1d(items, 256), 256, 0, stream>>>(
        scores, nseg, select_ ? ws.at<unsigned long long>(o_keys_in_) : nullptr,
        select_ ? ws.at<int>(o_vals_in_) : nullptr, bad);
    BSK_CUDA_CHECK_LAUNCH();
  }
  if (select_) {
    size_t cub_bytes = cub_bytes_;
    BSK_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(
        ws.at<void>(o_cub_), cub_bytes, ws.at<unsigned long long>(o_keys_in_),
        ws.at<unsigned long long>(o_keys_out_), ws.at<int>(o_vals_in_), ws.at<int>(o_sorted_j_),
        static_cast<int>(items), 0, end_bit_, stream));
    sk::finish_sort_kernel<<<grid_1d(items, 256), 256, 0, stream>>>(
        ws.at<unsigned long long>(o_keys_out_), ws.at<int>(o_sorted_j_), nseg, n,
        ws.at<float>(o_sorted_u_), ws.at<int>(o_rank_));
    BSK_CUDA_CHECK_LAUNCH();
    if (a_.gate != Gate::kNone) {  // hard top-k needs no tau: any finite span is exact
      sk::check_span_kernel<<<(nseg + 127) / 128, 128, 0, stream>>>(ws.at<float>(o_sorted_u_),
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
                                   std::to_string(seg / a_.heads_kv) + ", " +
                                   std::to_string(seg % a_.heads_kv) + ", " + std::to_string(j) +
                                   "] is not");
  }
  if (flags[1] != ~0ull) {
    const int64_t seg = static_cast<int64_t>(flags[1] - 1);
    throw InvalidArgument("u", "on CUDA the scores of each (batch, KV head) must span at most "
                               "2^20 (max - min <= 1048576) with gate key_value or value; u[" +
                                   std::to_string(seg / a_.heads_kv) + ", " +
                                   std::to_string(seg % a_.heads_kv) +
                                   ", :] spans more (the CPU path takes any finite scores)");
  }

  // Thresholds and tau: the first state of every chunk (select_init_kernel), then the walks;
  // the key lists (which need only the sorted order) in the same grid as the walks.
  sk::SelectParams sp{};
  int walk_blocks = 0;
  if (select_) {
    sp.sorted_u = ws.at<float>(o_sorted_u_);
    sp.sorted_j = ws.at<int>(o_sorted_j_);
    sp.rank = ws.at<int>(o_rank_);
    sp.thr_u = ws.at<float>(o_thr_u_);
    sp.thr_j = ws.at<int>(o_thr_j_);
    sp.tau_rel = ws.at<float>(o_tau_);
    sp.n = n;
    sp.k = a_.budget;
    sp.m_max = m_max_;
    sp.soft = a_.gate != Gate::kNone;
    sp.segments = nseg;
    sp.plan = chunk_plan_;
    sp.bisect = bisect_;
    const dim3 grid(chunks_, nseg);
    sk::select_init_kernel<<<grid, sk::kSelectThreads, 0, stream>>>(
        sp, ws.at<sk::ChunkState>(o_states_));
    BSK_CUDA_CHECK_LAUNCH();
    walk_blocks = (chunks_ * nseg + sk::kWalkWarps - 1) / sk::kWalkWarps;
  }
  if (a_.budget > 0) {
    sk::ListParams lp{};
    lp.sorted_j = select_ ? ws.at<int>(o_sorted_j_) : nullptr;
    lp.sorted_u = select_ ? ws.at<float>(o_sorted_u_) : nullptr;
    lp.scores = scores;
    lp.list = select_ ? ws.at<int>(o_list_) : nullptr;
    lp.count = ws.at<int>(o_count_);
    lp.cap = list_cap_;
    lp.n = n;
    lp.seqlen_q = a_.seqlen_q;
    lp.k = a_.budget;
    lp.w = a_.window;
    lp.tiles = list_tiles_;
    lp.group = list_group_;
    const int list_blocks = (list_tiles_ + lp.group - 1) / lp.group;
    const int64_t blocks = walk_blocks + static_cast<int64_t>(list_blocks) * nseg;
    if (blocks >= (int64_t{1} << 31))
      throw Unsupported("SparseK selection: more than 2^31 blocks of walks and key lists");
    sk::select_kernel<<<static_cast<unsigned>(blocks), sk::kSelectThreads, 0, stream>>>(
        sp, select_ ? ws.at<sk::ChunkState>(o_states_) : nullptr, chunks_, walk_blocks, lp,
        list_blocks);
    BSK_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace bsk::detail
