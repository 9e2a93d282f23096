// How the SparseK selection cuts its candidate counts into chunks (kernels/sparsek_select.cuh):
// host and device, so the CPU tests check the tiling the kernels rely on.
#pragma once

#include <algorithm>
#include <cmath>

#if defined(__CUDACC__)
#define BSK_PLAN_HD __host__ __device__
#else
#define BSK_PLAN_HD
#endif

namespace bsk::kernels::sparsek {

// How the candidate counts m in [k + 1, m_max] are cut into chunks, one per init block and one
// warp of the walk each. With random scores the cursors travel about n * k / m^2 sorted
// positions per step of m, so the walk is slowest for small m: there chunks hold about `travel`
// positions of travel (uniform steps of -n * k / m), later ones `late` values of m. The walk's
// time grows with the longest chunk and the init kernel's with (chunks x n), so the two lengths
// balance the walk against init (default_chunk_lengths below; bench/results/select-plan-sweep-*).
struct ChunkPlan {
  double a, y0;  // n * k, a / (k + 1)
  int k, m_max, c1, m_star, late, travel;

  ChunkPlan() = default;
  BSK_PLAN_HD ChunkPlan(int n, int k_, int m_max_, int late_, int travel_)
      : k(k_), m_max(m_max_), late(late_), travel(travel_) {
    a = static_cast<double>(n) * k;
    y0 = a / (k + 1);
    // Past m_star a travel-bounded chunk would be longer than `late`.
    const double ms = sqrt(late * a / travel);
    m_star = ms > m_max + 1 ? m_max + 1 : (ms < k + 1 ? k + 1 : static_cast<int>(ms));
    c1 = static_cast<int>(ceil((y0 - a / m_star) / travel));
  }
  // First m of chunk c (chunk c is [begin(c), begin(c + 1))).
  BSK_PLAN_HD int begin(int c) const {
    long long m;
    if (c < c1) {
      m = c == 0 ? k + 1 : static_cast<long long>(a / (y0 - static_cast<double>(c) * travel));
      if (m > m_star) m = m_star;
    } else {
      m = m_star + static_cast<long long>(c - c1) * late;
    }
    return static_cast<int>(m < m_max + 1 ? m : m_max + 1);
  }
  int count() const {  // host: chunks needed (one spare against rounding)
    int c = 0;
    while (begin(c) <= m_max) ++c;
    return c + 1;
  }
};

// The lengths measured best on an H100 (bench/results/select-plan-sweep-lists-h100.txt and
// -bisect-h100.txt, k = 2048): 64:512 at 8192 keys, 128:512 at 32768, 512:2048 at 131072.
inline void default_chunk_lengths(int n, int& late, int& travel) {
  late = n <= 16384 ? 64 : (n <= 65536 ? 128 : 512);
  travel = std::max(512, 4 * late);
}

}  // namespace bsk::kernels::sparsek
