// The SparseK selection on CUDA, planned once per call and shared by the forward and the backward
// (FlashInfer's split: planning reserves scratch, running fills it). For every candidate count m
// it yields the threshold (the k-th best candidate) and tau, and per kListRows query positions the
// list of keys those rows may select (kernels/sparsek_select.cuh).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "bsk/sparsek.h"
#include "common/sparsek_chunk_plan.h"
#include "dispatch/workspace.h"

namespace bsk::detail {

struct SparseKPlanArgs {
  const float* u;  // [B, Hkv, Skv]
  int64_t u_stride[3];
  int batch, heads_kv, seqlen_q, seqlen_k;
  int budget, window;  // already clamped to Skv
  Gate gate;
};

class SparseKPlan {
 public:
  // Reserves the plan's scratch in `ws`; the caller may reserve more, then allocates, then run().
  SparseKPlan(const SparseKPlanArgs& a, Workspace& ws);
  // Checks the scores (finite; span limit for soft gates) with one synchronization of `stream`,
  // throwing InvalidArgument naming u, then selects and builds the key lists.
  void run(cudaStream_t stream);

  bool select() const { return select_; }  // some row has more than k candidates
  int m_max() const { return m_max_; }
  int list_tiles() const { return list_tiles_; }
  int list_cap() const { return list_cap_; }
  // Valid after run(); null where not computed (no selection, or k = 0).
  const float* thr_u() const;    // [B*Hkv, Skv + 1] by candidate count m (m > k)
  const int* thr_j() const;
  const float* tau_rel() const;  // gate = clip((u - thr_u) - tau_rel, 0, 1)
  const int* list() const;       // [B*Hkv, list_tiles, list_cap]
  const int* count() const;      // [B*Hkv, list_tiles]

 private:
  SparseKPlanArgs a_;
  Workspace& ws_;
  bool select_;
  int nseg_, m_max_, list_tiles_, list_cap_, chunks_, end_bit_;
  kernels::sparsek::ChunkPlan chunk_plan_{};  // the walk's chunks (when select_)
  int bisect_ = 0;                            // select_init's bisection steps
  int list_group_ = 1;                        // key lists built per select_kernel list block
  size_t cub_bytes_ = 0;
  size_t o_bad_, o_keys_in_ = 0, o_keys_out_ = 0, o_vals_in_ = 0, o_sorted_j_ = 0,
                 o_sorted_u_ = 0, o_rank_ = 0, o_thr_u_ = 0, o_thr_j_ = 0, o_tau_ = 0,
                 o_states_ = 0, o_list_ = 0, o_count_ = 0, o_cub_ = 0;
};

}  // namespace bsk::detail
