// CPU reference for every op, accumulating in float64: the oracle of every test. Inputs may be
// float16, bfloat16, float32 or float64 CPU tensors; outputs are written in their own dtype.
// No validation here beyond asserts: callers go through the front doors in attention.h and
// sparsek.h, which validate.
#pragma once

#include <cstdint>

#include "bsk/attention.h"
#include "bsk/sparsek.h"
#include "bsk/sparsek_cache.h"
#include "bsk/tensor.h"

namespace bsk::ref {

// Dense attention, same contract as bsk::attention_forward.
void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const TensorView* lse, const AttentionParams& params);

// The SPARSEK operator on one candidate vector z[0..m): writes gates[0..m) and returns tau.
// m <= k: all gates 1, tau = -inf. Otherwise sum_j clip(z_j - tau, 0, 1) == k, and where tau is
// not unique the largest one is returned (k == 0 with m > 0: gates 0, tau = +inf). The gates are
// right for any finite z (tau is found relative to the k-th largest value z_(k)); the returned
// tau is z_(k) + (tau - z_(k)) rounded to double, so where |z_(k)| >= 2^52 it is only approximate.
double sparsek_gates(const float* z, int64_t m, int64_t k, float* gates);

// Vector-Jacobian product of the gates w.r.t. z: s = 1[0 < gate < 1],
// grad_z = s * (grad_gates - (s . grad_gates) / |s|_1), zero where |s|_1 == 0.
void sparsek_gates_vjp(const float* gates, const float* grad_gates, int64_t m, float* grad_z);

// Indices of the min(k, m) entries of z[0..m) that win under the spec's order (larger value
// first, ties toward the larger index), written to idx in that order. Returns the count.
int64_t topk_select(const float* z, int64_t m, int64_t k, int64_t* idx);

// SparseK attention, same contract as bsk::sparsek_attention_forward.
void sparsek_attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& u, const TensorView& out, const TensorView* lse,
                               const SparseKParams& params);

// The paper's scorer: u[b, h, j] = sum_c x[b, j, c] * w_score[c, h] + slope[h] * j.
// x: [B, S, Dmodel]; w_score: [Dmodel, Hkv]; slope: [Hkv] (all float32); u: float32 [B, Hkv, S].
void sparsek_scores(const TensorView& x, const TensorView& w_score, const TensorView& slope,
                    const TensorView& u);

// The SparseK decoding cache on CPU tensors (same contracts as bsk::sparsek_cache_*; the scale
// is resolved). Its oracle in the tests is sparsek_attention_forward at the same position.
void sparsek_cache_prefill(const SparseKCache& cache, const TensorView& k, const TensorView& v,
                           const TensorView& u, const TensorView* lengths);
void sparsek_cache_append(const SparseKCache& cache, const TensorView& k_new,
                          const TensorView& v_new, const TensorView& u_new);
void sparsek_cache_attend(const SparseKCache& cache, const TensorView& q, const TensorView& out,
                          const TensorView* lse, double softmax_scale);

// Backward passes (for training; the forward is recomputed, nothing saved is read). dout, dq:
// [B, Sq, Hq, D]; dk, dv: [B, Skv, Hkv, D]; any float dtype and strides, like the forwards.
// Every element of every gradient is written (dk/dv summed over the query heads of a group);
// rows that see no key contribute nothing.
// dlse: the gradient of the forward's lse, float32 [B, Hq, Sq], or null for none.
void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& dout, const TensorView* dlse, const TensorView& dq,
                        const TensorView& dk, const TensorView& dv, const AttentionParams& params);

// SparseK backward. The selection S_i is piecewise constant in u (no gradient through it); the
// gates' gradient reaches u through each row's SPARSEK VJP over all of C_i, summed over rows and
// the query heads of the group. du: float32 [B, Hkv, Skv]; zero for gate kNone.
void sparsek_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& u, const TensorView& dout,
                                const TensorView* dlse, const TensorView& dq, const TensorView& dk,
                                const TensorView& dv, const TensorView& du,
                                const SparseKParams& params);

}  // namespace bsk::ref
