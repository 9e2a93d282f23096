// The CPU reference backward passes against central finite differences of the reference
// forwards, along random directions in (q, k, v): L = sum(dout * out) + sum(dlse * lse), so
// dL/de at e = 0 along (dq_dir, dk_dir, dv_dir) must equal <dq, dq_dir> + <dk, dk_dir> + <dv, dv_dir>.
// The exact comparisons with autograd (and du) live in tests/python/test_backward_ref.py.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>

#include "bsk/reference.h"
#include "test_util.h"

namespace {

using bsk::DType;
using bsk::Gate;
using bsk_test::HostTensor;
using bsk_test::Index;

double inner(const HostTensor& a, const HostTensor& b) {
  double s = 0.0;
  bsk_test::for_each_index(a.shape, [&](const Index& i) { s += a.get(i) * b.get(i); });
  return s;
}

// x + e * dir, into a contiguous float64 tensor.
HostTensor shifted(const HostTensor& x, const HostTensor& dir, double e) {
  HostTensor y(DType::kFloat64, x.shape);
  bsk_test::for_each_index(x.shape, [&](const Index& i) { y.set(i, x.get(i) + e * dir.get(i)); });
  return y;
}

struct Case {
  int64_t B, Sq, Skv, Hq, Hkv, D;
};

// Checks the directional derivative of L(q, k, v) = <dout, out> + <dlse, lse> of the forward
// against the gradients dq, dk, dv.
// lse is float32, so with a dlse the step is larger and the bound looser (its rounding, about
// 1e-7 relative, divided by the step); without one (dlse null) the check is tight.
void expect_directional(HostTensor& q, HostTensor& k, HostTensor& v, HostTensor& dout,
                        const HostTensor* dlse, HostTensor& dq, HostTensor& dk, HostTensor& dv,
                        std::mt19937_64& rng,
                        const std::function<void(HostTensor&, HostTensor&, HostTensor&,
                                                 HostTensor&, HostTensor&)>& forward) {
  HostTensor rq(DType::kFloat64, q.shape), rk(DType::kFloat64, k.shape),
      rv(DType::kFloat64, v.shape);
  rq.fill_normal(rng);
  rk.fill_normal(rng);
  rv.fill_normal(rng);
  const double e = dlse ? 1e-3 : 1e-5;
  auto loss = [&](double s) {
    HostTensor qs = shifted(q, rq, s), ks = shifted(k, rk, s), vs = shifted(v, rv, s);
    HostTensor out(DType::kFloat64, q.shape), lse(DType::kFloat32, {q.shape[0], q.shape[2], q.shape[1]});
    forward(qs, ks, vs, out, lse);
    double l = inner(dout, out);
    // Rows without keys have lse -inf and no gradient.
    if (dlse)
      bsk_test::for_each_index(lse.shape, [&](const Index& i) {
        if (std::isfinite(lse.get(i))) l += dlse->get(i) * lse.get(i);
      });
    return l;
  };
  const double fd = (loss(e) - loss(-e)) / (2.0 * e);
  const double an = inner(dq, rq) + inner(dk, rk) + inner(dv, rv);
  EXPECT_NEAR(an, fd, (dlse ? 1e-3 : 1e-7) * (1.0 + std::abs(fd)));
}

TEST(AttentionBackwardRef, DenseMatchesFiniteDifferences) {
  const Case cases[] = {{1, 7, 7, 2, 1, 8}, {2, 5, 9, 4, 2, 4}, {1, 9, 5, 2, 2, 4}};
  int n = 0;
  for (const Case& c : cases)
    for (int mode = 0; mode < 4; ++mode) {
      const bool causal = mode & 1, with_dlse = mode & 2;
      SCOPED_TRACE("case " + std::to_string(n) + (causal ? " causal" : "") +
                   (with_dlse ? " dlse" : ""));
      std::mt19937_64 rng(500 + n++);
      HostTensor q = bsk_test::make_bhsd_as_bshd(DType::kFloat64, c.B, c.Sq, c.Hq, c.D);
      HostTensor k(DType::kFloat64, {c.B, c.Skv, c.Hkv, c.D}), v(DType::kFloat64, k.shape);
      HostTensor dout(DType::kFloat64, q.shape), dlse(DType::kFloat32, {c.B, c.Hq, c.Sq});
      for (HostTensor* t : {&q, &k, &v, &dout, &dlse}) t->fill_normal(rng);
      HostTensor dq = bsk_test::make_bhsd_as_bshd(DType::kFloat64, c.B, c.Sq, c.Hq, c.D);
      HostTensor dk = bsk_test::make_bhsd_as_bshd(DType::kFloat64, c.B, c.Skv, c.Hkv, c.D);
      HostTensor dv(DType::kFloat64, k.shape);
      bsk::AttentionParams p;
      p.causal = causal;
      const bsk::TensorView dlv = dlse.view();
      bsk::ref::attention_backward(q.view(), k.view(), v.view(), dout.view(),
                                   with_dlse ? &dlv : nullptr, dq.view(), dk.view(), dv.view(), p);
      EXPECT_TRUE(dq.gaps_untouched() && dk.gaps_untouched());
      expect_directional(q, k, v, dout, with_dlse ? &dlse : nullptr, dq, dk, dv, rng,
                         [&](HostTensor& a, HostTensor& b, HostTensor& d, HostTensor& out,
                             HostTensor& lse) {
                           const bsk::TensorView lv = lse.view();
                           bsk::ref::attention_forward(a.view(), b.view(), d.view(), out.view(),
                                                       &lv, p);
                         });
    }
}

TEST(AttentionBackwardRef, SparseKMatchesFiniteDifferencesAndDuSumsToZero) {
  const Case cases[] = {{1, 12, 12, 2, 1, 4}, {2, 9, 14, 4, 2, 8}};
  int n = 0;
  for (const Case& c : cases)
    for (Gate gate : {Gate::kKeyValue, Gate::kValue, Gate::kNone}) {
      const bool with_dlse = n % 2 == 1;
      SCOPED_TRACE("case " + std::to_string(n) + " gate " + bsk::gate_name(gate) +
                   (with_dlse ? " dlse" : ""));
      std::mt19937_64 rng(700 + n++);
      HostTensor q(DType::kFloat64, {c.B, c.Sq, c.Hq, c.D});
      HostTensor k(DType::kFloat64, {c.B, c.Skv, c.Hkv, c.D}), v(DType::kFloat64, k.shape);
      HostTensor dout(DType::kFloat64, q.shape), u(DType::kFloat32, {c.B, c.Hkv, c.Skv});
      HostTensor dlse(DType::kFloat32, {c.B, c.Hq, c.Sq});
      for (HostTensor* t : {&q, &k, &v, &dout, &dlse}) t->fill_normal(rng);
      u.fill_normal(rng, 0.7);
      HostTensor dq(DType::kFloat64, q.shape), dk(DType::kFloat64, k.shape),
          dv(DType::kFloat64, k.shape), du(DType::kFloat32, u.shape);
      bsk::SparseKParams p;
      p.k = 3;
      p.w = 2;
      p.gate = gate;
      const bsk::TensorView dlv = dlse.view();
      bsk::ref::sparsek_attention_backward(q.view(), k.view(), v.view(), u.view(), dout.view(),
                                           with_dlse ? &dlv : nullptr, dq.view(), dk.view(),
                                           dv.view(), du.view(), p);
      expect_directional(q, k, v, dout, with_dlse ? &dlse : nullptr, dq, dk, dv, rng,
                         [&](HostTensor& a, HostTensor& b, HostTensor& d, HostTensor& out,
                             HostTensor& lse) {
                           const bsk::TensorView lv = lse.view();
                           bsk::ref::sparsek_attention_forward(a.view(), b.view(), d.view(),
                                                               u.view(), out.view(), &lv, p);
                         });
      // Each row's SPARSEK VJP is orthogonal to the all-ones vector (the gates keep summing to
      // k), so du sums to zero per (batch, KV head); gate "none" has no gradient at all.
      double maxabs = 0.0;
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t g = 0; g < c.Hkv; ++g) {
          double s = 0.0;
          for (int64_t j = 0; j < c.Skv; ++j) {
            s += du.get({b, g, j, 0});
            maxabs = std::max(maxabs, std::abs(du.get({b, g, j, 0})));
          }
          EXPECT_NEAR(s, 0.0, 1e-5);
        }
      if (gate == Gate::kNone)
        EXPECT_EQ(maxabs, 0.0);
      else
        EXPECT_GT(maxabs, 0.0);
    }
}

}  // namespace
