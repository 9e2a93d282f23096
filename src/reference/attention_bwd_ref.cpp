// CPU reference backward passes (dense and SparseK attention), float64 between load and store.
// The forward is recomputed row by row instead of reading a saved lse: the oracle should depend
// on nothing a kernel under test produced. Both passes share one per-row routine: a row attends
// to a list of keys, each with a logit weight a_p (logit a_p * s_p) and a value weight c_p; dense
// attention is the case a = c = 1.
//
// Per row, with P = softmax(l), o = sum_p P_p c_p v_p, delta = dO . o and dlse the gradient of
// the row's lse (d lse / d l_p = P_p):
//   dv_p += P_p c_p dO,  dl_p = P_p (c_p (dO . v_p) - delta + dlse),
//   dq += scale * a_p dl_p k_p,  dk_p += scale * a_p dl_p q,
// and the gradient w.r.t. the gates is dl_p s_p through the logit and P_p (dO . v_p) through the
// value weight. The SparseK selection is piecewise constant, so no gradient flows through which
// keys are attended; the gates' gradient goes back to u through the SPARSEK VJP of each row.
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "bsk/reference.h"
#include "reference/float_convert.h"

namespace bsk::ref {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

double dot(const double* a, const double* b, int64_t n) {
  double s = 0.0;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

double clip01(double x) { return x <= 0.0 ? 0.0 : (x >= 1.0 ? 1.0 : x); }

struct RowScratch {
  std::vector<double> s, p, dov;
};

// Backward of one query row over keys[0..n) (n > 0). Accumulates into dq_row (D), dk and dv
// ([Skv][D] of the row's KV head). When dgate is not null, dgate[p] receives the gradient w.r.t.
// the gate of key p as the caller's gate mode defines it: logit_gated / value_gated say whether
// a_p / c_p are that gate.
void row_backward(const double* qr, const double* dor, double dlse, const int64_t* keys,
                  const double* a,
                  const double* c, int64_t n, const double* kbuf, const double* vbuf, int64_t D,
                  double scale, double* dq_row, double* dk, double* dv, bool logit_gated,
                  bool value_gated, double* dgate, RowScratch& rs) {
  rs.s.resize(static_cast<size_t>(n));
  rs.p.resize(static_cast<size_t>(n));
  rs.dov.resize(static_cast<size_t>(n));
  double mx = -kInf;
  for (int64_t p = 0; p < n; ++p) {
    rs.s[p] = scale * dot(qr, kbuf + keys[p] * D, D);
    mx = std::max(mx, a[p] * rs.s[p]);
  }
  double denom = 0.0;
  for (int64_t p = 0; p < n; ++p) {
    rs.p[p] = std::exp(a[p] * rs.s[p] - mx);
    denom += rs.p[p];
  }
  double delta = 0.0;  // dO . o
  for (int64_t p = 0; p < n; ++p) {
    rs.p[p] /= denom;
    rs.dov[p] = dot(dor, vbuf + keys[p] * D, D);
    delta += rs.p[p] * c[p] * rs.dov[p];
  }
  for (int64_t p = 0; p < n; ++p) {
    const int64_t j = keys[p];
    const double pc = rs.p[p] * c[p];
    const double dl = rs.p[p] * (c[p] * rs.dov[p] - delta + dlse);
    const double ds = scale * a[p] * dl;
    const double* kr = kbuf + j * D;
    double* dkr = dk + j * D;
    double* dvr = dv + j * D;
    for (int64_t d = 0; d < D; ++d) {
      dvr[d] += pc * dor[d];
      dq_row[d] += ds * kr[d];
      dkr[d] += ds * qr[d];
    }
    if (dgate) {
      double gm = 0.0;
      if (logit_gated) gm += dl * rs.s[p];
      if (value_gated) gm += rs.p[p] * rs.dov[p];
      dgate[p] = gm;
    }
  }
}

// The gradient of lse[b, h, t] (0 without one).
double lse_grad(const TensorView* dlse, int64_t b, int64_t h, int64_t t) {
  if (dlse == nullptr) return 0.0;
  return detail::load_as_double(dlse->data, dlse->dtype,
                                b * dlse->stride[0] + h * dlse->stride[1] + t * dlse->stride[2]);
}

void store_head_rows(const TensorView& t, int64_t b, int64_t h, int64_t S, int64_t D,
                     const double* src) {
  for (int64_t s = 0; s < S; ++s) {
    const int64_t base = b * t.stride[0] + s * t.stride[1] + h * t.stride[2];
    for (int64_t d = 0; d < D; ++d)
      detail::store_from_double(t.data, t.dtype, base + d * t.stride[3], src[s * D + d]);
  }
}

}  // namespace

void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const TensorView& dout, const TensorView* dlse, const TensorView& dq,
                        const TensorView& dk, const TensorView& dv,
                        const AttentionParams& params) {
  const int64_t B = q.shape[0], Sq = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Skv = k.shape[1], Hkv = k.shape[2];
  assert(q.ndim == 4 && k.ndim == 4 && v.ndim == 4 && dout.ndim == 4);
  assert(Hkv >= 1 && Hq % Hkv == 0);
  const int64_t group = Hq / Hkv;
  const double scale = detail::softmax_scale_or_default(params.softmax_scale, D);

  std::vector<double> kbuf(static_cast<size_t>(Skv * D)), vbuf(static_cast<size_t>(Skv * D));
  std::vector<double> dkb(static_cast<size_t>(Skv * D)), dvb(static_cast<size_t>(Skv * D));
  std::vector<double> qbuf(static_cast<size_t>(Sq * D)), dobuf(static_cast<size_t>(Sq * D));
  std::vector<double> dqb(static_cast<size_t>(Sq * D));
  std::vector<int64_t> keys(static_cast<size_t>(Skv));
  for (int64_t j = 0; j < Skv; ++j) keys[j] = j;
  const std::vector<double> ones(static_cast<size_t>(Skv), 1.0);
  RowScratch rs;

  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      detail::load_head_rows(k, b, g, Skv, D, D, kbuf.data());
      detail::load_head_rows(v, b, g, Skv, D, D, vbuf.data());
      std::fill(dkb.begin(), dkb.end(), 0.0);
      std::fill(dvb.begin(), dvb.end(), 0.0);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        detail::load_head_rows(q, b, h, Sq, D, D, qbuf.data());
        detail::load_head_rows(dout, b, h, Sq, D, D, dobuf.data());
        std::fill(dqb.begin(), dqb.end(), 0.0);
        for (int64_t t = 0; t < Sq; ++t) {
          const int64_t i = Skv - Sq + t;  // absolute position, bottom-right aligned
          const int64_t n = params.causal ? std::clamp<int64_t>(i + 1, 0, Skv) : Skv;
          if (n == 0) continue;  // no key: output 0 whatever the inputs, so no gradient
          row_backward(qbuf.data() + t * D, dobuf.data() + t * D, lse_grad(dlse, b, h, t),
                       keys.data(), ones.data(),
                       ones.data(), n, kbuf.data(), vbuf.data(), D, scale, dqb.data() + t * D,
                       dkb.data(), dvb.data(), false, false, nullptr, rs);
        }
        store_head_rows(dq, b, h, Sq, D, dqb.data());
      }
      store_head_rows(dk, b, g, Skv, D, dkb.data());
      store_head_rows(dv, b, g, Skv, D, dvb.data());
    }
  }
}

