// Timeline stamps of the fused decode step, for bench/tune/decode_trace.py. Built with
// -DBSK_DECODE_TRACE (CUDAFLAGS at configure time), thread 0 of every attention CTA and of every
// append block writes the global timer at fixed points of its kernel into a device buffer, and a
// one-thread kernel launched after each step prints the buffer. The B=1 step is a chain of
// dependent latencies across two kernels, which counters summed over a kernel (Nsight Compute)
// cannot order in time; these stamps can (bench/results/README.md, "Session 14").
// Without the macro every stamp below expands to nothing: the kernels compile as if it were not
// there.
#pragma once

#ifdef BSK_DECODE_TRACE
#include <cstdio>

namespace bsk::kernels::decode_trace {

// Attention CTA slots: the stage each one marks (clock slots hold clock64, to check the SM clock).
enum CtaSlot {
  kStart, kEarlyLoads, kWaited, kRowsKnown, kChunk0, kLoopDone, kPartials, kCounted, kCombined,
  kCombineFence, kCombinePairs, kCombineWeights, kClockStart, kClockPartials, kCtaSlots = 16
};
// Append block slots (kWalkList holds the breakpoint list's length << 1 | whether it decided).
enum GroupSlot {
  kAppendStart, kAppendLoads, kScanned, kReduced, kListed, kWalked, kAppendEnd, kWalkList,
  kGroupSlots
};
constexpr int kMaxCtas = 4096, kMaxGroups = 1024;

__device__ unsigned long long g_cta[kMaxCtas * kCtaSlots];
__device__ unsigned long long g_group[kMaxGroups * kGroupSlots];

__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ int cta_id() {
  return static_cast<int>((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x);
}
__device__ __forceinline__ void put_cta(int slot, unsigned long long v) {
  if (threadIdx.x == 0 && cta_id() < kMaxCtas) g_cta[cta_id() * kCtaSlots + slot] = v;
}
__device__ __forceinline__ void put_group(int slot, unsigned long long v) {
  if (threadIdx.x == 0 && blockIdx.x < kMaxGroups) g_group[blockIdx.x * kGroupSlots + slot] = v;
}
__device__ __forceinline__ void begin_cta() {
  for (int s = 0; s < kCtaSlots; ++s) put_cta(s, 0);
  put_cta(kStart, now());
  put_cta(kClockStart, clock64());
}
__device__ __forceinline__ void begin_group() {
  for (int s = 0; s < kGroupSlots; ++s) put_group(s, 0);
  put_group(kAppendStart, now());
}

// One line per append block ("TRP"), then one per attention CTA ("TRA"): index, raw slots.
__global__ void dump_kernel(int ctas, int groups) {
  for (int g = 0; g < groups && g < kMaxGroups; ++g) {
    const unsigned long long* t = g_group + g * kGroupSlots;
    printf("TRP %d %llu %llu %llu %llu %llu %llu %llu %llu\n", g, t[0], t[1], t[2], t[3], t[4],
           t[5], t[6], t[7]);
  }
  for (int c = 0; c < ctas && c < kMaxCtas; ++c) {
    const unsigned long long* t = g_cta + c * kCtaSlots;
    printf("TRA %d %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu\n", c,
           t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10], t[11], t[12], t[13]);
  }
}

}  // namespace bsk::kernels::decode_trace

namespace bsk_trace = ::bsk::kernels::decode_trace;
#define BSK_TRACE_CTA_BEGIN() bsk_trace::begin_cta()
#define BSK_TRACE_CTA(slot) bsk_trace::put_cta(bsk_trace::slot, bsk_trace::now())
#define BSK_TRACE_CTA_CLOCK(slot) bsk_trace::put_cta(bsk_trace::slot, clock64())
#define BSK_TRACE_GROUP_BEGIN() bsk_trace::begin_group()
#define BSK_TRACE_GROUP(slot) bsk_trace::put_group(bsk_trace::slot, bsk_trace::now())
#define BSK_TRACE_GROUP_VALUE(slot, v) bsk_trace::put_group(bsk_trace::slot, (v))
#else
#define BSK_TRACE_CTA_BEGIN() ((void)0)
#define BSK_TRACE_CTA(slot) ((void)0)
#define BSK_TRACE_CTA_CLOCK(slot) ((void)0)
#define BSK_TRACE_GROUP_BEGIN() ((void)0)
#define BSK_TRACE_GROUP(slot) ((void)0)
#define BSK_TRACE_GROUP_VALUE(slot, v) ((void)0)
#endif
