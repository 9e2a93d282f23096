// Shared helpers of the C++ tests: host tensors with arbitrary strides, random fills, and the
// tests' own float16/bfloat16 conversions (bit manipulation from float, a different code path
// from the reference's src/reference/float_convert.h, so one cannot hide a bug of the other).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "bsk/bsk.h"

namespace bsk_test {

using bsk::DType;

// ---- float16 / bfloat16 from and to float, by bits ----------------------------------------------

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> IEEE half, round to nearest even.
inline uint16_t f32_to_f16(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t exp = (x >> 23) & 0xFFu;
  uint32_t mant = x & 0x7FFFFFu;
  if (exp == 0xFFu) return static_cast<uint16_t>(sign | 0x7C00u | (mant ? 0x200u : 0u));
  const int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
  if (e <= 0) {  // half subnormal (or zero)
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may reach inf: correct
  return static_cast<uint16_t>(sign | h);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {
    const float a = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return sign ? -a : a;
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));
  return bits_float(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

inline uint16_t f32_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // NaN
  const uint32_t rounded = x + 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}
inline float bf16_to_f32(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// Unit roundoff and half the smallest subnormal of each dtype: a correctly rounded x' of x has
// |x' - x| <= |x| * unit_roundoff + half_min_subnormal.
inline double unit_roundoff(DType dt) {
  switch (dt) {
    case DType::kFloat16: return std::ldexp(1.0, -11);
    case DType::kBFloat16: return std::ldexp(1.0, -8);
    case DType::kFloat32: return std::ldexp(1.0, -24);
    default: return std::ldexp(1.0, -53);
  }
}
inline double half_min_subnormal(DType dt) {
  switch (dt) {
    case DType::kFloat16: return std::ldexp(1.0, -25);
    case DType::kBFloat16: return std::ldexp(1.0, -134);
    case DType::kFloat32: return std::ldexp(1.0, -150);
    default: return 0.0;
  }
}

// Rounds through the dtype (via float: the values it is used on are float-representable or the
// double-rounding slack is far below any tolerance it feeds).
inline double round_to(DType dt, double x) {
  switch (dt) {
    case DType::kFloat16: return f16_to_f32(f32_to_f16(static_cast<float>(x)));
    case DType::kBFloat16: return bf16_to_f32(f32_to_bf16(static_cast<float>(x)));
    case DType::kFloat32: return static_cast<float>(x);
    default: return x;
  }
}

// ---- host tensors -------------------------------------------------------------------------------

using Index = std::array<int64_t, 4>;

// Calls fn(index) for every index of `shape` (row-major order).
inline void for_each_index(const std::vector<int64_t>& shape, const std::function<void(const Index&)>& fn) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  Index idx{};
  for (int64_t lin = 0; lin < n; ++lin) {
    int64_t rem = lin;
    for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
      idx[d] = rem % shape[d];
      rem /= shape[d];
    }
    fn(idx);
  }
}

inline std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> st(shape.size());
  int64_t s = 1;
  for (int d = static_cast<int>(shape.size()) - 1; d >= 0; --d) {
    st[d] = s;
    s *= shape[d];
  }
  return st;
}

