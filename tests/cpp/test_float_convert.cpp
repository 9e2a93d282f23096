// The reference's private float16/bfloat16 conversions (src/reference/float_convert.h) against
// the tests' own bit-level ones, exhaustively over all 2^16 encodings, plus round-to-nearest-even
// at every midpoint between neighbouring encodings.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "reference/float_convert.h"
#include "test_util.h"

namespace {

using bsk::ref::detail::bfloat16_to_double;
using bsk::ref::detail::double_to_bfloat16;
using bsk::ref::detail::double_to_half;
using bsk::ref::detail::half_to_double;
using namespace bsk_test;

bool is_nan16(uint16_t h, int mant_bits) {
  const uint32_t exp_mask = (0x7FFFu >> mant_bits) << mant_bits;
  return (h & exp_mask) == exp_mask && (h & ((1u << mant_bits) - 1u)) != 0;
}

TEST(FloatConvert, HalfDecodeAllEncodings) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const double a = half_to_double(static_cast<uint16_t>(h));
    const double b = f16_to_f32(static_cast<uint16_t>(h));
    if (is_nan16(static_cast<uint16_t>(h), 10)) {
      EXPECT_TRUE(std::isnan(a)) << h;
      continue;
    }
    ASSERT_EQ(a, b) << "encoding 0x" << std::hex << h;
    ASSERT_EQ(std::signbit(a), std::signbit(b)) << h;
  }
}

TEST(FloatConvert, BFloat16DecodeAllEncodings) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const double a = bfloat16_to_double(static_cast<uint16_t>(h));
    const double b = bf16_to_f32(static_cast<uint16_t>(h));
    if (is_nan16(static_cast<uint16_t>(h), 7)) {
      EXPECT_TRUE(std::isnan(a)) << h;
      continue;
    }
    ASSERT_EQ(a, b) << "encoding 0x" << std::hex << h;
    ASSERT_EQ(std::signbit(a), std::signbit(b)) << h;
  }
}

// Every finite encoding round-trips; every midpoint between consecutive finite values rounds to
// the one with an even mantissa; points just off the midpoint round to the nearer one.
template <class Enc, class Dec>
void check_encode(Enc enc, Dec dec, int mant_bits, uint16_t inf_bits) {
  for (uint32_t sign = 0; sign <= 0x8000u; sign += 0x8000u) {
    for (uint32_t mag = 0; mag < inf_bits; ++mag) {
      const uint16_t h = static_cast<uint16_t>(sign | mag);
      const double x = dec(h);
      ASSERT_EQ(enc(x), h) << "round trip of 0x" << std::hex << h;
      const uint16_t hn = static_cast<uint16_t>(sign | (mag + 1));  // next magnitude (maybe inf)
      double xn;
      if (mag + 1 == inf_bits) {
        // Overflow threshold: max finite + half an ulp of it rounds to inf (max finite is odd).
        xn = x + (x - dec(static_cast<uint16_t>(sign | (mag - 1))));
      } else {
        xn = dec(hn);
      }
      const double mid = 0.5 * (x + xn);  // exact in double
      const uint16_t even = (mag & 1u) ? hn : h;
      ASSERT_EQ(enc(mid), even) << "midpoint after 0x" << std::hex << h;
      const double below = std::nextafter(mid, x), above = std::nextafter(mid, xn);
      ASSERT_EQ(enc(below), h) << "below midpoint after 0x" << std::hex << h;
      ASSERT_EQ(enc(above), hn) << "above midpoint after 0x" << std::hex << h;
    }
  }
  (void)mant_bits;
}

TEST(FloatConvert, HalfEncodeRoundsToNearestEven) {
  check_encode(double_to_half, half_to_double, 10, 0x7C00);
  EXPECT_EQ(double_to_half(std::numeric_limits<double>::infinity()), 0x7C00);
  EXPECT_EQ(double_to_half(-std::numeric_limits<double>::infinity()), 0xFC00);
  EXPECT_EQ(double_to_half(1e300), 0x7C00);
  EXPECT_EQ(double_to_half(1e-300), 0x0000);
  EXPECT_EQ(double_to_half(-0.0), 0x8000);
  EXPECT_TRUE(is_nan16(double_to_half(std::nan("")), 10));
}

TEST(FloatConvert, BFloat16EncodeRoundsToNearestEven) {
  check_encode(double_to_bfloat16, bfloat16_to_double, 7, 0x7F80);
  EXPECT_EQ(double_to_bfloat16(1e300), 0x7F80);
  EXPECT_EQ(double_to_bfloat16(-1e-300), 0x8000);
  EXPECT_TRUE(is_nan16(double_to_bfloat16(std::nan("")), 7));
}

// The reference rounds the double once; rounding through float first would round twice. A value
// just above a half midpoint whose float rounding lands exactly on the midpoint tells them apart.
TEST(FloatConvert, HalfEncodeRoundsOnceFromDouble) {
  const double mid = 1.0 + std::ldexp(1.0, -11);           // midpoint between 1 and 1+2^-10
  const double x = mid + std::ldexp(1.0, -40);             // rounds to mid as a float
  ASSERT_EQ(static_cast<double>(static_cast<float>(x)), mid);
  EXPECT_EQ(double_to_half(x), 0x3C01);                    // 1 + 2^-10, not the even 1.0
  EXPECT_EQ(f32_to_f16(static_cast<float>(x)), 0x3C00);    // what a float detour would give
}

}  // namespace
