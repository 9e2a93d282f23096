// What the decode dispatchers receive once the front doors have validated everything.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "bsk/sparsek_cache.h"

namespace bsk::detail {

// One query position per sequence against cached rows (kernels/decode_attention.cuh). Dense:
// cache == null, rows_dense keys per sequence in k/v. SparseK: the cache's rows and gates.
struct DecodeArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;                   // may be null
  int64_t q_stride[2];          // batch, head
  int64_t k_stride[3], v_stride[3];  // batch, row, head
  int64_t out_stride[2], lse_stride[2];
  int batch, heads_q, heads_kv, head_dim, rows_dense;
  float softmax_scale;
  DType dtype;
  const SparseKCache* cache;  // SparseK only
};

// Pointers, element strides and sizes of validated views: q, out [B, 1, Hq, D]; k, v BSHD
// [B, rows, Hkv, D] (a cache's [B, Hkv, rows, D] tensors pass as BSHD views); rows_dense = rows.
DecodeArgs make_decode_args(const TensorView& q, const TensorView& k, const TensorView& v,
                            const TensorView& out, const TensorView* lse, float softmax_scale);

void decode_attention_cuda(const DecodeArgs& args, int device, cudaStream_t stream);

// The cache's CUDA side (kernels/sparsek_cache.cuh); views validated by the front door.
void sparsek_cache_prefill_cuda(const SparseKCache& cache, const TensorView& k,
                                const TensorView& v, const TensorView& u,
                                const TensorView* lengths, cudaStream_t stream);
void sparsek_cache_append_cuda(const SparseKCache& cache, const TensorView& k_new,
                               const TensorView& v_new, const TensorView& u_new,
                               cudaStream_t stream);
// append then attention (args: the attend's, cache set), the attention overlapping the append.
void sparsek_cache_step_cuda(const SparseKCache& cache, const TensorView& k_new,
                             const TensorView& v_new, const TensorView& u_new,
                             const DecodeArgs& args, int device, cudaStream_t stream);

}  // namespace bsk::detail
