// CPU implementation of the SparseK decoding cache (include/bsk/sparsek_cache.h), in float64.
// It keeps the same state, in the same layout and by the same rules, as the CUDA kernels
// (kernels/sparsek_cache.cuh), so the tests can check either against the prefill definition
// (ref::sparsek_attention_forward at the same position).
//
// Why the cache stays small: the candidate set only grows, so a candidate outside the top k
// never re-enters it (its K/V is dropped at once), and tau never decreases, so a score u <= tau
// contributes 0 to every later tau (its entry is dropped too). What is left: the top k (with
// K/V) and the scores in (tau, top-k) (4 + 8 bytes each, no K/V).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "bsk/error.h"
#include "bsk/reference.h"
#include "bsk/sparsek_cache.h"
#include "reference/float_convert.h"
#include "common/sparsek_tau_walk.h"

namespace bsk::ref {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The cache's tensors are contiguous (checked by the front door): plain indexing.
struct Cache {
  const SparseKCache& c;
  int64_t B, H, R, D, C, w, k;
  explicit Cache(const SparseKCache& cache)
      : c(cache),
        B(cache.k.shape[0]),
        H(cache.k.shape[1]),
        R(cache.k.shape[2]),
        D(cache.k.shape[3]),
        C(cache.cand_u.shape[2]),
        w(cache.window),
        k(cache.budget) {}
  int64_t grp(int64_t b, int64_t h) const { return b * H + h; }
  int32_t* counts(int64_t g) const { return static_cast<int32_t*>(c.counts.data) + 3 * g; }
  double& tau(int64_t g) const { return static_cast<double*>(c.tau.data)[g]; }
  float& slot_u(int64_t g, int64_t r) const { return static_cast<float*>(c.slot_u.data)[g * R + r]; }
  float* cu(int64_t g) const { return static_cast<float*>(c.cand_u.data) + g * C; }
  int32_t* cpos(int64_t g) const { return static_cast<int32_t*>(c.cand_pos.data) + g * C; }
  int32_t* crow(int64_t g) const { return static_cast<int32_t*>(c.cand_row.data) + g * C; }
  int32_t* status() const { return static_cast<int32_t*>(c.status.data); }
  // Copies D elements from a BSHD (or cache) view into cache row r of group g.
  void put_row(int64_t g, int64_t r, const TensorView& src, int64_t src_off, int64_t src_sd,
               const TensorView& dst) const {
    const int64_t o = (g * R + r) * D;
    for (int64_t d = 0; d < D; ++d)
      detail::store_from_double(dst.data, dst.dtype, o + d,
                                detail::load_as_double(src.data, src.dtype, src_off + d * src_sd));
  }
  void copy_row(int64_t g, int64_t from, int64_t to) const {
    for (const TensorView* t : {&c.k, &c.v})
      for (int64_t d = 0; d < D; ++d)
        detail::store_from_double(
            t->data, t->dtype, (g * R + to) * D + d,
            detail::load_as_double(t->data, t->dtype, (g * R + from) * D + d));
  }
};

// Order of the spec: a beats b iff u_a > u_b, or equal and pos_a > pos_b.
bool beats(float ua, int32_t pa, float ub, int32_t pb) { return ua > ub || (ua == ub && pa > pb); }

}  // namespace

