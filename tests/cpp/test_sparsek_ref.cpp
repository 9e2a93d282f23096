// The SparseK reference (SPARSEK operator, its VJP, top-k selection, attention, scores) against
// independent implementations written here: an O(m^2) solver over all (U, W) pairs, bisection,
// full sorts and per-row loops straight from docs/SPARSEK_SPEC.md.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "test_util.h"

namespace {

using namespace bsk_test;
using bsk::DType;
using bsk::Gate;

constexpr double kInf = std::numeric_limits<double>::infinity();

double clip01(double x) { return std::min(1.0, std::max(0.0, x)); }

double clipped_sum(const std::vector<double>& z, double tau) {
  double s = 0.0;
  for (double x : z) s += clip01(x - tau);
  return s;
}

// Brute force: every (U, W) pair of the spec's closed form tau = (sum_{U<r<=W} z_(r) + U - k) /
// (W - U) is tried and kept when U = #{z >= tau+1} and W = #{z > tau} hold for it; the flat piece
// U = W = k (hard top-k, tau in [z_(k+1), z_(k) - 1]) contributes its right end. The largest
// consistent tau is returned.
double brute_tau(const std::vector<float>& zf, int64_t k) {
  const int64_t m = static_cast<int64_t>(zf.size());
  if (m <= k) return -kInf;
  if (k == 0) return kInf;
  std::vector<double> z(zf.begin(), zf.end());
  std::sort(z.begin(), z.end(), [](double a, double b) { return a > b; });
  std::vector<double> P(static_cast<size_t>(m + 1), 0.0);
  double zmax = 0.0;
  for (int64_t r = 0; r < m; ++r) {
    P[r + 1] = P[r] + z[r];
    zmax = std::max(zmax, std::abs(z[r]));
  }
  const double tol = 1e-12 * (1.0 + zmax);
  double best = -kInf;
  if (z[k - 1] - 1.0 >= z[k]) best = z[k - 1] - 1.0;
  for (int64_t U = 0; U < m; ++U)
    for (int64_t W = U + 1; W <= m; ++W) {
      const double tau = (P[W] - P[U] + double(U) - double(k)) / double(W - U);
      const bool ok = (U == 0 || z[U - 1] >= tau + 1.0 - tol) && (z[U] < tau + 1.0 + tol) &&
                      (z[W - 1] > tau - tol) && (W == m || z[W] <= tau + tol);
      if (ok) best = std::max(best, tau);
    }
  EXPECT_GT(best, -kInf) << "brute force found no tau";
  return best;
}

// ---- sparsek_gates ----------------------------------------------------------------------------

void check_gates(const std::vector<float>& z, int64_t k, const std::string& what) {
  SCOPED_TRACE(what + " m=" + std::to_string(z.size()) + " k=" + std::to_string(k));
  const int64_t m = static_cast<int64_t>(z.size());
  std::vector<float> gates(z.size(), std::nanf(""));
  const double tau = bsk::ref::sparsek_gates(z.data(), m, k, gates.data());
  const double tb = brute_tau(z, k);
  ASSERT_NEAR(tau, tb, 1e-9 * (1.0 + std::abs(tb)));
  std::vector<double> zd(z.begin(), z.end());
  // The exact gates at the returned tau sum to k.
  EXPECT_NEAR(clipped_sum(zd, tau), double(k), 1e-9 * double(k));
  double fsum = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    ASSERT_GE(gates[j], 0.0f);
    ASSERT_LE(gates[j], 1.0f);
    EXPECT_NEAR(gates[j], clip01(zd[j] - tau), std::ldexp(1.0, -24)) << "j=" << j;
    fsum += gates[j];
  }
  // The float gates sum to k up to their own rounding.
  EXPECT_NEAR(fsum, double(k), 1e-9 * double(k) + double(m) * std::ldexp(1.0, -24));
  // Every member of the top-k has a positive gate (spec fact).
  std::vector<int64_t> idx(static_cast<size_t>(k));
  const int64_t n = bsk::ref::topk_select(z.data(), m, k, idx.data());
  ASSERT_EQ(n, k);
  for (int64_t p = 0; p < n; ++p) EXPECT_GT(gates[idx[p]], 0.0f) << "selected j=" << idx[p];
}

TEST(SparseKGates, RandomAgainstBruteForce) {
  std::mt19937_64 rng(1234);
  const double sigmas[] = {0.02, 0.1, 0.3, 1.0, 3.0, 20.0};
  for (int trial = 0; trial < 600; ++trial) {
    const int64_t m = 2 + static_cast<int64_t>(rng() % 119);
    const int64_t k = 1 + static_cast<int64_t>(rng() % (m - 1));
    const double sigma = sigmas[trial % 6];
    std::normal_distribution<double> nd(0.0, sigma);
    std::vector<float> z(static_cast<size_t>(m));
    const bool integer = trial % 5 == 4;  // integer scores: ties, breakpoints that coincide
    for (auto& x : z) x = static_cast<float>(integer ? std::round(nd(rng)) : nd(rng));
    check_gates(z, k, "trial " + std::to_string(trial));
    if (HasFatalFailure()) return;
  }
}

