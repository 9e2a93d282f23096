// CPU reference for SparseK attention (docs/SPARSEK_SPEC.md): the SPARSEK operator, its VJP,
// top-k selection, the attention forward and the paper's scorer. Everything accumulates in
// float64.
//
// Attention walks the query rows of one (batch, KV head) in order of position: the candidate
// set C_i = [0, i-w] only grows, so the candidates are kept sorted in the spec's order (larger u
// first, ties toward the larger index) by insertion. The selection S_i is then a prefix of that
// order, tau_i comes from the sorted values, and both are shared by the query heads of the group.
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "bsk/reference.h"
#include "reference/float_convert.h"

namespace bsk::ref {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// f(b) = sum_r clip(z_r - b, 0, 1) for z sorted in descending order.
double clipped_sum(const double* z, int64_t m, double b) {
  double s = 0.0;
  for (int64_t r = 0; r < m; ++r) {
    const double x = z[r] - b;
    if (x <= 0.0) break;  // sorted: every later entry contributes 0 too
    s += x < 1.0 ? x : 1.0;
  }
  return s;
}

// tau of the SPARSEK operator for z sorted in descending order, 0 < k < m. The largest
// breakpoint b in {z_r, z_r - 1} with f(b) >= k is found by binary search (f is non-increasing;
// f(min z - 1) = m > k and f(max z) = 0 < k). If f(b) == k, b is the largest solution. Otherwise
// the solution lies strictly between b and the next breakpoint, where f is linear with
// U = #{z >= tau + 1} = #{z - 1 > b} and W = #{z > tau} = #{z > b}, and the spec's closed form
// tau = (sum_{U < r <= W} z_(r) + U - k) / (W - U) applies.
double tau_sorted(const double* z, int64_t m, int64_t k, std::vector<double>& bp) {
  assert(0 < k && k < m);
  bp.resize(static_cast<size_t>(2 * m));
  // Ascending: z_r - 1 and z_r for r from the smallest z up, merged.
  {
    int64_t a = m - 1, c = m - 1, o = 0;  // a walks z_r - 1, c walks z_r (both ascending)
    while (a >= 0 || c >= 0) {
      if (c < 0 || (a >= 0 && z[a] - 1.0 <= z[c])) {
        bp[o++] = z[a--] - 1.0;
      } else {
        bp[o++] = z[c--];
      }
    }
  }
  const double kd = static_cast<double>(k);
  int64_t lo = 0, hi = 2 * m - 1;  // f(bp[lo]) >= k > f(bp[hi])
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (clipped_sum(z, m, bp[mid]) >= kd)
      lo = mid;
    else
      hi = mid;
  }
  const double b = bp[lo], bn = bp[hi];
  if (clipped_sum(z, m, b) == kd) return b;
  int64_t U = 0, W = 0;
  while (U < m && z[U] - 1.0 > b) ++U;
  while (W < m && z[W] > b) ++W;
  if (W <= U) return b;  // unreachable in exact arithmetic: f is not flat on (b, bn)
  double mid_sum = 0.0;
  for (int64_t r = U; r < W; ++r) mid_sum += z[r];
  const double tau = (mid_sum + static_cast<double>(U) - kd) / static_cast<double>(W - U);
  return std::clamp(tau, b, bn);
}

double clip01(double x) { return x <= 0.0 ? 0.0 : (x >= 1.0 ? 1.0 : x); }

// tau - z_(k) for z sorted in descending order, 0 < k < m; the gate of z_j is then
// clip01((z_j - z_(k)) - tau_rel). tau lies in [z_(k) - 1, z_(k)), so on the shifted values
// y = z - z_(k) every breakpoint and partial sum tau depends on stays within a few units of 0,
// where double resolves far below float32's precision. On z itself a large magnitude swallows
// the 1 that separates the breakpoints z_r and z_r - 1 (1e17 - 1 == 1e17 in double), and ties
// then come out as gates of 1 instead of shares of k. A shifted value is exact where it matters
// (|y| < 2: two float32 within a factor 2 of each other subtract exactly) and rounds only where it
// is clipped anyway.
double tau_rel_sorted(const double* z, int64_t m, int64_t k, std::vector<double>& y,
                      std::vector<double>& bp) {
  const double zk = z[k - 1];
  y.resize(static_cast<size_t>(m));
  for (int64_t r = 0; r < m; ++r) y[r] = z[r] - zk;
  return tau_sorted(y.data(), m, k, bp);
}

// The spec's order on candidates: j beats j' iff z_j > z_j' or (z_j == z_j' and j > j').
struct SpecOrder {
  const float* z;
  bool operator()(int64_t a, int64_t b) const { return z[a] > z[b] || (z[a] == z[b] && a > b); }
};

