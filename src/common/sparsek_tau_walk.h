// tau of the SPARSEK operator, found by walking up from a lower bound (docs/SPARSEK_SPEC.md):
// f(t) = sum_j clip(z_j - t, 0, 1) is non-increasing and linear between breakpoints (z_j and
// z_j - 1). From `lo` with f(lo) >= k, one pass over the scores gives the piece to the right of
// lo: U = #{z - 1 > lo} (gate 1 there), W = #{z > lo}, S = sum of z over lo < z <= lo + 1 (the
// band) and the next breakpoint nb. On that piece f(t) = U + S - (W - U) t, so either the root
// (U + S - k) / (W - U) lies before nb, or the walk moves to nb and makes another pass. tau only
// grows along a sequence, so in decoding the walk starts at the previous tau and crosses few
// breakpoints per token.
//
// Shared by the CPU cache (one loop per pass) and the CUDA kernels (one block-wide reduction per
// pass), so both take the same steps.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define BSK_HD __host__ __device__ __forceinline__
#else
#define BSK_HD inline
#endif

namespace bsk::detail {

struct TauPiece {
  long long U = 0, W = 0;
  double S = 0.0;
  double nb = INFINITY;  // the next breakpoint above lo (inf: none)
};

// One score's share of the piece to the right of lo.
BSK_HD void tau_piece_add(TauPiece& p, double z, double lo) {
  if (!(z > lo)) return;
  ++p.W;
  if (z - 1.0 > lo) {
    ++p.U;
    p.nb = fmin(p.nb, z - 1.0);
  } else {
    p.S += z;
    p.nb = fmin(p.nb, z);
  }
}

BSK_HD TauPiece tau_piece_merge(const TauPiece& a, const TauPiece& b) {
  TauPiece r;
  r.U = a.U + b.U;
  r.W = a.W + b.W;
  r.S = a.S + b.S;
  r.nb = fmin(a.nb, b.nb);
  return r;
}

// Given the piece at lo (f(lo) >= k), either returns true with tau, or false with lo moved to
// the next breakpoint (f(lo) >= k still holds there).
BSK_HD bool tau_piece_step(const TauPiece& p, long long k, double& lo, double& tau) {
  if (p.W == p.U) {  // f is flat (= U) up to nb, where a score enters the band and f falls
    if (p.U == k) {
      tau = p.nb;
      return true;
    }
  } else {
    const double t = (static_cast<double>(p.U - k) + p.S) / static_cast<double>(p.W - p.U);
    if (t < p.nb) {
      tau = fmax(t, lo);
      return true;
    }
  }
  lo = p.nb;
  return false;
}

BSK_HD double clip_gate(double x) { return x <= 0.0 ? 0.0 : (x >= 1.0 ? 1.0 : x); }

// Host walk over z[0, n) (entries with z <= lo simply do not count).
inline double walk_tau(const float* z, int64_t n, int64_t k, double tau_old) {
  double lo = tau_old;
  if (!(lo > -INFINITY)) {  // first tau: below every score, f = n > k
    lo = INFINITY;
    for (int64_t i = 0; i < n; ++i) lo = fmin(lo, static_cast<double>(z[i]));
    lo -= 1.0;
  }
  double tau = lo;
  for (;;) {
    TauPiece p;
    for (int64_t i = 0; i < n; ++i) tau_piece_add(p, static_cast<double>(z[i]), lo);
    if (tau_piece_step(p, k, lo, tau)) return tau;
  }
}

}  // namespace bsk::detail