// When tau is not unique the gates are the hard top-k mask and the largest tau is reported.
TEST(SparseKGates, HardTopKReportsLargestTau) {
  struct Case {
    std::vector<float> z;
    int64_t k;
    double tau;
    std::vector<float> gates;
  };
  const Case cases[] = {
      {{7, 3, 3, 0}, 1, 6.0, {1, 0, 0, 0}},               // tau in [3, 6]
      {{3, 3, 1, 1}, 2, 2.0, {1, 1, 0, 0}},               // tau in [1, 2]
      {{1, 2, 3, 4, 5}, 2, 3.0, {0, 0, 0, 1, 1}},         // tau in [3, 3]
      {{0, 10, 0, 10, -4}, 2, 9.0, {0, 1, 0, 1, 0}},      // tau in [0, 9]
      {{2.5f, 2.5f, 2.5f, 0.5f}, 3, 1.5, {1, 1, 1, 0}},   // tau in [0.5, 1.5]
      {{-1, -1, -1}, 1, -1.0 - 1.0 / 3.0, {1.f / 3, 1.f / 3, 1.f / 3}},  // unique: ties share
      {{2, 2, 2, 2}, 2, 1.5, {0.5f, 0.5f, 0.5f, 0.5f}},  // unique
      {{5, 5, 5, 1, 1}, 2, 5.0 - 2.0 / 3.0, {2.f / 3, 2.f / 3, 2.f / 3, 0, 0}},
  };
  for (const Case& c : cases) {
    std::vector<float> g(c.z.size(), -1.0f);
    const double tau = bsk::ref::sparsek_gates(c.z.data(), int64_t(c.z.size()), c.k, g.data());
    EXPECT_NEAR(tau, c.tau, 1e-12) << "k=" << c.k << " z0=" << c.z[0];
    for (size_t j = 0; j < g.size(); ++j) EXPECT_NEAR(g[j], c.gates[j], 1e-7) << "j=" << j;
    check_gates(c.z, c.k, "hard case");
  }
  // Exactly the largest: integer inputs give an exact tau.
  const float z[] = {7, 3, 3, 0};
  float g[4];
  EXPECT_EQ(bsk::ref::sparsek_gates(z, 4, 1, g), 6.0);
}

TEST(SparseKGates, AtMostKCandidatesAllOnes) {
  const float z[] = {0.3f, -2.0f, 5.0f};
  for (int64_t k : {3, 4, 100}) {
    float g[3] = {-1, -1, -1};
    EXPECT_EQ(bsk::ref::sparsek_gates(z, 3, k, g), -kInf) << k;
    for (float x : g) EXPECT_EQ(x, 1.0f);
  }
  EXPECT_EQ(bsk::ref::sparsek_gates(z, 0, 2, nullptr), -kInf);  // no candidate at all
}

// Large tied scores: on the raw values 1e17 - 1 == 1e17 in double, which used to collapse the
// breakpoints z and z - 1 and give every tie a gate of 1. Gates depend only on differences, so
// they must come out as for small values, whatever the magnitude.
TEST(SparseKGates, LargeTiedScores) {
  for (float big : {1e12f, 1e17f, 3e38f, -1e17f}) {
    SCOPED_TRACE("big=" + std::to_string(big));
    const std::vector<float> z = {big, big, std::nextafter(big, -kInf) - std::abs(big) * 0.5f};
    std::vector<float> gates(3);
    bsk::ref::sparsek_gates(z.data(), 3, 1, gates.data());
    EXPECT_EQ(gates[0], 0.5f);
    EXPECT_EQ(gates[1], 0.5f);
    EXPECT_EQ(gates[2], 0.0f);
    // 1000 ties, k = 10: every gate is 1/100 and they sum to k.
    const std::vector<float> ties(1000, big);
    std::vector<float> g(1000);
    bsk::ref::sparsek_gates(ties.data(), 1000, 10, g.data());
    double sum = 0.0;
    for (float x : g) {
      EXPECT_NEAR(x, 0.01, 1e-7);
      sum += x;
    }
    EXPECT_NEAR(sum, 10.0, 1e-4);
  }
}