// q . k with four interleaved partial sums (d mod 4), added pairwise at the end: independent
// chains the compiler can overlap or vectorize, in a fixed order.
double dot_product(const double* a, const double* b, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    s0 += a[d] * b[d];
    s1 += a[d + 1] * b[d + 1];
    s2 += a[d + 2] * b[d + 2];
    s3 += a[d + 3] * b[d + 3];
  }
  for (; d < n; ++d) s0 += a[d] * b[d];
  return (s0 + s2) + (s1 + s3);
}

}  // namespace

double sparsek_gates(const float* z, int64_t m, int64_t k, float* gates) {
  if (m <= 0) return -kInf;
  if (m <= k) {
    std::fill_n(gates, m, 1.0f);
    return -kInf;
  }
  if (k <= 0) {
    std::fill_n(gates, m, 0.0f);
    return kInf;
  }
  std::vector<double> zs(z, z + m);
  std::sort(zs.begin(), zs.end(), std::greater<double>());
  std::vector<double> y, bp;
  const double zk = zs[k - 1];
  const double tau_rel = tau_rel_sorted(zs.data(), m, k, y, bp);
  for (int64_t j = 0; j < m; ++j)
    gates[j] = static_cast<float>(clip01((static_cast<double>(z[j]) - zk) - tau_rel));
  return zk + tau_rel;
}

void sparsek_gates_vjp(const float* gates, const float* grad_gates, int64_t m, float* grad_z) {
  int64_t support = 0;
  double dot = 0.0;
  for (int64_t j = 0; j < m; ++j) {
    if (gates[j] > 0.0f && gates[j] < 1.0f) {
      ++support;
      dot += static_cast<double>(grad_gates[j]);
    }
  }
  if (support == 0) {
    std::fill_n(grad_z, m, 0.0f);
    return;
  }
  const double mean = dot / static_cast<double>(support);
  for (int64_t j = 0; j < m; ++j) {
    const bool s = gates[j] > 0.0f && gates[j] < 1.0f;
    grad_z[j] = s ? static_cast<float>(static_cast<double>(grad_gates[j]) - mean) : 0.0f;
  }
}

int64_t topk_select(const float* z, int64_t m, int64_t k, int64_t* idx) {
  const int64_t n = std::max<int64_t>(0, std::min(k, m));
  if (n == 0) return 0;
  std::vector<int64_t> all(static_cast<size_t>(m));
  std::iota(all.begin(), all.end(), int64_t{0});
  std::partial_sort(all.begin(), all.begin() + n, all.end(), SpecOrder{z});
  std::copy_n(all.begin(), n, idx);
  return n;
}

