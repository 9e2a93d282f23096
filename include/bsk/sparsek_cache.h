// SparseK generation (docs/SPARSEK_SPEC.md, "Generation (decode) with an evicting cache"): per
// (sequence, KV head) the cache keeps the last w K/V pairs and the current selection (at most k
// pairs), plus the scalar scores the soft gates still need. Decoding one token from it gives the
// prefill definition's output at that position, with memory that does not grow with the context
// (K/V: (w + k) rows; scores: the candidates with u > tau, see `cand_u`).
//
// The cache is a set of tensors the caller allocates (contiguous, one device) and libbsk updates
// in place; sparsek_cache_shapes() says what to allocate. The normal path is prefill (the state a
// prefill of the prompt leaves), then append + attend once per generated token.
#pragma once

#include <array>
#include <optional>

#include "bsk/sparsek.h"
#include "bsk/tensor.h"

namespace bsk {

// Status codes in SparseKCache::status[0] (status[1] holds a detail). An error is sticky: every
// later append leaves the cache unchanged and every attend writes NaN, until the caller rebuilds
// or resets the cache, so a broken cache never yields a plausible answer.
enum class CacheStatus : int {
  kOk = 0,
  kNonFiniteScore = 1,     // detail: flat index b * Hkv + h of the bad new score
  kCapacityExceeded = 2,   // detail: the (b * Hkv + h) whose candidate scores overflowed cand_u
};

struct SparseKCache {
  // B sequences, Hkv KV heads, head dim D, window w, budget k, score capacity C.
  TensorView k, v;      // [B, Hkv, w + k, D] fp16/bf16 (CPU: also float32/float64). Rows [0, w):
                        // the window ring (position p in row p % w); rows [w, w + k): selected.
  TensorView slot_u;    // float32 [B, Hkv, w + k]: the score of the key in each row
  TensorView cand_u;    // float32 [B, Hkv, C]: candidate scores that can still carry a gate
  TensorView cand_pos;  // int32 [B, Hkv, C]: their positions (the tie rule needs them)
  TensorView cand_row;  // int32 [B, Hkv, C]: the K/V row of a selected candidate, else -1
  TensorView tau;       // float64 [B, Hkv]: tau of the last position (-inf: every gate 1)
  TensorView counts;    // int32 [B, Hkv, 3]: tokens seen, cand entries in use, selected rows
  TensorView status;    // int32 [2], on the cache's device: CacheStatus, detail
  int64_t budget = 0;   // k
  int64_t window = 0;   // w
  Gate gate = Gate::kKeyValue;
};

// Shapes of the state tensors for a cache of B sequences (see SparseKCache). The score capacity C
// bounds how many candidate scores the soft gates may need at once (those with u > tau: often a
// few times k, but as many as the context for flat scores); exceeding it is an error
// (kCapacityExceeded). Hard top-k (gate kNone) needs C = k.
struct SparseKCacheShapes {
  std::array<int64_t, 4> kv;       // [B, Hkv, w + k, D]
  std::array<int64_t, 3> slot_u;   // [B, Hkv, w + k]
  std::array<int64_t, 3> cand;     // [B, Hkv, C]
  std::array<int64_t, 2> tau;      // [B, Hkv]
  std::array<int64_t, 3> counts;   // [B, Hkv, 3]
  std::array<int64_t, 1> status;   // [2]
  int64_t bytes_per_sequence_per_layer(DType kv_dtype) const;
};
SparseKCacheShapes sparsek_cache_shapes(int64_t batch, int64_t heads_kv, int64_t head_dim,
                                        int64_t budget, int64_t window, int64_t score_capacity);

// Checks the cache's tensors and parameters against each other (every call below does too).
void sparsek_cache_validate(const SparseKCache& cache);

// Sets the cache to the state a prefill of lengths[b] tokens leaves: k, v: [B, L, Hkv, D] (BSHD,
// any strides, last dim contiguous), u: float32 [B, Hkv, L], finite; lengths: optional int32 [B]
// in [0, L] (default: every sequence has L tokens; later positions are ignored). L = 0 empties
// the cache. Clears the status. Synchronizes with the stream once to report non-finite scores and
// a capacity overflow as errors.
void sparsek_cache_prefill(const SparseKCache& cache, const TensorView& k, const TensorView& v,
                           const TensorView& u, const TensorView* lengths,
                           Stream stream = nullptr);

// Appends one token per sequence: k_new, v_new: [B, 1, Hkv, D]; u_new: float32 [B, Hkv, 1]. The
// key leaving the window becomes a candidate; candidates that can never be selected again are
// evicted. No host synchronization: bad scores or an overflow set the cache's status (sticky).
void sparsek_cache_append(const SparseKCache& cache, const TensorView& k_new,
                          const TensorView& v_new, const TensorView& u_new,
                          Stream stream = nullptr);

// One decode step's attention for the last appended position: q: [B, 1, Hq, D] (Hq % Hkv == 0),
// out: [B, 1, Hq, D], lse: optional float32 [B, Hq, 1]. Every query head of a KV group reads each
// cached row once. A sequence with no tokens gets 0 and lse -inf.
void sparsek_cache_attend(const SparseKCache& cache, const TensorView& q, const TensorView& out,
                          const TensorView* lse, std::optional<double> softmax_scale = std::nullopt,
                          Stream stream = nullptr);

// append() then attend() in one call, the decode step a generation loop makes: every argument
// of both is checked first. On a GPU the attention starts loading the cache while the append
// still runs (sm_90 and newer), which takes most of the append's time off the step.
void sparsek_cache_step(const SparseKCache& cache, const TensorView& q, const TensorView& k_new,
                        const TensorView& v_new, const TensorView& u_new, const TensorView& out,
                        const TensorView* lse, std::optional<double> softmax_scale = std::nullopt,
                        Stream stream = nullptr);

}  // namespace bsk