// A CPU tensor owning its storage: any shape (up to 4-D) and non-negative strides; the storage
// spans exactly the addressed elements (plus whatever gaps the strides leave), 8-byte aligned.
struct HostTensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape, stride;
  std::vector<uint64_t> storage;
  int64_t span = 0;  // elements of storage addressed by offsets [0, span)

  HostTensor() = default;
  HostTensor(DType dt, std::vector<int64_t> shp, std::vector<int64_t> str = {})
      : dtype(dt), shape(std::move(shp)), stride(std::move(str)) {
    if (stride.empty()) stride = contiguous_strides(shape);
    int64_t numel = 1, last = 0;
    for (size_t d = 0; d < shape.size(); ++d) {
      numel *= shape[d];
      if (shape[d] > 0) last += (shape[d] - 1) * stride[d];
    }
    span = numel == 0 ? 0 : last + 1;
    const size_t bytes = static_cast<size_t>(span) * bsk::dtype_size(dtype);
    storage.assign((bytes + 7) / 8, ~uint64_t{0});  // poisoned: all 0xFF bytes (NaN)
  }

  void* data() { return storage.empty() ? nullptr : storage.data(); }
  const void* data() const { return storage.empty() ? nullptr : storage.data(); }
  size_t bytes() const { return static_cast<size_t>(span) * bsk::dtype_size(dtype); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }

  bsk::TensorView view(bsk::Device dev = {}) {
    bsk::TensorView t;
    t.data = data();
    t.dtype = dtype;
    t.device = dev;
    t.ndim = static_cast<int>(shape.size());
    for (size_t d = 0; d < shape.size(); ++d) {
      t.shape[d] = shape[d];
      t.stride[d] = stride[d];
    }
    return t;
  }

  int64_t offset(const Index& i) const {
    int64_t o = 0;
    for (size_t d = 0; d < shape.size(); ++d) o += i[d] * stride[d];
    return o;
  }

  double get_at(int64_t o) const {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(storage.data());
    switch (dtype) {
      case DType::kFloat16: {
        uint16_t h;
        std::memcpy(&h, p + 2 * o, 2);
        return f16_to_f32(h);
      }
      case DType::kBFloat16: {
        uint16_t h;
        std::memcpy(&h, p + 2 * o, 2);
        return bf16_to_f32(h);
      }
      case DType::kFloat32: {
        float f;
        std::memcpy(&f, p + 4 * o, 4);
        return f;
      }
      case DType::kFloat64: {
        double f;
        std::memcpy(&f, p + 8 * o, 8);
        return f;
      }
      case DType::kInt64: {
        int64_t f;
        std::memcpy(&f, p + 8 * o, 8);
        return static_cast<double>(f);
      }
      case DType::kInt32: {
        int32_t f;
        std::memcpy(&f, p + 4 * o, 4);
        return static_cast<double>(f);
      }
    }
    return 0.0;
  }
  double get(const Index& i) const { return get_at(offset(i)); }

  // Stores x (rounded to the dtype through float for the 16-bit types).
  void set(const Index& i, double x) {
    unsigned char* p = reinterpret_cast<unsigned char*>(storage.data());
    const int64_t o = offset(i);
    switch (dtype) {
      case DType::kFloat16: {
        const uint16_t h = f32_to_f16(static_cast<float>(x));
        std::memcpy(p + 2 * o, &h, 2);
        return;
      }
      case DType::kBFloat16: {
        const uint16_t h = f32_to_bf16(static_cast<float>(x));
        std::memcpy(p + 2 * o, &h, 2);
        return;
      }
      case DType::kFloat32: {
        const float f = static_cast<float>(x);
        std::memcpy(p + 4 * o, &f, 4);
        return;
      }
      case DType::kFloat64: std::memcpy(p + 8 * o, &x, 8); return;
      case DType::kInt64: {
        const int64_t v = static_cast<int64_t>(x);
        std::memcpy(p + 8 * o, &v, 8);
        return;
      }
      case DType::kInt32: {
        const int32_t v = static_cast<int32_t>(x);
        std::memcpy(p + 4 * o, &v, 4);
        return;
      }
    }
  }

  void fill_normal(std::mt19937_64& rng, double stddev = 1.0) {
    std::normal_distribution<double> nd(0.0, stddev);
    for_each_index(shape, [&](const Index& i) { set(i, nd(rng)); });
  }
  void fill(double x) {
    for_each_index(shape, [&](const Index& i) { set(i, x); });
  }

  // Storage elements not addressed by the view still hold the 0xFF poison.
  bool gaps_untouched() const {
    std::vector<char> in_view(static_cast<size_t>(span), 0);
    for_each_index(shape, [&](const Index& i) { in_view[static_cast<size_t>(offset(i))] = 1; });
    const size_t es = bsk::dtype_size(dtype);
    const unsigned char* p = reinterpret_cast<const unsigned char*>(storage.data());
    for (int64_t o = 0; o < span; ++o) {
      if (in_view[static_cast<size_t>(o)]) continue;
      for (size_t b = 0; b < es; ++b)
        if (p[o * es + b] != 0xFF) return false;
    }
    return true;
  }
};

// [B, S, H, D] viewed over a BHSD (head-major) buffer: a non-contiguous BSHD view.
inline HostTensor make_bhsd_as_bshd(DType dt, int64_t B, int64_t S, int64_t H, int64_t D) {
  return HostTensor(dt, {B, S, H, D}, {H * S * D, D, S * D, 1});
}

// ---- comparing against a float64 oracle ------------------------------------------------------

// What a test's own naive implementation produces: out [B, Sq, Hq, D] and lse [B, Hq, Sq], both
// contiguous float64 (rows without keys: 0 and -inf).
struct RefResult {
  std::vector<double> out, lse;
};

// out must be the correct rounding of the (float64) naive value to out's dtype: within half an
// ulp plus float64 noise. lse (float32) likewise.
inline void expect_matches(const HostTensor& out, const HostTensor* lse, const RefResult& nv,
                           const std::vector<int64_t>& rows = {}) {
  const int64_t B = out.shape[0], Sq = out.shape[1], Hq = out.shape[2], D = out.shape[3];
  const double u = unit_roundoff(out.dtype), tiny = half_min_subnormal(out.dtype);
  std::vector<int64_t> ts = rows;
  if (ts.empty())
    for (int64_t t = 0; t < Sq; ++t) ts.push_back(t);
  int64_t bad = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t : ts)
      for (int64_t h = 0; h < Hq; ++h) {
        for (int64_t d = 0; d < D; ++d) {
          const double got = out.get({b, t, h, d});
          const double want = nv.out[static_cast<size_t>(((b * Sq + t) * Hq + h) * D + d)];
          const double tol = std::abs(want) * u + tiny + 1e-12 * (1.0 + std::abs(want));
          if (!(std::abs(got - want) <= tol) && bad++ < 10)
            ADD_FAILURE() << "out[" << b << "," << t << "," << h << "," << d << "] = " << got
                          << ", want " << want << " (tol " << tol << ")";
        }
        if (lse) {
          const double got = lse->get({b, h, t});
          const double want = nv.lse[static_cast<size_t>((b * Hq + h) * Sq + t)];
          if (std::isinf(want)) {
            if (!(got == want) && bad++ < 10)
              ADD_FAILURE() << "lse[" << b << "," << h << "," << t << "] = " << got << ", want -inf";
          } else {
            const double tol = std::abs(want) * std::ldexp(1.0, -24) + 1e-12 * (1 + std::abs(want));
            if (!(std::abs(got - want) <= tol) && bad++ < 10)
              ADD_FAILURE() << "lse[" << b << "," << h << "," << t << "] = " << got << ", want "
                            << want;
          }
        }
      }
  EXPECT_EQ(bad, 0) << "mismatching elements";
}

inline std::string dtype_str(DType dt) { return bsk::dtype_name(dt); }

}  // namespace bsk_test
