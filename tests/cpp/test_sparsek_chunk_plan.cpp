// The SparseK selection's chunk plan (src/common/sparsek_chunk_plan.h): its chunks must tile the
// candidate counts [k + 1, m_max] exactly, in order, for any lengths (the default ones and the
// BSK_SELECT_PLAN overrides), since every m is walked by exactly one chunk. On the CPU, so CI
// checks it without a GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "common/sparsek_chunk_plan.h"

namespace {

using bsk::kernels::sparsek::ChunkPlan;
using bsk::kernels::sparsek::default_chunk_lengths;

void expect_tiles(int n, int k, int m_max, int late, int travel) {
  SCOPED_TRACE("n=" + std::to_string(n) + " k=" + std::to_string(k) +
               " m_max=" + std::to_string(m_max) + " late=" + std::to_string(late) +
               " travel=" + std::to_string(travel));
  const ChunkPlan plan(n, k, m_max, late, travel);
  const int chunks = plan.count();
  ASSERT_GE(chunks, 2);
  EXPECT_EQ(plan.begin(0), k + 1);
  for (int c = 0; c + 1 < chunks; ++c) {
    ASSERT_LE(plan.begin(c), plan.begin(c + 1)) << "chunk " << c;  // in order, no overlap
    // Past the travel-bounded chunks, `late` values each (the last one may be cut by m_max).
    if (c >= plan.c1 && plan.begin(c + 1) <= m_max) {
      EXPECT_EQ(plan.begin(c + 1) - plan.begin(c), late) << "chunk " << c;
    }
  }
  // The last chunk (the spare) starts past m_max, so [k + 1, m_max] is covered with no gap.
  EXPECT_EQ(plan.begin(chunks - 1), m_max + 1);
  EXPECT_LE(plan.begin(chunks - 2), m_max);
}

TEST(SparseKChunkPlan, TilesTheCandidateCountsAtTheDefaultLengths) {
  for (int n : {2, 17, 1000, 4097, 8192, 32768, 100000, 131072, 262144}) {
    for (int k : {1, 5, 64, 2048, 9000}) {
      for (int w : {1, 3, 1024}) {
        const int m_max = n - w + 1;  // Sq = Skv: the last row's candidates
        if (m_max <= k) continue;     // no selection runs (every candidate is in)
        int late = 0, travel = 0;
        default_chunk_lengths(n, late, travel);
        expect_tiles(n, k, m_max, late, travel);
      }
    }
  }
}

TEST(SparseKChunkPlan, TilesTheCandidateCountsAtAnyLengths) {
  for (auto [late, travel] : {std::tuple{1, 1}, std::tuple{3, 7}, std::tuple{64, 256},
                              std::tuple{512, 2048}, std::tuple{4096, 32768},
                              std::tuple{1 << 20, 1}}) {
    for (int n : {10, 3000, 131072}) {
      for (int k : {1, 100, 2048}) {
        if (n - 1 <= k) continue;
        expect_tiles(n, k, n, late, travel);
        expect_tiles(n, k, k + 1, late, travel);  // a single candidate count
      }
    }
  }
}

TEST(SparseKChunkPlan, DefaultLengthsAreTheMeasuredOnes) {
  int late = 0, travel = 0;
  default_chunk_lengths(8192, late, travel);
  EXPECT_EQ(std::make_pair(late, travel), std::make_pair(64, 512));
  default_chunk_lengths(32768, late, travel);
  EXPECT_EQ(std::make_pair(late, travel), std::make_pair(128, 512));
  default_chunk_lengths(131072, late, travel);
  EXPECT_EQ(std::make_pair(late, travel), std::make_pair(512, 2048));
}

}  // namespace