void sparsek_cache_prefill(const SparseKCache& cache, const TensorView& k, const TensorView& v,
                           const TensorView& u, const TensorView* lengths) {
  const Cache c(cache);
  const int64_t L = k.shape[1];
  const bool soft = cache.gate != Gate::kNone;
  c.status()[0] = c.status()[1] = 0;
  for (int64_t b = 0; b < c.B; ++b) {
    const int64_t Lb = lengths ? static_cast<const int32_t*>(lengths->data)[b * lengths->stride[0]] : L;
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t g = c.grp(b, h);
      auto score = [&](int64_t j) {
        return static_cast<const float*>(u.data)[b * u.stride[0] + h * u.stride[1] + j * u.stride[2]];
      };
      auto put = [&](int64_t row, int64_t j) {
        c.put_row(g, row, k, b * k.stride[0] + j * k.stride[1] + h * k.stride[2], k.stride[3], cache.k);
        c.put_row(g, row, v, b * v.stride[0] + j * v.stride[1] + h * v.stride[2], v.stride[3], cache.v);
        c.slot_u(g, row) = score(j);
      };
      for (int64_t j = std::max<int64_t>(0, Lb - c.w); j < Lb; ++j) put(j % c.w, j);
      const int64_t m = c.k > 0 ? std::max<int64_t>(0, Lb - c.w) : 0;  // candidates [0, m)
      std::vector<int64_t> keep;  // candidate positions kept, ascending
      std::vector<char> sel(static_cast<size_t>(m), 0);
      double tau = -kInf;
      if (m <= c.k) {
        keep.resize(static_cast<size_t>(m));
        std::iota(keep.begin(), keep.end(), 0);
        std::fill(sel.begin(), sel.end(), 1);
      } else {
        std::vector<float> z(static_cast<size_t>(m));
        for (int64_t j = 0; j < m; ++j) z[j] = score(j);
        std::vector<int64_t> top(static_cast<size_t>(c.k));
        topk_select(z.data(), m, c.k, top.data());
        for (int64_t j : top) sel[j] = 1;
        if (soft) {
          std::vector<float> gates(static_cast<size_t>(m));
          tau = sparsek_gates(z.data(), m, c.k, gates.data());
        }
        for (int64_t j = 0; j < m; ++j)
          if (sel[j] || (soft && static_cast<double>(z[j]) > tau)) keep.push_back(j);
      }
      if (static_cast<int64_t>(keep.size()) > c.C) {
        // The state is partly built: mark it broken (as an append's overflow would).
        c.status()[0] = static_cast<int32_t>(CacheStatus::kCapacityExceeded);
        c.status()[1] = static_cast<int32_t>(g);
        throw InvalidArgument("cand_u", "sequence " + std::to_string(b) + ", KV head " +
                                            std::to_string(h) + " has " +
                                            std::to_string(keep.size()) +
                                            " candidate scores above tau, more than the score "
                                            "capacity " + std::to_string(c.C) +
                                            " (cand_u.shape[2]): allocate a larger capacity");
      }
      int32_t rows = 0;
      for (size_t e = 0; e < keep.size(); ++e) {
        const int64_t j = keep[e];
        c.cu(g)[e] = score(j);
        c.cpos(g)[e] = static_cast<int32_t>(j);
        c.crow(g)[e] = -1;
        if (sel[j]) {
          c.crow(g)[e] = static_cast<int32_t>(c.w + rows);
          put(c.w + rows, j);
          ++rows;
        }
      }
      c.counts(g)[0] = static_cast<int32_t>(Lb);
      c.counts(g)[1] = static_cast<int32_t>(keep.size());
      c.counts(g)[2] = rows;
      c.tau(g) = tau;
    }
  }
}

void sparsek_cache_append(const SparseKCache& cache, const TensorView& k_new,
                          const TensorView& v_new, const TensorView& u_new) {
  const Cache c(cache);
  int32_t* st = c.status();
  if (st[0] != 0) return;
  auto unew = [&](int64_t b, int64_t h) {
    return static_cast<const float*>(u_new.data)[b * u_new.stride[0] + h * u_new.stride[1]];
  };
  for (int64_t b = 0; b < c.B; ++b)  // all or nothing: a bad score leaves every group unchanged
    for (int64_t h = 0; h < c.H; ++h)
      if (!std::isfinite(unew(b, h))) {
        st[0] = static_cast<int32_t>(CacheStatus::kNonFiniteScore);
        st[1] = static_cast<int32_t>(c.grp(b, h));
        return;
      }
  const bool soft = cache.gate != Gate::kNone;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t g = c.grp(b, h);
      int32_t* cnt = c.counts(g);
      const int64_t p = cnt[0], cpos = p - c.w;  // the new position; the key leaving the window
      const int64_t knew_off = b * k_new.stride[0] + h * k_new.stride[2];
      const int64_t vnew_off = b * v_new.stride[0] + h * v_new.stride[2];
      // Writes the leaving key's K/V (ring row, or the new token itself when w == 0) into `row`.
      auto take = [&](int64_t row, float uc) {
        if (c.w > 0) {
          c.copy_row(g, cpos % c.w, row);
        } else {
          c.put_row(g, row, k_new, knew_off, k_new.stride[3], cache.k);
          c.put_row(g, row, v_new, vnew_off, v_new.stride[3], cache.v);
        }
        c.slot_u(g, row) = uc;
      };
      if (c.k > 0 && cpos >= 0) {
        const float uc = c.w > 0 ? c.slot_u(g, cpos % c.w) : unew(b, h);
        const int32_t cp = static_cast<int32_t>(cpos);
        float* zu = c.cu(g);
        int32_t* zp = c.cpos(g);
        int32_t* zr = c.crow(g);
        int32_t& n = cnt[1];
        int32_t& nsel = cnt[2];
        const double tau_old = c.tau(g);
        if (cpos + 1 <= c.k) {  // at most k candidates: all selected, every gate 1
          zu[n] = uc, zp[n] = cp, zr[n] = static_cast<int32_t>(c.w + nsel);
          take(c.w + nsel, uc);
          ++n, ++nsel;
        } else if (!soft || static_cast<double>(uc) > tau_old) {
          int64_t worst = -1, free_at = -1;
          for (int64_t e = 0; e < n; ++e) {
            if (zr[e] >= 0) {
              if (worst < 0 || beats(zu[worst], zp[worst], zu[e], zp[e])) worst = e;
            } else if (free_at < 0 && static_cast<double>(zu[e]) <= tau_old) {
              free_at = e;
            }
          }
          const bool in = !beats(zu[worst], zp[worst], uc, cp);
          if (!soft) {  // the top k is all there is
            if (in) {
              zu[worst] = uc, zp[worst] = cp;
              take(zr[worst], uc);
            }
          } else {
            if (free_at < 0) {
              if (n == c.C) {
                st[0] = static_cast<int32_t>(CacheStatus::kCapacityExceeded);
                st[1] = static_cast<int32_t>(g);
                return;
              }
              free_at = n++;
            }
            zu[free_at] = uc, zp[free_at] = cp, zr[free_at] = -1;
            if (in) {
              zr[free_at] = zr[worst];
              zr[worst] = -1;
              take(zr[free_at], uc);
            }
            c.tau(g) = bsk::detail::walk_tau(zu, n, c.k, tau_old);
          }
        }
      }
      if (c.w > 0) {
        const int64_t row = p % c.w;
        c.put_row(g, row, k_new, knew_off, k_new.stride[3], cache.k);
        c.put_row(g, row, v_new, vnew_off, v_new.stride[3], cache.v);
        c.slot_u(g, row) = unew(b, h);
      }
      cnt[0] = static_cast<int32_t>(p + 1);
    }
}