// Scores shifted by a large constant (2^60, where the float32 ulp is 2^37 and the scores below
// are multiples of it, so the shifted values are exact) give the same gates as unshifted.
TEST(SparseKGates, ShiftInvariantAtLargeMagnitude) {
  std::mt19937_64 rng(17);
  std::uniform_int_distribution<int> pick(-6, 6);
  const float shift = 0x1p60f;
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t m = 2 + trial % 30, k = 1 + trial % (m - 1);
    std::vector<float> small(static_cast<size_t>(m)), big(static_cast<size_t>(m));
    for (int64_t j = 0; j < m; ++j) {
      small[j] = static_cast<float>(pick(rng)) * 0x1p37f;
      big[j] = shift + small[j];
      ASSERT_EQ(static_cast<double>(big[j]), 0x1p60 + static_cast<double>(small[j]));
    }
    std::vector<float> g_big(static_cast<size_t>(m)), g_small(static_cast<size_t>(m));
    bsk::ref::sparsek_gates(big.data(), m, k, g_big.data());
    bsk::ref::sparsek_gates(small.data(), m, k, g_small.data());
    for (int64_t j = 0; j < m; ++j)
      EXPECT_EQ(g_big[j], g_small[j]) << "trial " << trial << " j " << j;
  }
}

TEST(SparseKGates, KZeroAllZeros) {
  const float z[] = {0.3f, -2.0f, 5.0f, 5.0f};
  float g[4] = {-1, -1, -1, -1};
  EXPECT_EQ(bsk::ref::sparsek_gates(z, 4, 0, g), kInf);
  for (float x : g) EXPECT_EQ(x, 0.0f);
}

// tau_i is non-decreasing in i as the candidate set grows by one key per step (spec fact).
TEST(SparseKGates, TauNonDecreasingAsCandidatesGrow) {
  std::mt19937_64 rng(99);
  for (double slope : {0.0, 0.01, -0.01}) {
    for (int64_t k : {1, 4, 16}) {
      std::normal_distribution<double> nd(0.0, 1.0);
      std::vector<float> z(400);
      for (size_t j = 0; j < z.size(); ++j) z[j] = static_cast<float>(nd(rng) + slope * double(j));
      std::vector<float> g(z.size());
      double prev = -kInf;
      for (int64_t m = 1; m <= int64_t(z.size()); ++m) {
        const double tau = bsk::ref::sparsek_gates(z.data(), m, k, g.data());
        ASSERT_GE(tau, prev - 1e-12 * (1.0 + std::abs(prev))) << "m=" << m << " k=" << k;
        prev = tau;
      }
    }
  }
}

// ---- sparsek_gates_vjp ------------------------------------------------------------------------

TEST(SparseKGatesVjp, SmallExample) {
  const float gates[] = {0.5f, 0.25f, 1.0f, 0.0f};
  const float gg[] = {1, 2, 3, 4};
  float gz[4];
  bsk::ref::sparsek_gates_vjp(gates, gg, 4, gz);
  EXPECT_FLOAT_EQ(gz[0], -0.5f);
  EXPECT_FLOAT_EQ(gz[1], 0.5f);
  EXPECT_EQ(gz[2], 0.0f);
  EXPECT_EQ(gz[3], 0.0f);
}

// Against central differences of the gates. The gates are piecewise linear in z, so away from
// the kinks (every z_j - tau at least 3h from 0 and 1; a step of h moves tau by at most h) the
// difference quotient is exact up to rounding; the gates are taken in float64 from the returned
// tau to keep that rounding at ~1e-15 / h.
TEST(SparseKGatesVjp, MatchesFiniteDifferences) {
  std::mt19937_64 rng(4242);
  const double h = std::ldexp(1.0, -8);
  int checked = 0;
  for (int attempt = 0; attempt < 20000 && checked < 60; ++attempt) {
    const int64_t m = 3 + static_cast<int64_t>(rng() % 30);
    const int64_t k = 1 + static_cast<int64_t>(rng() % (m - 1));
    std::normal_distribution<double> nd(0.0, 0.4);
    std::vector<float> z(static_cast<size_t>(m));
    for (auto& x : z) x = static_cast<float>(std::ldexp(std::round(std::ldexp(nd(rng), 10)), -10));
    std::vector<float> gates(z.size());
    const double tau = bsk::ref::sparsek_gates(z.data(), m, k, gates.data());
    bool away = true;
    int fractional = 0;
    for (float x : z) {
      const double d = double(x) - tau;
      const bool ok = d <= -3 * h || d >= 1 + 3 * h || (d >= 3 * h && d <= 1 - 3 * h);
      away = away && ok;
      fractional += d > 0 && d < 1;
    }
    if (!away || fractional == 0) continue;
    ++checked;
    std::vector<float> gg(z.size());
    for (auto& x : gg) x = static_cast<float>(nd(rng));
    std::vector<float> gz(z.size(), std::nanf(""));
    bsk::ref::sparsek_gates_vjp(gates.data(), gg.data(), m, gz.data());
    std::vector<float> zp = z, zm = z, scratch(z.size());
    for (int64_t r = 0; r < m; ++r) {
      zp[r] = static_cast<float>(double(z[r]) + h);  // exact: z on a 2^-10 grid, |z| < 64
      zm[r] = static_cast<float>(double(z[r]) - h);
      const double tp = bsk::ref::sparsek_gates(zp.data(), m, k, scratch.data());
      const double tm = bsk::ref::sparsek_gates(zm.data(), m, k, scratch.data());
      double fd = 0.0;
      for (int64_t j = 0; j < m; ++j)
        fd += double(gg[j]) * (clip01(double(zp[j]) - tp) - clip01(double(zm[j]) - tm)) / (2 * h);
      EXPECT_NEAR(gz[r], fd, 1e-6 * (1.0 + std::abs(fd))) << "m=" << m << " k=" << k << " r=" << r;
      zp[r] = z[r];
      zm[r] = z[r];
    }
  }
  EXPECT_GE(checked, 60) << "too few inputs away from the kinks";
}

