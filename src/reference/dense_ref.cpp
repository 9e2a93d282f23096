// CPU reference for dense attention: float64 everywhere between the input load and the output
// store. Each (batch, head) slice is converted to contiguous double buffers once (K packed),
// then query rows are processed kRowBlock at a time: scores in register tiles of kRowBlock rows x
// kTile keys, probabilities times V in tiles of kRowBlock rows x kTile columns. Every sum runs
// in a fixed order (over d for a score, over j for an output).
#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "bsk/reference.h"
#include "reference/float_convert.h"

namespace bsk::ref {
namespace {

// Two doubles operated on lane by lane (a 16-byte vector where the compiler offers one): written
// out so the register tiles below compile to packed multiplies and adds instead of the gathers an
// auto-vectorizer tends to pick. Each lane computes exactly what scalar code would.
#if defined(__GNUC__) || defined(__clang__)
typedef double Lane2 __attribute__((vector_size(16)));
inline Lane2 splat2(double x) { return Lane2{x, x}; }
#else
struct Lane2 {
  double v[2];
  Lane2& operator+=(const Lane2& o) {
    v[0] += o.v[0];
    v[1] += o.v[1];
    return *this;
  }
  friend Lane2 operator*(const Lane2& a, const Lane2& b) { return {{a.v[0] * b.v[0], a.v[1] * b.v[1]}}; }
};
inline Lane2 splat2(double x) { return Lane2{{x, x}}; }
#endif
inline Lane2 load2(const double* p) {
  Lane2 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store2(double* p, const Lane2& v) { std::memcpy(p, &v, sizeof v); }

constexpr int64_t kRowBlock = 4;   // query rows processed together
constexpr int64_t kTile = 4;       // keys (scores) or head-dim columns (P.V) per register tile
constexpr int64_t kKeyChunk = 32;  // V rows per pass of the P.V product (stay in L1)

// K packed in tiles of kTile keys: dst[((s / kTile) * D + d) * kTile + s % kTile] = t[b, s, h, d],
// so the score tiles read it sequentially.
void load_rows_packed(const TensorView& t, int64_t b, int64_t h, int64_t S, int64_t D,
                      double* dst) {
  for (int64_t s = 0; s < S; ++s) {
    const int64_t base = b * t.stride[0] + s * t.stride[1] + h * t.stride[2];
    double* o = dst + (s / kTile) * D * kTile + s % kTile;
    for (int64_t d = 0; d < D; ++d)
      o[d * kTile] = detail::load_as_double(t.data, t.dtype, base + d * t.stride[3]);
  }
}

}  // namespace

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const TensorView& out, const TensorView* lse, const AttentionParams& params) {
  const int64_t B = q.shape[0], Sq = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t Skv = k.shape[1], Hkv = k.shape[2];
  assert(q.ndim == 4 && k.ndim == 4 && v.ndim == 4 && out.ndim == 4);
  if (B == 0 || Sq == 0 || Hq == 0) return;
  assert(Hkv >= 1 && Hq % Hkv == 0);
  const int64_t group = Hq / Hkv;
  const double scale = detail::softmax_scale_or_default(params.softmax_scale, D);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  // Keys padded to a multiple of the key tile (zeros), queries to a multiple of the row block.
  const int64_t Skp = (Skv + kTile - 1) / kTile * kTile;
  const int64_t Sqp = (Sq + kRowBlock - 1) / kRowBlock * kRowBlock;
  const int64_t Dp = (D + kTile - 1) / kTile * kTile;

  std::vector<double> kp(static_cast<size_t>(Skp * D), 0.0);  // K: [Skp / kTile][D][kTile]
  std::vector<double> vv(static_cast<size_t>(Skv * Dp), 0.0);  // V: [Skv][Dp]
  std::vector<double> qq(static_cast<size_t>(Sqp * D), 0.0);  // Q: [Sqp][D]
  std::vector<double> sc(static_cast<size_t>(kRowBlock * Skp));
  std::vector<double> acc(static_cast<size_t>(kRowBlock * Dp));

  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      load_rows_packed(k, b, g, Skv, D, kp.data());
      detail::load_head_rows(v, b, g, Skv, D, Dp, vv.data());
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        detail::load_head_rows(q, b, h, Sq, D, D, qq.data());
        for (int64_t t0 = 0; t0 < Sq; t0 += kRowBlock) {
          const int64_t nrows = std::min(kRowBlock, Sq - t0);
          // Keys visible to row t: [0, nvis(t)).
          int64_t nvis[kRowBlock] = {};
          int64_t jmax = 0;
          for (int64_t r = 0; r < nrows; ++r) {
            const int64_t i = Skv - Sq + (t0 + r);  // absolute position, bottom-right aligned
            nvis[r] = params.causal ? std::clamp<int64_t>(i + 1, 0, Skv) : Skv;
            jmax = std::max(jmax, nvis[r]);
          }
          // sc[r][j] = q_{t0+r} . k_j for j < jmax (rounded up to the key tile), in register
          // tiles of kRowBlock rows x kTile keys; padded rows and keys are zeros.
          const double* qb = qq.data() + t0 * D;
          for (int64_t j0 = 0; j0 < jmax; j0 += kTile) {
            Lane2 tile[kRowBlock][kTile / 2];
            for (auto& row : tile)
              for (auto& x : row) x = splat2(0.0);
            for (int64_t d = 0; d < D; ++d) {
              const double* kr = kp.data() + (j0 * D + d * kTile);
              const Lane2 k01 = load2(kr), k23 = load2(kr + 2);
              for (int64_t r = 0; r < kRowBlock; ++r) {
                const Lane2 qd = splat2(qb[r * D + d]);
                tile[r][0] += qd * k01;
                tile[r][1] += qd * k23;
              }
            }
            for (int64_t r = 0; r < kRowBlock; ++r) {
              store2(sc.data() + r * Skp + j0, tile[r][0]);
              store2(sc.data() + r * Skp + j0 + 2, tile[r][1]);
            }
          }
          // Softmax numerators (0 past each row's visible keys), denominators and maxima.
          double mx[kRowBlock], denom[kRowBlock];
          for (int64_t r = 0; r < kRowBlock; ++r) {
            double* sr = sc.data() + r * Skp;
            const int64_t n = r < nrows ? nvis[r] : 0;
            double m = neg_inf;
            for (int64_t j = 0; j < n; ++j) {
              sr[j] *= scale;
              m = std::max(m, sr[j]);
            }
            double l = 0.0;
            for (int64_t j = 0; j < n; ++j) {
              sr[j] = std::exp(sr[j] - m);
              l += sr[j];
            }
            for (int64_t j = n; j < jmax; ++j) sr[j] = 0.0;
            mx[r] = m;
            denom[r] = l;
          }
          // acc[r][:] = sum_j p[r][j] v_j in register tiles of kRowBlock rows x kTile columns,
          // over chunks of kKeyChunk V rows (V padded to Dp columns with zeros). A key a row
          // cannot see is skipped, not multiplied by p = 0: 0 * inf (or NaN) in v would be NaN,
          // so a non-finite value at a masked key would leak into the row. Keys [0, jall) are
          // seen by every real row of the block; past that (causal diagonals, a few keys) each
          // row takes only its own.
          int64_t jall = jmax;
          for (int64_t r = 0; r < nrows; ++r) jall = std::min(jall, nvis[r]);
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j0 = 0; j0 < jmax; j0 += kKeyChunk) {
            const int64_t j1 = std::min(jmax, j0 + kKeyChunk);
            const int64_t jsplit = std::clamp(jall, j0, j1);
            for (int64_t d0 = 0; d0 < Dp; d0 += kTile) {
              Lane2 tile[kRowBlock][kTile / 2];
              for (int64_t r = 0; r < kRowBlock; ++r) {
                tile[r][0] = load2(acc.data() + r * Dp + d0);
                tile[r][1] = load2(acc.data() + r * Dp + d0 + 2);
              }
              for (int64_t j = j0; j < jsplit; ++j) {
                const double* vr = vv.data() + j * Dp + d0;
                const Lane2 v01 = load2(vr), v23 = load2(vr + 2);
                for (int64_t r = 0; r < kRowBlock; ++r) {
                  const Lane2 p = splat2(sc[r * Skp + j]);
                  tile[r][0] += p * v01;
                  tile[r][1] += p * v23;
                }
              }
              for (int64_t j = jsplit; j < j1; ++j) {
                const double* vr = vv.data() + j * Dp + d0;
                const Lane2 v01 = load2(vr), v23 = load2(vr + 2);
                for (int64_t r = 0; r < nrows; ++r) {
                  if (j >= nvis[r]) continue;
                  const Lane2 p = splat2(sc[r * Skp + j]);
                  tile[r][0] += p * v01;
                  tile[r][1] += p * v23;
                }
              }
              for (int64_t r = 0; r < kRowBlock; ++r) {
                store2(acc.data() + r * Dp + d0, tile[r][0]);
                store2(acc.data() + r * Dp + d0 + 2, tile[r][1]);
              }
            }
          }
          for (int64_t r = 0; r < nrows; ++r) {
            const int64_t t = t0 + r;
            const int64_t obase = b * out.stride[0] + t * out.stride[1] + h * out.stride[2];
            const bool empty = nvis[r] == 0;
            for (int64_t d = 0; d < D; ++d)
              detail::store_from_double(out.data, out.dtype, obase + d * out.stride[3],
                                        empty ? 0.0 : acc[r * Dp + d] / denom[r]);
            if (lse) {
              float* ld = static_cast<float*>(lse->data);
              ld[b * lse->stride[0] + h * lse->stride[1] + t * lse->stride[2]] =
                  static_cast<float>(empty ? neg_inf : mx[r] + std::log(denom[r]));
            }
          }
        }
      }
    }
  }
}

}  // namespace bsk::ref
