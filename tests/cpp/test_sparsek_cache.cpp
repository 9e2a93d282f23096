// The SparseK decoding cache's C++ API on CPU tensors (include/bsk/sparsek_cache.h): decoding
// token by token must give the prefill definition (bsk::sparsek_attention_forward over the whole
// history, query at the last position) at every step; bad input must throw naming the argument,
// and a bad new score must leave the cache as it was. The CUDA side is tested through Python
// (tests/python/test_sparsek_cache.py) against the same oracle.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "bsk/bsk.h"
#include "test_util.h"

namespace {

using namespace bsk_test;
using bsk::DType;
using bsk::Gate;

// The cache's state tensors (CPU), zero-initialized as an empty cache.
struct CacheStore {
  HostTensor k, v, slot_u, cand_u, cand_pos, cand_row, tau, counts, status;
  bsk::SparseKCache view;

  CacheStore(int64_t B, int64_t H, int64_t D, int64_t kb, int64_t w, int64_t cap, Gate gate,
             DType dt = DType::kFloat64) {
    const bsk::SparseKCacheShapes s = bsk::sparsek_cache_shapes(B, H, D, kb, w, cap);
    k = HostTensor(dt, {s.kv[0], s.kv[1], s.kv[2], s.kv[3]});
    v = HostTensor(dt, {s.kv[0], s.kv[1], s.kv[2], s.kv[3]});
    slot_u = HostTensor(DType::kFloat32, {s.slot_u[0], s.slot_u[1], s.slot_u[2]});
    cand_u = HostTensor(DType::kFloat32, {s.cand[0], s.cand[1], s.cand[2]});
    cand_pos = HostTensor(DType::kInt32, {s.cand[0], s.cand[1], s.cand[2]});
    cand_row = HostTensor(DType::kInt32, {s.cand[0], s.cand[1], s.cand[2]});
    tau = HostTensor(DType::kFloat64, {s.tau[0], s.tau[1]});
    counts = HostTensor(DType::kInt32, {s.counts[0], s.counts[1], s.counts[2]});
    status = HostTensor(DType::kInt32, {s.status[0]});
    counts.fill(0);
    status.fill(0);
    tau.fill(-std::numeric_limits<double>::infinity());
    view.k = k.view();
    view.v = v.view();
    view.slot_u = slot_u.view();
    view.cand_u = cand_u.view();
    view.cand_pos = cand_pos.view();
    view.cand_row = cand_row.view();
    view.tau = tau.view();
    view.counts = counts.view();
    view.status = status.view();
    view.budget = kb;
    view.window = w;
    view.gate = gate;
  }
  std::vector<std::vector<uint64_t>> snapshot() const {
    return {k.storage, v.storage, slot_u.storage, cand_u.storage, cand_pos.storage,
            cand_row.storage, tau.storage, counts.storage, status.storage};
  }
};

struct Stream {  // one token stream per sequence: q [B, T, Hq, D], k/v [B, T, Hkv, D], u [B, Hkv, T]
  HostTensor q, k, v, u;
  Stream(int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, uint64_t seed, bool ties) {
    std::mt19937_64 rng(seed);
    q = HostTensor(DType::kFloat64, {B, T, Hq, D});
    k = HostTensor(DType::kFloat64, {B, T, Hkv, D});
    v = HostTensor(DType::kFloat64, {B, T, Hkv, D});
    u = HostTensor(DType::kFloat32, {B, Hkv, T});
    q.fill_normal(rng);
    k.fill_normal(rng);
    v.fill_normal(rng);
    u.fill_normal(rng);
    if (ties)
      for_each_index(u.shape, [&](const Index& i) { u.set(i, std::floor(2 * u.get(i))); });
  }
};

// A view of sequence b's positions [t0, t0 + n) of a BSHD (or [B, H, T]) tensor, batch of 1.
bsk::TensorView slice_bshd(HostTensor& t, int64_t b, int64_t t0, int64_t n) {
  bsk::TensorView v = t.view();
  v.data = static_cast<char*>(t.data()) + (b * t.stride[0] + t0 * t.stride[1]) * bsk::dtype_size(t.dtype);
  v.shape[0] = 1;
  v.shape[1] = n;
  return v;
}
bsk::TensorView slice_u(HostTensor& u, int64_t b, int64_t n) {
  bsk::TensorView v = u.view();
  v.data = static_cast<char*>(u.data()) + b * u.stride[0] * 4;
  v.shape[0] = 1;
  v.shape[2] = n;
  return v;
}

struct Case {
  const char* name;
  int64_t B, Hq, Hkv, D, kb, w;
  Gate gate;
  bool ties;
  std::vector<int64_t> lengths;
  int64_t steps, cap;
};

class SparseKCacheCpu : public ::testing::TestWithParam<Case> {};

TEST_P(SparseKCacheCpu, DecodeEqualsPrefillDefinition) {
  const Case c = GetParam();
  int64_t L0 = 0;
  for (int64_t L : c.lengths) L0 = std::max(L0, L);
  const int64_t T = L0 + c.steps;
  Stream s(c.B, T, c.Hq, c.Hkv, c.D, 1234 + T, c.ties);
  CacheStore cache(c.B, c.Hkv, c.D, c.kb, c.w, c.cap, c.gate);

  HostTensor lengths(DType::kInt32, {c.B});
  for (int64_t b = 0; b < c.B; ++b) lengths.set({b}, static_cast<double>(c.lengths[b]));
  bsk::TensorView kp = s.k.view(), vp = s.v.view(), up = s.u.view(), lv = lengths.view();
  kp.shape[1] = vp.shape[1] = up.shape[2] = L0;
  bsk::sparsek_cache_prefill(cache.view, kp, vp, up, &lv);

  HostTensor qn(DType::kFloat64, {c.B, 1, c.Hq, c.D}), kn(DType::kFloat64, {c.B, 1, c.Hkv, c.D}),
      vn(DType::kFloat64, {c.B, 1, c.Hkv, c.D}), un(DType::kFloat32, {c.B, c.Hkv, 1});
  HostTensor out(DType::kFloat64, {c.B, 1, c.Hq, c.D}), lse(DType::kFloat32, {c.B, c.Hq, 1});
  double worst = 0.0;
  for (int64_t step = 0; step < c.steps; ++step) {
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t p = c.lengths[b] + step;
      for (int64_t d = 0; d < c.D; ++d) {
        for (int64_t h = 0; h < c.Hq; ++h) qn.set({b, 0, h, d}, s.q.get({b, p, h, d}));
        for (int64_t h = 0; h < c.Hkv; ++h) {
          kn.set({b, 0, h, d}, s.k.get({b, p, h, d}));
          vn.set({b, 0, h, d}, s.v.get({b, p, h, d}));
        }
      }
      for (int64_t h = 0; h < c.Hkv; ++h) un.set({b, h, 0}, s.u.get({b, h, p}));
    }
    bsk::TensorView lsev = lse.view();
    if (step % 2 == 0) {  // the fused step and its two halves take turns
      bsk::sparsek_cache_step(cache.view, qn.view(), kn.view(), vn.view(), un.view(), out.view(),
                              &lsev);
    } else {
      bsk::sparsek_cache_append(cache.view, kn.view(), vn.view(), un.view());
      bsk::sparsek_cache_attend(cache.view, qn.view(), out.view(), &lsev);
    }
    for (int64_t b = 0; b < c.B; ++b) {  // the oracle: the prefill definition at position p
      const int64_t p = c.lengths[b] + step;
      HostTensor ro(DType::kFloat64, {1, 1, c.Hq, c.D}), rl(DType::kFloat32, {1, c.Hq, 1});
      bsk::SparseKParams prm;
      prm.k = c.kb, prm.w = c.w, prm.gate = c.gate;
      bsk::TensorView rlv = rl.view();
      bsk::sparsek_attention_forward(slice_bshd(s.q, b, p, 1), slice_bshd(s.k, b, 0, p + 1),
                                     slice_bshd(s.v, b, 0, p + 1), slice_u(s.u, b, p + 1),
                                     ro.view(), &rlv, prm);
      for (int64_t h = 0; h < c.Hq; ++h) {
        for (int64_t d = 0; d < c.D; ++d)
          worst = std::max(worst, std::abs(out.get({b, 0, h, d}) - ro.get({0, 0, h, d})));
        ASSERT_NEAR(lse.get({b, h, 0}), rl.get({0, h, 0}), 1e-5) << "step " << step;
      }
    }
  }
  EXPECT_LE(worst, 1e-10);
  EXPECT_EQ(cache.status.get({0}), 0.0);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SparseKCacheCpu,
    ::testing::Values(
        Case{"KeyValue", 2, 4, 2, 16, 6, 4, Gate::kKeyValue, false, {10, 3}, 200, 64},
        Case{"ValueTies", 2, 4, 2, 16, 6, 4, Gate::kValue, true, {7, 12}, 200, 64},
        Case{"HardTies", 1, 2, 1, 8, 5, 3, Gate::kNone, true, {0}, 200, 5},
        Case{"WindowOnly", 1, 4, 1, 16, 0, 7, Gate::kKeyValue, false, {3}, 40, 1},
        Case{"SelectionOnly", 1, 4, 1, 16, 6, 0, Gate::kKeyValue, false, {4}, 100, 64},
        Case{"AllCandidates", 1, 2, 2, 16, 500, 3, Gate::kKeyValue, false, {30}, 40, 500}),
    [](const ::testing::TestParamInfo<Case>& i) { return std::string(i.param.name); });