TEST(SparseKGatesVjp, ZeroWhenNoFractionalGate) {
  // Hard top-k: gates {1, 1, 0, 0}; and m <= k: all ones.
  const float z[] = {5, 4, 0, -3};
  float gates[4], gz[4] = {9, 9, 9, 9};
  const float gg[] = {1.5f, -2.0f, 0.25f, 7.0f};
  bsk::ref::sparsek_gates(z, 4, 2, gates);
  ASSERT_EQ(gates[0], 1.0f);
  ASSERT_EQ(gates[2], 0.0f);
  bsk::ref::sparsek_gates_vjp(gates, gg, 4, gz);
  for (float x : gz) EXPECT_EQ(x, 0.0f);
  bsk::ref::sparsek_gates(z, 4, 4, gates);
  std::fill_n(gz, 4, 9.0f);
  bsk::ref::sparsek_gates_vjp(gates, gg, 4, gz);
  for (float x : gz) EXPECT_EQ(x, 0.0f);
}

// ---- topk_select ------------------------------------------------------------------------------

TEST(TopKSelect, LargerValueFirstTiesTowardLargerIndex) {
  const float z[] = {1, 3, 3, 2, 3};
  int64_t idx[8];
  ASSERT_EQ(bsk::ref::topk_select(z, 5, 2, idx), 2);
  EXPECT_EQ(idx[0], 4);
  EXPECT_EQ(idx[1], 2);
  ASSERT_EQ(bsk::ref::topk_select(z, 5, 4, idx), 4);
  const int64_t want4[] = {4, 2, 1, 3};
  for (int p = 0; p < 4; ++p) EXPECT_EQ(idx[p], want4[p]) << p;
  ASSERT_EQ(bsk::ref::topk_select(z, 5, 8, idx), 5);
  const int64_t want5[] = {4, 2, 1, 3, 0};
  for (int p = 0; p < 5; ++p) EXPECT_EQ(idx[p], want5[p]) << p;
  EXPECT_EQ(bsk::ref::topk_select(z, 5, 0, idx), 0);
  EXPECT_EQ(bsk::ref::topk_select(z, 0, 3, idx), 0);
}

TEST(TopKSelect, RandomWithTiesMatchesStableSort) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t m = 1 + static_cast<int64_t>(rng() % 300);
    const int64_t k = static_cast<int64_t>(rng() % (m + 3));
    std::vector<float> z(static_cast<size_t>(m));
    for (auto& x : z) x = static_cast<float>(rng() % 7) - 3.0f;  // heavy ties
    // Reverse the indices, then a stable sort by value descending: equal values keep the larger
    // index first.
    std::vector<int64_t> want(static_cast<size_t>(m));
    std::iota(want.rbegin(), want.rend(), int64_t{0});
    std::stable_sort(want.begin(), want.end(), [&](int64_t a, int64_t b) { return z[a] > z[b]; });
    std::vector<int64_t> idx(static_cast<size_t>(m) + 3, -1);
    const int64_t n = bsk::ref::topk_select(z.data(), m, k, idx.data());
    ASSERT_EQ(n, std::min(k, m));
    for (int64_t p = 0; p < n; ++p) ASSERT_EQ(idx[p], want[p]) << "trial " << trial << " p=" << p;
  }
}

// ---- sparsek_attention_forward ----------------------------------------------------------------