void sparsek_attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                               const TensorView& u, const TensorView& out, const TensorView* lse,
                               const SparseKParams& params) {
  const int64_t B = q.shape[0], Sq = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Skv = k.shape[1], Hkv = k.shape[2];
  assert(params.k >= 0 && params.w >= 0);
  assert(u.ndim == 3 && u.dtype == DType::kFloat32);
  if (B == 0 || Sq == 0 || Hq == 0) return;
  assert(Hkv >= 1 && Hq % Hkv == 0);
  const int64_t group = Hq / Hkv;
  const int64_t kk = params.k, w = params.w;
  const Gate gate = params.gate;
  const double scale = detail::softmax_scale_or_default(params.softmax_scale, D);

  std::vector<double> kbuf(static_cast<size_t>(Skv * D)), vbuf(static_cast<size_t>(Skv * D));
  std::vector<double> qbuf(static_cast<size_t>(group * Sq * D));
  std::vector<float> uu(static_cast<size_t>(Skv));
  std::vector<int64_t> order;  // candidates inserted so far, in the spec's order
  std::vector<double> zs;      // their scores, same order (descending)
  std::vector<double> ys, bp;
  // The attended keys of the current row, with their logit and value weights.
  std::vector<int64_t> keys;
  std::vector<double> logit_w, value_w, logits, acc(static_cast<size_t>(D));

  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      detail::load_head_rows(k, b, g, Skv, D, D, kbuf.data());
      detail::load_head_rows(v, b, g, Skv, D, D, vbuf.data());
      for (int64_t r = 0; r < group; ++r)
        detail::load_head_rows(q, b, g * group + r, Sq, D, D, qbuf.data() + r * Sq * D);
      const float* ud = static_cast<const float*>(u.data);
      for (int64_t j = 0; j < Skv; ++j)
        uu[j] = ud[b * u.stride[0] + g * u.stride[1] + j * u.stride[2]];
      order.clear();
      zs.clear();

      for (int64_t t = 0; t < Sq; ++t) {
        const int64_t i = Skv - Sq + t;  // absolute position, bottom-right aligned
        keys.clear();
        logit_w.clear();
        value_w.clear();
        if (i >= 0) {
          // Candidates C_i = [0, m).
          const int64_t m = std::max<int64_t>(0, i - w + 1);
          while (static_cast<int64_t>(order.size()) < m) {
            const int64_t j = static_cast<int64_t>(order.size());
            const double zj = uu[j];
            // j is larger than every index already in: it goes before all equal scores.
            const auto pos = std::lower_bound(zs.begin(), zs.end(), zj, std::greater<double>());
            const auto off = pos - zs.begin();
            zs.insert(pos, zj);
            order.insert(order.begin() + off, j);
          }
          const int64_t sel = std::min(kk, m);
          const bool soft = gate != Gate::kNone && m > kk;
          // kk == 0 selects nothing, so soft gates only need a tau where 0 < kk < m.
          const double zk = soft && kk > 0 ? zs[kk - 1] : 0.0;
          const double tau_rel = soft && kk > 0 ? tau_rel_sorted(zs.data(), m, kk, ys, bp) : 0.0;
          for (int64_t p = 0; p < sel; ++p) {
            const int64_t j = order[p];
            const double mj =
                soft ? clip01((static_cast<double>(uu[j]) - zk) - tau_rel) : 1.0;
            keys.push_back(j);
            logit_w.push_back(gate == Gate::kKeyValue ? mj : 1.0);
            value_w.push_back(gate == Gate::kNone ? 1.0 : mj);
          }
          // Window W_i = [max(0, i-w+1), i]: weight 1, never gated.
          for (int64_t j = std::max<int64_t>(0, i - w + 1); j <= i && w > 0; ++j) {
            keys.push_back(j);
            logit_w.push_back(1.0);
            value_w.push_back(1.0);
          }
        }
        const int64_t n = static_cast<int64_t>(keys.size());
        logits.resize(static_cast<size_t>(n));

        for (int64_t r = 0; r < group; ++r) {
          const int64_t h = g * group + r;
          const int64_t obase = b * out.stride[0] + t * out.stride[1] + h * out.stride[2];
          double row_lse = -kInf;
          if (n == 0) {
            for (int64_t d = 0; d < D; ++d)
              detail::store_from_double(out.data, out.dtype, obase + d * out.stride[3], 0.0);
          } else {
            const double* qr = qbuf.data() + (r * Sq + t) * D;
            double mx = -kInf;
            for (int64_t p = 0; p < n; ++p) {
              const double* kr = kbuf.data() + keys[p] * D;
              const double dot = dot_product(qr, kr, D);
              logits[p] = logit_w[p] * (scale * dot);
              mx = std::max(mx, logits[p]);
            }
            double denom = 0.0;
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t p = 0; p < n; ++p) {
              const double e = std::exp(logits[p] - mx);
              denom += e;
              const double c = e * value_w[p];
              const double* vr = vbuf.data() + keys[p] * D;
              for (int64_t d = 0; d < D; ++d) acc[d] += c * vr[d];
            }
            for (int64_t d = 0; d < D; ++d)
              detail::store_from_double(out.data, out.dtype, obase + d * out.stride[3],
                                        acc[d] / denom);
            row_lse = mx + std::log(denom);
          }
          if (lse) {
            float* ld = static_cast<float*>(lse->data);
            ld[b * lse->stride[0] + h * lse->stride[1] + t * lse->stride[2]] =
                static_cast<float>(row_lse);
          }
        }
      }
    }
  }
}

void sparsek_scores(const TensorView& x, const TensorView& w_score, const TensorView& slope,
                    const TensorView& u) {
  assert(x.ndim == 3 && w_score.ndim == 2 && u.ndim == 3);
  const int64_t B = x.shape[0], S = x.shape[1], Dm = x.shape[2], H = w_score.shape[1];
  const float* xd = static_cast<const float*>(x.data);
  const float* wd = static_cast<const float*>(w_score.data);
  const float* sd = static_cast<const float*>(slope.data);
  float* ud = static_cast<float*>(u.data);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      // slope: [Hkv], or a single value (0-D or [1]) shared by every head.
      const int64_t si = (slope.ndim == 0 || slope.shape[0] == 1) ? 0 : h * slope.stride[0];
      const double sl = sd[si];
      for (int64_t j = 0; j < S; ++j) {
        double acc = 0.0;
        for (int64_t c = 0; c < Dm; ++c)
          acc += static_cast<double>(xd[b * x.stride[0] + j * x.stride[1] + c * x.stride[2]]) *
                 static_cast<double>(wd[c * w_score.stride[0] + h * w_score.stride[1]]);
        ud[b * u.stride[0] + h * u.stride[1] + j * u.stride[2]] =
            static_cast<float>(acc + sl * static_cast<double>(j));
      }
    }
}

}  // namespace bsk::ref
