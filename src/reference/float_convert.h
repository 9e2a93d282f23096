// Private to the CPU reference: IEEE binary16 (float16) and bfloat16 <-> double, written out
// here so the oracle depends on no third-party half type. Encoding rounds the exact double value
// once, to nearest with ties to even (no float detour, which could round twice); overflow goes
// to +-inf, NaN stays NaN (quiet), signed zeros and subnormals are kept.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "bsk/tensor.h"

namespace bsk::ref::detail {

// A binary format with kMant explicit mantissa bits and exponent bias kBias, stored in 16 bits
// as sign | exponent | mantissa.
template <int kMant, int kBias>
struct Binary16Format {
  static constexpr int kExpAllOnes = 2 * kBias + 1;
  static constexpr uint32_t kMantMask = (1u << kMant) - 1u;

  static double decode(uint16_t bits) {
    const bool neg = (bits & 0x8000u) != 0;
    const int e = static_cast<int>((bits >> kMant) & static_cast<uint32_t>(kExpAllOnes));
    const uint32_t mant = bits & kMantMask;
    double a;
    if (e == kExpAllOnes) {
      a = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
    } else if (e == 0) {
      a = std::ldexp(static_cast<double>(mant), 1 - kBias - kMant);  // subnormal or zero
    } else {
      a = std::ldexp(static_cast<double>(mant | (1u << kMant)), e - kBias - kMant);
    }
    return neg ? -a : a;
  }

  static uint16_t encode(double x) {
    const uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
    if (std::isnan(x))
      return static_cast<uint16_t>(sign | (kExpAllOnes << kMant) | (1u << (kMant - 1)));
    const double a = std::fabs(x);
    if (std::isinf(a)) return static_cast<uint16_t>(sign | (kExpAllOnes << kMant));
    if (a == 0.0) return sign;

    int ex = 0;
    std::frexp(a, &ex);  // a in [2^(ex-1), 2^ex)
    int e = ex - 1;
    if (e < 1 - kBias) e = 1 - kBias;  // subnormal range: fixed quantum 2^(1-bias-mant)
    // a / quantum, exact (a power-of-two scaling of a double that stays in range).
    const double m = std::ldexp(a, kMant - e);
    double r = std::floor(m);
    const double frac = m - r;  // exact
    if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
    const double top = std::ldexp(1.0, kMant + 1);
    if (r >= top) {  // rounded up to the next binade
      r = std::ldexp(1.0, kMant);
      ++e;
    }
    if (e > kBias) return static_cast<uint16_t>(sign | (kExpAllOnes << kMant));  // overflow
    const uint32_t ri = static_cast<uint32_t>(r);
    if (ri < (1u << kMant)) return static_cast<uint16_t>(sign | ri);  // subnormal (e == 1-bias)
    return static_cast<uint16_t>(sign | (static_cast<uint32_t>(e + kBias) << kMant) |
                                 (ri & kMantMask));
  }
};

using Half = Binary16Format<10, 15>;
using BFloat16 = Binary16Format<7, 127>;

inline double half_to_double(uint16_t bits) { return Half::decode(bits); }
inline uint16_t double_to_half(double x) { return Half::encode(x); }
inline double bfloat16_to_double(uint16_t bits) { return BFloat16::decode(bits); }
inline uint16_t double_to_bfloat16(double x) { return BFloat16::encode(x); }

// Element `offset` (in elements) of a float16/bfloat16/float32/float64 buffer, as a double.
inline double load_as_double(const void* base, DType dtype, int64_t offset) {
  switch (dtype) {
    case DType::kFloat16: return half_to_double(static_cast<const uint16_t*>(base)[offset]);
    case DType::kBFloat16: return bfloat16_to_double(static_cast<const uint16_t*>(base)[offset]);
    case DType::kFloat32: return static_cast<const float*>(base)[offset];
    case DType::kFloat64: return static_cast<const double*>(base)[offset];
    case DType::kInt64:
    case DType::kInt32: break;
  }
  return std::numeric_limits<double>::quiet_NaN();
}

// Writes x rounded to nearest-even in `dtype` to element `offset` of `base`.
inline void store_from_double(void* base, DType dtype, int64_t offset, double x) {
  switch (dtype) {
    case DType::kFloat16: static_cast<uint16_t*>(base)[offset] = double_to_half(x); return;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[offset] = double_to_bfloat16(x); return;
    case DType::kFloat32: static_cast<float*>(base)[offset] = static_cast<float>(x); return;
    case DType::kFloat64: static_cast<double*>(base)[offset] = x; return;
    case DType::kInt64:
    case DType::kInt32: return;
  }
}

// Rows [0, S) of head h of batch b of a BSHD view, as doubles: dst[s * ld + d] = t[b, s, h, d].
inline void load_head_rows(const TensorView& t, int64_t b, int64_t h, int64_t S, int64_t D,
                           int64_t ld, double* dst) {
  for (int64_t s = 0; s < S; ++s) {
    const int64_t base = b * t.stride[0] + s * t.stride[1] + h * t.stride[2];
    for (int64_t d = 0; d < D; ++d)
      dst[s * ld + d] = load_as_double(t.data, t.dtype, base + d * t.stride[3]);
  }
}

// The references take the caller's params as they are (the front doors validated them): unset
// means 1/sqrt(D), and a set scale is used in double, unrounded.
inline double softmax_scale_or_default(const std::optional<double>& scale, int64_t head_dim) {
  return scale ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

}  // namespace bsk::ref::detail