// Straight from the spec, one row at a time: window, candidates, full sort in the spec's order,
// tau by bisection on sum clip(z - tau, 0, 1) = k (the gates do not depend on which solution),
// union, two-pass softmax.
RefResult naive_sparsek(const HostTensor& q, const HostTensor& k, const HostTensor& v,
                        const HostTensor& u, int64_t kk, int64_t w, Gate gate, double scale,
                        const std::vector<int64_t>& rows = {}) {
  const int64_t B = q.shape[0], Sq = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Skv = k.shape[1], Hkv = k.shape[2];
  RefResult r;
  r.out.assign(static_cast<size_t>(B * Sq * Hq * D), 0.0);
  r.lse.assign(static_cast<size_t>(B * Hq * Sq), -kInf);
  std::vector<int64_t> ts = rows;
  if (ts.empty())
    for (int64_t t = 0; t < Sq; ++t) ts.push_back(t);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t g = h / (Hq / Hkv);
      for (int64_t t : ts) {
        const int64_t i = Skv - Sq + t;
        if (i < 0) continue;
        std::vector<int64_t> cand;
        for (int64_t j = 0; j <= i - w; ++j) cand.push_back(j);
        const int64_t m = static_cast<int64_t>(cand.size());
        std::sort(cand.begin(), cand.end(), [&](int64_t a, int64_t c) {
          const double ua = u.get({b, g, a}), uc = u.get({b, g, c});
          return ua > uc || (ua == uc && a > c);
        });
        const int64_t sel = std::min(kk, m);
        double tau = -kInf;
        if (gate != Gate::kNone && m > kk && kk > 0) {
          std::vector<double> z;
          for (int64_t j : cand) z.push_back(u.get({b, g, j}));
          double lo = *std::min_element(z.begin(), z.end()) - 1.0;  // f = m > k
          double hi = *std::max_element(z.begin(), z.end());        // f = 0 < k
          for (;;) {
            const double mid = lo + 0.5 * (hi - lo);
            if (mid <= lo || mid >= hi) break;
            (clipped_sum(z, mid) >= double(kk) ? lo : hi) = mid;
          }
          tau = lo;
        }
        std::vector<int64_t> keys;
        std::vector<double> lw, vw;
        for (int64_t p = 0; p < sel; ++p) {
          const int64_t j = cand[p];
          const double mj = clip01(u.get({b, g, j}) - tau);
          EXPECT_GT(mj, 0.0) << "a selected key has gate 0 (row " << t << ", key " << j << ")";
          keys.push_back(j);
          lw.push_back(gate == Gate::kKeyValue ? mj : 1.0);
          vw.push_back(gate == Gate::kNone ? 1.0 : mj);
        }
        for (int64_t j = std::max<int64_t>(0, i - w + 1); j <= i; ++j) {
          keys.push_back(j);
          lw.push_back(1.0);
          vw.push_back(1.0);
        }
        if (keys.empty()) continue;
        std::vector<double> l(keys.size());
        double mx = -kInf;
        for (size_t p = 0; p < keys.size(); ++p) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += q.get({b, t, h, d}) * k.get({b, keys[p], g, d});
          l[p] = lw[p] * scale * dot;
          mx = std::max(mx, l[p]);
        }
        double denom = 0.0;
        for (double x : l) denom += std::exp(x - mx);
        for (int64_t d = 0; d < D; ++d) {
          double o = 0.0;
          for (size_t p = 0; p < keys.size(); ++p)
            o += std::exp(l[p] - mx) / denom * vw[p] * v.get({b, keys[p], g, d});
          r.out[static_cast<size_t>(((b * Sq + t) * Hq + h) * D + d)] = o;
        }
        r.lse[static_cast<size_t>((b * Hq + h) * Sq + t)] = mx + std::log(denom);
      }
    }
  return r;
}

// Plain causal sliding-window attention: row i sees keys max(0, i-w+1)..i.
RefResult naive_window(const HostTensor& q, const HostTensor& k, const HostTensor& v, int64_t w,
                       double scale) {
  const int64_t B = q.shape[0], Sq = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Skv = k.shape[1], Hkv = k.shape[2];
  RefResult r;
  r.out.assign(static_cast<size_t>(B * Sq * Hq * D), 0.0);
  r.lse.assign(static_cast<size_t>(B * Hq * Sq), -kInf);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t t = 0; t < Sq; ++t) {
        const int64_t i = Skv - Sq + t, g = h * Hkv / Hq;
        const int64_t lo = std::max<int64_t>(0, i - w + 1);
        if (i < 0) continue;
        std::vector<double> s;
        for (int64_t j = lo; j <= i; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += q.get({b, t, h, d}) * k.get({b, j, g, d});
          s.push_back(scale * dot);
        }
        const double mx = *std::max_element(s.begin(), s.end());
        double denom = 0.0;
        for (double x : s) denom += std::exp(x - mx);
        for (int64_t d = 0; d < D; ++d) {
          double o = 0.0;
          for (int64_t j = lo; j <= i; ++j) o += std::exp(s[j - lo] - mx) * v.get({b, j, g, d});
          r.out[static_cast<size_t>(((b * Sq + t) * Hq + h) * D + d)] = o / denom;
        }
        r.lse[static_cast<size_t>((b * Hq + h) * Sq + t)] = mx + std::log(denom);
      }
  return r;
}

struct Problem {
  HostTensor q, k, v, u, out, lse;
};

enum class UKind { kNormal, kWide, kInteger, kNarrow };