void sparsek_attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& u, const TensorView& dout,
                                const TensorView* dlse, const TensorView& dq, const TensorView& dk,
                                const TensorView& dv, const TensorView& du,
                                const SparseKParams& params) {
  const int64_t B = q.shape[0], Sq = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Skv = k.shape[1], Hkv = k.shape[2];
  assert(params.k >= 0 && params.w >= 0);
  assert(u.ndim == 3 && u.dtype == DType::kFloat32);
  assert(du.ndim == 3 && du.dtype == DType::kFloat32);
  assert(Hkv >= 1 && Hq % Hkv == 0);
  const int64_t group = Hq / Hkv;
  const int64_t kk = params.k, w = params.w;
  const Gate gate = params.gate;
  const bool logit_gated = gate == Gate::kKeyValue;
  const bool value_gated = gate != Gate::kNone;
  const double scale = detail::softmax_scale_or_default(params.softmax_scale, D);

  std::vector<double> kbuf(static_cast<size_t>(Skv * D)), vbuf(static_cast<size_t>(Skv * D));
  std::vector<double> dkb(static_cast<size_t>(Skv * D)), dvb(static_cast<size_t>(Skv * D));
  std::vector<double> qbuf(static_cast<size_t>(group * Sq * D));
  std::vector<double> dobuf(static_cast<size_t>(group * Sq * D));
  std::vector<double> dqb(static_cast<size_t>(group * Sq * D));
  std::vector<double> dub(static_cast<size_t>(Skv));
  std::vector<float> uu(static_cast<size_t>(Skv)), gates_f(static_cast<size_t>(Skv));
  std::vector<double> gates(static_cast<size_t>(Skv)), gm(static_cast<size_t>(Skv));
  std::vector<int64_t> sel_idx(static_cast<size_t>(Skv)), keys;
  std::vector<double> aw, cw, dgate;
  RowScratch rs;

  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      detail::load_head_rows(k, b, g, Skv, D, D, kbuf.data());
      detail::load_head_rows(v, b, g, Skv, D, D, vbuf.data());
      for (int64_t r = 0; r < group; ++r) {
        detail::load_head_rows(q, b, g * group + r, Sq, D, D, qbuf.data() + r * Sq * D);
        detail::load_head_rows(dout, b, g * group + r, Sq, D, D, dobuf.data() + r * Sq * D);
      }
      const float* ud = static_cast<const float*>(u.data);
      for (int64_t j = 0; j < Skv; ++j)
        uu[j] = ud[b * u.stride[0] + g * u.stride[1] + j * u.stride[2]];
      std::fill(dkb.begin(), dkb.end(), 0.0);
      std::fill(dvb.begin(), dvb.end(), 0.0);
      std::fill(dqb.begin(), dqb.end(), 0.0);
      std::fill(dub.begin(), dub.end(), 0.0);

      for (int64_t t = 0; t < Sq; ++t) {
        const int64_t i = Skv - Sq + t;  // absolute position, bottom-right aligned
        if (i < 0) continue;             // no key: output 0, no gradient
        const int64_t m = std::max<int64_t>(0, i - w + 1);  // C_i = [0, m)
        const int64_t nsel = topk_select(uu.data(), m, kk, sel_idx.data());
        // Soft gates exist where the budget is short of the candidates; with k == 0 nothing is
        // selected, every gate is 0 and there is nothing to differentiate.
        const bool soft = value_gated && m > kk && kk > 0;
        if (soft) {
          // The gates in double from tau (sparsek_gates rounds them to float32, too coarse for
          // an oracle), relative to the k-th largest score as the forward computes them.
          const double tau = sparsek_gates(uu.data(), m, kk, gates_f.data());
          const double zk = uu[sel_idx[nsel - 1]];
          const double tau_rel = tau - zk;
          for (int64_t j = 0; j < m; ++j)
            gates[j] = clip01((static_cast<double>(uu[j]) - zk) - tau_rel);
        }
        keys.clear();
        aw.clear();
        cw.clear();
        for (int64_t p = 0; p < nsel; ++p) {
          const int64_t j = sel_idx[p];
          const double mj = soft ? gates[j] : 1.0;
          keys.push_back(j);
          aw.push_back(logit_gated ? mj : 1.0);
          cw.push_back(value_gated ? mj : 1.0);
        }
        for (int64_t j = std::max<int64_t>(0, i - w + 1); j <= i && w > 0; ++j) {
          keys.push_back(j);  // window keys: never gated
          aw.push_back(1.0);
          cw.push_back(1.0);
        }
        const int64_t n = static_cast<int64_t>(keys.size());
        if (n == 0) continue;
        dgate.assign(static_cast<size_t>(n), 0.0);
        if (soft) std::fill_n(gm.begin(), m, 0.0);
        for (int64_t r = 0; r < group; ++r) {
          const int64_t row = r * Sq + t;
          row_backward(qbuf.data() + row * D, dobuf.data() + row * D,
                       lse_grad(dlse, b, g * group + r, t), keys.data(), aw.data(),
                       cw.data(), n, kbuf.data(), vbuf.data(), D, scale, dqb.data() + row * D,
                       dkb.data(), dvb.data(), logit_gated, value_gated,
                       soft ? dgate.data() : nullptr, rs);
          // The VJP below is linear, so the heads' gate gradients can be summed first.
          if (soft)
            for (int64_t p = 0; p < nsel; ++p) gm[sel_idx[p]] += dgate[p];
        }
        if (!soft) continue;
        // SPARSEK VJP over all of C_i: unselected candidates with a fractional gate still move
        // tau, and so receive gradient.
        int64_t support = 0;
        double gsum = 0.0;
        for (int64_t j = 0; j < m; ++j)
          if (gates[j] > 0.0 && gates[j] < 1.0) {
            ++support;
            gsum += gm[j];
          }
        if (support == 0) continue;
        const double mean = gsum / static_cast<double>(support);
        for (int64_t j = 0; j < m; ++j)
          if (gates[j] > 0.0 && gates[j] < 1.0) dub[j] += gm[j] - mean;
      }

      for (int64_t r = 0; r < group; ++r)
        store_head_rows(dq, b, g * group + r, Sq, D, dqb.data() + r * Sq * D);
      store_head_rows(dk, b, g, Skv, D, dkb.data());
      store_head_rows(dv, b, g, Skv, D, dvb.data());
      float* dud = static_cast<float*>(du.data);
      for (int64_t j = 0; j < Skv; ++j)
        dud[b * du.stride[0] + g * du.stride[1] + j * du.stride[2]] = static_cast<float>(dub[j]);
    }
  }
}

}  // namespace bsk::ref