void sparsek_cache_attend(const SparseKCache& cache, const TensorView& q, const TensorView& out,
                          const TensorView* lse, double scale) {
  const Cache c(cache);
  const int64_t Hq = q.shape[2], group = Hq / c.H;
  const bool bad = c.status()[0] != 0;
  const bool soft = cache.gate != Gate::kNone, gate_logits = cache.gate == Gate::kKeyValue;
  std::vector<double> qd(static_cast<size_t>(c.D)), acc(static_cast<size_t>(c.D)),
      logit(static_cast<size_t>(c.R)), vw(static_cast<size_t>(c.R));
  std::vector<int64_t> rows;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t hq = 0; hq < Hq; ++hq) {
      const int64_t g = c.grp(b, hq / group);
      const int32_t* cnt = c.counts(g);
      rows.clear();
      for (int64_t r = 0; r < std::min<int64_t>(c.w, cnt[0]); ++r) rows.push_back(r);
      for (int64_t s = 0; s < cnt[2]; ++s) rows.push_back(c.w + s);
      const int64_t qo = b * q.stride[0] + hq * q.stride[2];
      for (int64_t d = 0; d < c.D; ++d) qd[d] = detail::load_as_double(q.data, q.dtype, qo + d * q.stride[3]);
      double mx = -kInf;
      for (size_t i = 0; i < rows.size(); ++i) {
        const int64_t r = rows[i];
        double s = 0.0;
        for (int64_t d = 0; d < c.D; ++d)
          s += qd[d] * detail::load_as_double(cache.k.data, cache.k.dtype, (g * c.R + r) * c.D + d);
        s *= scale;
        double m = 1.0;
        if (r >= c.w && soft) m = bsk::detail::clip_gate(static_cast<double>(c.slot_u(g, r)) - c.tau(g));
        logit[i] = gate_logits ? m * s : s;
        vw[i] = m;
        mx = std::max(mx, logit[i]);
      }
      double den = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (size_t i = 0; i < rows.size(); ++i) {
        const double e = std::exp(logit[i] - mx);
        den += e;
        for (int64_t d = 0; d < c.D; ++d)
          acc[d] += e * vw[i] *
                    detail::load_as_double(cache.v.data, cache.v.dtype, (g * c.R + rows[i]) * c.D + d);
      }
      const int64_t oo = b * out.stride[0] + hq * out.stride[2];
      const double nan = std::numeric_limits<double>::quiet_NaN();
      for (int64_t d = 0; d < c.D; ++d)
        detail::store_from_double(out.data, out.dtype, oo + d * out.stride[3],
                                  bad ? nan : (rows.empty() ? 0.0 : acc[d] / den));
      if (lse)
        static_cast<float*>(lse->data)[b * lse->stride[0] + hq * lse->stride[1]] =
            static_cast<float>(bad ? nan : (rows.empty() ? -kInf : mx + std::log(den)));
    }
}

}  // namespace bsk::ref