Problem make_problem(uint64_t seed, DType dt, int64_t B, int64_t Sq, int64_t Skv, int64_t Hq,
                     int64_t Hkv, int64_t D, UKind uk = UKind::kNormal, bool strided = false) {
  std::mt19937_64 rng(seed);
  Problem p;
  if (strided) {
    p.q = make_bhsd_as_bshd(dt, B, Sq, Hq, D);
    p.k = make_bhsd_as_bshd(dt, B, Skv, Hkv, D);
    p.v = make_bhsd_as_bshd(dt, B, Skv, Hkv, D);
    p.out = make_bhsd_as_bshd(dt, B, Sq, Hq, D);
    p.u = HostTensor(DType::kFloat32, {B, Hkv, Skv}, {1, B, B * Hkv + 2});
    p.lse = HostTensor(DType::kFloat32, {B, Hq, Sq}, {Hq * Sq + 5, 1, Hq});
  } else {
    p.q = HostTensor(dt, {B, Sq, Hq, D});
    p.k = HostTensor(dt, {B, Skv, Hkv, D});
    p.v = HostTensor(dt, {B, Skv, Hkv, D});
    p.out = HostTensor(dt, {B, Sq, Hq, D});
    p.u = HostTensor(DType::kFloat32, {B, Hkv, Skv});
    p.lse = HostTensor(DType::kFloat32, {B, Hq, Sq});
  }
  p.q.fill_normal(rng);
  p.k.fill_normal(rng);
  p.v.fill_normal(rng);
  std::normal_distribution<double> nd(0.0, 1.0);
  for_each_index(p.u.shape, [&](const Index& i) {
    const double x = nd(rng);
    switch (uk) {
      case UKind::kNormal: p.u.set(i, 0.6 * x); break;
      case UKind::kWide: p.u.set(i, 10.0 * x); break;
      case UKind::kInteger: p.u.set(i, std::round(2.0 * x)); break;
      case UKind::kNarrow: p.u.set(i, 0.05 * x); break;
    }
  });
  return p;
}

void run_ref(Problem& p, int64_t kk, int64_t w, Gate gate, float scale) {
  bsk::SparseKParams sp;
  sp.k = kk;
  sp.w = w;
  sp.gate = gate;
  sp.softmax_scale = scale;
  bsk::TensorView lv = p.lse.view();
  bsk::ref::sparsek_attention_forward(p.q.view(), p.k.view(), p.v.view(), p.u.view(), p.out.view(),
                                      &lv, sp);
}

struct WindowCase {
  int64_t B, Sq, Skv, Hq, Hkv, D, w;
};

// k = 0 is pure sliding-window attention, whatever the gate mode.
TEST(SparseKAttention, KZeroIsSlidingWindow) {
  const WindowCase cases[] = {
      {2, 70, 70, 4, 2, 32, 16}, {1, 30, 90, 2, 1, 16, 5}, {1, 90, 30, 2, 2, 16, 40},
      {1, 25, 25, 2, 2, 8, 1},
  };
  int n = 0;
  for (const WindowCase& c : cases)
    for (Gate gate : {Gate::kKeyValue, Gate::kValue, Gate::kNone}) {
      SCOPED_TRACE("case " + std::to_string(n) + " gate " + bsk::gate_name(gate));
      Problem p = make_problem(100 + n++, DType::kFloat64, c.B, c.Sq, c.Skv, c.Hq, c.Hkv, c.D);
      const float scale = 0.3f;
      run_ref(p, 0, c.w, gate, scale);
      expect_matches(p.out, &p.lse, naive_window(p.q, p.k, p.v, c.w, scale));
    }
}

