// Building blocks for the sm_80+ tensor-core path: the CuTe instruction atoms (cp.async,
// ldmatrix, mma.sync m16n8k16) wrapped for the fragment layouts the attention kernels use, and
// the shared-memory swizzle that keeps ldmatrix free of bank conflicts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

namespace bsk::kernels::sm80 {

template <typename Elem>
struct MmaAtom;
template <>
struct MmaAtom<__half> {
  using type = cute::SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct MmaAtom<__nv_bfloat16> {
  using type = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};

// D(16x8, f32) += A(16x16, row) * B(16x8, col). Fragment layouts per the PTX ISA: with
// g = lane / 4 and t = lane % 4, c[0..1] hold row g, cols 2t..2t+1; c[2..3] row g+8.
template <typename Elem>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  MmaAtom<Elem>::type::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1],
                           c[2], c[3]);
}

// Tiles in shared memory are [rows][kDim] elements, 16-byte chunks XOR-swizzled by (row % 8):
// the 8 row addresses of one ldmatrix phase then hit 8 distinct bank groups.
template <int kDim>
__device__ __forceinline__ int swizzle(int row, int col) {
  static_assert(kDim % 64 == 0, "rows must be a multiple of 8 chunks of 16 bytes");
  return row * kDim + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

__device__ __forceinline__ void ldsm_x4(const void* smem, uint32_t (&r)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2],
                                r[3]);
}

__device__ __forceinline__ void ldsm_x4_trans(const void* smem, uint32_t (&r)[4]) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(smem), r[0], r[1], r[2],
                                r[3]);
}

// Asynchronously copies rows [row0, row0 + kRows) x kDim of a global matrix (row stride in
// elements) into a swizzled shared tile. Each pass of the CTA covers kRowsPerPass rows, a multiple
// of 8, so a thread's swizzle pattern is the same in every pass and its addresses advance by one
// fixed stride: two address registers per tile instead of two per pass. Rows at or past
// `rows_valid` are zero-filled from a clamped (in-range) source address.
template <int kRows, int kDim, int kThreads, typename Elem>
__device__ __forceinline__ void load_tile_async(Elem* smem, const Elem* gmem, int64_t row_stride,
                                                int row0, int rows_valid) {
  constexpr int kChunksPerRow = kDim / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && kRowsPerPass % 8 == 0 &&
                    kRows % kRowsPerPass == 0,
                "tile must split into whole passes of 8-row multiples");
  const int r = threadIdx.x / kChunksPerRow;
  const int c = (threadIdx.x % kChunksPerRow) * 8;
  const Elem* src = gmem + static_cast<int64_t>(row0 + r) * row_stride + c;
  const int64_t pass_stride = static_cast<int64_t>(kRowsPerPass) * row_stride;
  Elem* dst = smem + swizzle<kDim>(r, c);
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const bool valid = row0 + r + i * kRowsPerPass < rows_valid;
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(valid ? src + i * pass_stride : gmem),
        *reinterpret_cast<cute::uint128_t*>(dst + i * kRowsPerPass * kDim), valid);
  }
}

// load_tile_async for gathered rows: tile row r comes from global row row_of(r), zero-filled
// where row_of gives -1.
template <int kRows, int kDim, int kThreads, typename Elem, class RowOf>
__device__ __forceinline__ void gather_rows_async(Elem* smem, const Elem* gmem, int64_t row_stride,
                                                  RowOf&& row_of) {
  constexpr int kChunksPerRow = kDim / 8;
  constexpr int kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && kRowsPerPass % 8 == 0 &&
                    kRows % kRowsPerPass == 0,
                "tile must split into whole passes of 8-row multiples");
  const int r = threadIdx.x / kChunksPerRow;
  const int c = (threadIdx.x % kChunksPerRow) * 8;
  Elem* dst = smem + swizzle<kDim>(r, c);
  int rows[kRows / kRowsPerPass];
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) rows[i] = row_of(r + i * kRowsPerPass);
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const bool valid = rows[i] >= 0;
    const Elem* src = gmem + static_cast<int64_t>(valid ? rows[i] : 0) * row_stride + c;
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src),
        *reinterpret_cast<cute::uint128_t*>(dst + i * kRowsPerPass * kDim), valid);
  }
}

// Gathered rows from a global index list: tile row r is global row idx[slot0 + r] while
// slot0 + r < count. The SparseK kernels' selected keys arrive this way.
template <int kRows, int kDim, int kThreads, typename Elem>
__device__ __forceinline__ void gather_tile_async(Elem* smem, const Elem* gmem, int64_t row_stride,
                                                  const int* idx, int slot0, int count) {
  gather_rows_async<kRows, kDim, kThreads>(smem, gmem, row_stride, [&](int r) {
    const int slot = slot0 + r;
    return slot < count ? __ldg(idx + slot) : -1;
  });
}

__device__ __forceinline__ void cp_async_commit() { cute::cp_async_fence(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  cute::cp_async_wait<N>();
}

// 2^x on the special-function unit, denormals flushed. exp2f() without -ftz adds three
// instructions per call to handle denormal results, which softmax weights never need. CuTe has
// no wrapper for ex2, hence the one line of PTX.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Transposes an 8 x 8 matrix of 16-bit values held in the mma accumulator's row layout (lane
// g * 4 + t holds row g, cols 2t and 2t+1 in one register) across the warp: afterwards lane
// g * 4 + t holds the original's column g, rows 2t and 2t+1 (movmatrix, sm_75+).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

}  // namespace bsk::kernels::sm80