TEST(SparseKCacheCpuErrors, BadInputNamesTheArgumentAndBadScoresLeaveTheCache) {
  Stream s(1, 40, 4, 2, 16, 7, false);
  CacheStore cache(1, 2, 16, 6, 4, 64, Gate::kKeyValue);
  bsk::TensorView kp = s.k.view(), vp = s.v.view(), up = s.u.view();
  kp.shape[1] = vp.shape[1] = up.shape[2] = 30;
  bsk::sparsek_cache_prefill(cache.view, kp, vp, up, nullptr);

  HostTensor kn(DType::kFloat64, {1, 1, 2, 16}), vn(DType::kFloat64, {1, 1, 2, 16}),
      un(DType::kFloat32, {1, 2, 1}), wrong(DType::kFloat64, {1, 2, 2, 16}),
      q(DType::kFloat64, {1, 1, 4, 16}), out(DType::kFloat64, {1, 1, 4, 16});
  kn.fill(0.5), vn.fill(0.25), un.fill(1.0), q.fill(0.1);
  auto expect_arg = [](const std::function<void()>& f, const std::string& arg) {
    try {
      f();
      ADD_FAILURE() << "no error for " << arg;
    } catch (const bsk::InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("argument '" + arg + "'"), std::string::npos) << e.what();
    }
  };
  expect_arg([&] { bsk::sparsek_cache_append(cache.view, wrong.view(), vn.view(), un.view()); }, "k_new");
  HostTensor u64(DType::kFloat64, {1, 2, 1});
  expect_arg([&] { bsk::sparsek_cache_append(cache.view, kn.view(), vn.view(), u64.view()); }, "u_new");
  HostTensor q2(DType::kFloat64, {1, 2, 4, 16});
  expect_arg([&] { bsk::sparsek_cache_attend(cache.view, q2.view(), q2.view(), nullptr); }, "q");
  bsk::SparseKCache bad = cache.view;
  bad.window = 5;  // rows no longer w + k
  expect_arg([&] { bsk::sparsek_cache_attend(bad, q.view(), out.view(), nullptr); }, "k_cache");

  // A step checks the attention's arguments before it appends: a bad one changes nothing.
  {
    const auto before = cache.snapshot();
    expect_arg([&] {
      bsk::sparsek_cache_step(cache.view, q2.view(), kn.view(), vn.view(), un.view(), q2.view(),
                              nullptr);
    }, "q");
    EXPECT_EQ(before, cache.snapshot());
  }

  const auto before = cache.snapshot();
  un.set({0, 1, 0}, std::numeric_limits<double>::quiet_NaN());
  bsk::sparsek_cache_append(cache.view, kn.view(), vn.view(), un.view());
  EXPECT_EQ(cache.status.get({0}), static_cast<double>(bsk::CacheStatus::kNonFiniteScore));
  EXPECT_EQ(cache.status.get({1}), 1.0);  // sequence 0, KV head 1
  auto after = cache.snapshot();
  after[8] = before[8];  // only the status changed
  EXPECT_EQ(before, after);
  bsk::sparsek_cache_attend(cache.view, q.view(), out.view(), nullptr);
  EXPECT_TRUE(std::isnan(out.get({0, 0, 0, 0})));  // a broken cache never looks plausible

  // Flat scores keep every candidate's score: a capacity below that is an error at prefill.
  CacheStore small(1, 2, 16, 4, 2, 8, Gate::kKeyValue);
  HostTensor flat(DType::kFloat32, {1, 2, 30});
  flat.fill(0.5);
  expect_arg([&] { bsk::sparsek_cache_prefill(small.view, kp, vp, flat.view(), nullptr); }, "cand_u");
}

}  // namespace