// w = 0 with k >= Skv selects every causal key with gate 1 (|C_i| <= k): ordinary causal
// attention, for every gate mode; compared with the dense reference.
TEST(SparseKAttention, SelectAllIsDenseCausal) {
  struct Case {
    int64_t B, Sq, Skv, Hq, Hkv, D;
    DType dt;
  };
  const Case cases[] = {
      {2, 64, 64, 4, 2, 32, DType::kFloat64},
      {1, 20, 50, 2, 2, 16, DType::kFloat64},
      {1, 50, 20, 4, 1, 16, DType::kFloat64},
      {1, 33, 33, 2, 1, 64, DType::kFloat32},
  };
  int n = 0;
  for (const Case& c : cases)
    for (int64_t extra : {0, 7})
      for (Gate gate : {Gate::kNone, Gate::kKeyValue, Gate::kValue}) {
        SCOPED_TRACE("case " + std::to_string(n) + " k=Skv+" + std::to_string(extra) + " gate " +
                     bsk::gate_name(gate));
        Problem p = make_problem(200 + n++, c.dt, c.B, c.Sq, c.Skv, c.Hq, c.Hkv, c.D);
        const float scale = 0.2f;
        run_ref(p, c.Skv + extra, 0, gate, scale);
        HostTensor out(c.dt, p.out.shape), lse(DType::kFloat32, p.lse.shape);
        bsk::AttentionParams ap;
        ap.causal = true;
        ap.softmax_scale = scale;
        bsk::TensorView lv = lse.view();
        bsk::ref::attention_forward(p.q.view(), p.k.view(), p.v.view(), out.view(), &lv, ap);
        // Two float64 computations of the same numbers, each rounded once to the dtype: within
        // one ulp of each other (plus float64 noise).
        const double ulp = 2 * unit_roundoff(c.dt);
        int bad = 0;
        for_each_index(out.shape, [&](const Index& i) {
          const double a = p.out.get(i), b = out.get(i);
          if (!(std::abs(a - b) <= ulp * std::abs(b) + 1e-12 * (1 + std::abs(b))) && bad++ < 5)
            ADD_FAILURE() << "out mismatch " << a << " vs dense " << b;
        });
        for_each_index(lse.shape, [&](const Index& i) {
          const double a = p.lse.get(i), b = lse.get(i);
          const bool ok = std::isinf(b) ? a == b : std::abs(a - b) <= std::ldexp(std::abs(b), -23);
          if (!ok && bad++ < 5) ADD_FAILURE() << "lse mismatch " << a << " vs dense " << b;
        });
        EXPECT_EQ(bad, 0);
      }
}

struct SparseCase {
  std::string name;
  int64_t B, Sq, Skv, Hq, Hkv, D, k, w;
  DType dt;
  UKind uk = UKind::kNormal;
  bool strided = false;
};

void PrintTo(const SparseCase& c, std::ostream* os) { *os << c.name; }

class SparseKModesTest : public ::testing::TestWithParam<std::tuple<SparseCase, Gate>> {};

TEST_P(SparseKModesTest, MatchesNaive) {
  const SparseCase& c = std::get<0>(GetParam());
  const Gate gate = std::get<1>(GetParam());
  Problem p = make_problem(std::hash<std::string>{}(c.name), c.dt, c.B, c.Sq, c.Skv, c.Hq, c.Hkv,
                           c.D, c.uk, c.strided);
  const float scale = static_cast<float>(1.0 / std::sqrt(double(c.D)));
  run_ref(p, c.k, c.w, gate, scale);
  expect_matches(p.out, &p.lse, naive_sparsek(p.q, p.k, p.v, p.u, c.k, c.w, gate, scale));
  EXPECT_TRUE(p.out.gaps_untouched());
  EXPECT_TRUE(p.lse.gaps_untouched());
}

const SparseCase kSparseCases[] = {
    {"Square", 2, 96, 96, 4, 2, 32, 8, 8, DType::kFloat64},
    {"SqLtSkv", 1, 40, 100, 2, 2, 16, 5, 3, DType::kFloat64},
    {"SqGtSkv", 1, 100, 40, 2, 1, 16, 4, 6, DType::kFloat64},
    {"MQA_SelectionOnly", 1, 64, 64, 4, 1, 32, 6, 0, DType::kFloat64},
    {"GQA8to2", 1, 48, 48, 8, 2, 16, 5, 4, DType::kFloat64},
    {"IntegerScoresTies", 1, 80, 80, 2, 1, 16, 7, 4, DType::kFloat64, UKind::kInteger},
    {"WideScores", 1, 64, 64, 2, 2, 16, 6, 5, DType::kFloat64, UKind::kWide},
    {"NarrowScores", 1, 64, 64, 2, 2, 16, 6, 5, DType::kFloat64, UKind::kNarrow},
    {"BigK", 1, 50, 50, 2, 2, 16, 30, 2, DType::kFloat64},
    {"WindowWiderThanSeq", 1, 20, 30, 2, 1, 16, 3, 40, DType::kFloat64},
    {"K1W1", 1, 30, 30, 2, 2, 8, 1, 1, DType::kFloat64},
    {"S1", 1, 1, 1, 2, 1, 16, 2, 0, DType::kFloat64},
    {"bf16", 1, 48, 64, 4, 2, 64, 8, 8, DType::kBFloat16},
    {"f16_SqGtSkv", 1, 40, 30, 2, 2, 32, 3, 5, DType::kFloat16},
    {"Strided_f32", 2, 40, 40, 4, 2, 32, 5, 6, DType::kFloat32, UKind::kNormal, true},
};

INSTANTIATE_TEST_SUITE_P(
    Cases, SparseKModesTest,
    ::testing::Combine(::testing::ValuesIn(kSparseCases),
                       ::testing::Values(Gate::kKeyValue, Gate::kValue, Gate::kNone)),
    [](const ::testing::TestParamInfo<std::tuple<SparseCase, Gate>>& info) {
      return std::get<0>(info.param).name + "_" + bsk::gate_name(std::get<1>(info.param));
    });

// The size the tests need the reference to handle: S = 2048 with GQA; sampled rows against the
// naive loop, every row written.
TEST(SparseKAttention, LongSequenceSampledRows) {
  const int64_t S = 2048;
  Problem p = make_problem(2048, DType::kFloat32, 1, S, S, 2, 1, 64);
  // A recency slope so that tau rises along the sequence and selections turn over.
  for (int64_t j = 0; j < S; ++j) p.u.set({0, 0, j}, p.u.get({0, 0, j}) + 0.002 * double(j));
  const float scale = 0.125f;
  const auto t0 = std::chrono::steady_clock::now();
  run_ref(p, 32, 64, Gate::kKeyValue, scale);
  RecordProperty("reference_seconds",
                 std::to_string(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()));
  const std::vector<int64_t> rows = {0, 1, 63, 64, 65, 95, 96, 97, 500, 1023, 1500, 2046, 2047};
  expect_matches(p.out, &p.lse,
                 naive_sparsek(p.q, p.k, p.v, p.u, 32, 64, Gate::kKeyValue, scale, rows), rows);
  int64_t nans = 0;
  for_each_index(p.out.shape, [&](const Index& i) { nans += std::isnan(p.out.get(i)); });
  EXPECT_EQ(nans, 0);
}

// The front door validates, resolves an unset softmax_scale to 1/sqrt(D) and runs the reference.
TEST(SparseKAttention, FrontDoorOnCpu) {
  Problem p = make_problem(31, DType::kFloat32, 2, 37, 45, 4, 2, 64);
  bsk::SparseKParams sp;
  sp.k = 5;
  sp.w = 7;
  bsk::TensorView lv = p.lse.view();
  bsk::sparsek_attention_forward(p.q.view(), p.k.view(), p.v.view(), p.u.view(), p.out.view(), &lv,
                                 sp);
  expect_matches(p.out, &p.lse,
                 naive_sparsek(p.q, p.k, p.v, p.u, 5, 7, Gate::kKeyValue, 1.0 / 8.0));
}

// A non-finite K or V entry at a key a row does not attend (outside its causal range, or a
// candidate that is not selected) must not reach that row.
TEST(SparseKAttention, UnattendedNonFiniteKeyDoesNotLeak) {
  const int64_t S = 24, j = 5, kk = 1, w = 2;
  for (Gate gate : {Gate::kKeyValue, Gate::kValue, Gate::kNone}) {
    SCOPED_TRACE(bsk::gate_name(gate));
    Problem clean = make_problem(77, DType::kFloat32, 1, S, S, 2, 1, 16);
    clean.u.set({0, 0, j}, -100.0);  // the lowest score: never selected while others compete
    run_ref(clean, kk, w, gate, 0.25f);
    Problem bad = make_problem(77, DType::kFloat32, 1, S, S, 2, 1, 16);
    bad.u.set({0, 0, j}, -100.0);
    bad.v.set({0, j, 0, 3}, kInf);
    bad.v.set({0, j, 0, 4}, std::nan(""));
    bad.k.set({0, j, 0, 0}, -kInf);
    run_ref(bad, kk, w, gate, 0.25f);
    for (int64_t t = 0; t < S; ++t) {
      if (t >= j && t < j + w) continue;  // j is in these rows' window
      for (int64_t h = 0; h < 2; ++h) {
        for (int64_t d = 0; d < 16; ++d)
          ASSERT_EQ(bad.out.get({0, t, h, d}), clean.out.get({0, t, h, d}))
              << "row " << t << " head " << h << " d " << d;
        ASSERT_EQ(bad.lse.get({0, h, t}), clean.lse.get({0, h, t})) << "row " << t;
      }
    }
  }
}

// ---- sparsek_scores ---------------------------------------------------------------------------

TEST(SparseKScores, MatchesNaive) {
  std::mt19937_64 rng(77);
  const int64_t B = 2, S = 33, Dm = 48, H = 3;
  // x non-contiguous (a [B, Dm, S] buffer viewed as [B, S, Dm]).
  HostTensor x(DType::kFloat32, {B, S, Dm}, {Dm * S, 1, S}), ws(DType::kFloat32, {Dm, H}),
      slope(DType::kFloat32, {H}), u(DType::kFloat32, {B, H, S});
  x.fill_normal(rng);
  ws.fill_normal(rng);
  slope.fill_normal(rng, 0.1);
  bsk::ref::sparsek_scores(x.view(), ws.view(), slope.view(), u.view());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < S; ++j) {
        double want = slope.get({h}) * double(j);
        for (int64_t c = 0; c < Dm; ++c) want += x.get({b, j, c}) * ws.get({c, h});
        EXPECT_NEAR(u.get({b, h, j}), want, std::abs(want) * std::ldexp(1.0, -24) + 1e-12)
            << b << "," << h << "," << j;
      }
}

}  // namespace
