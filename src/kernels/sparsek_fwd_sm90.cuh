// SparseK attention forward for Hopper (sm_90a): the dense Hopper kernel's consumer pipeline
// (dense_fwd_sm90.cuh: wgmma Q K^T from shared memory, online softmax in registers, P V with P
// from registers, S(n) overlapped with P(n-1) V(n-1)) fed by a producer warpgroup that loads
// window blocks with TMA boxes and gathers the selected key rows with cp.async. A tile is what
// one sm80 SparseK CTA computes (sparsek_fwd_sm80.cuh): 128 rows = `heads` query heads of one KV
// group x 128 / heads positions, over two kinds of 128-key blocks in one online softmax: the
// window band, then the tile's selected keys (list from sparsek_select.cuh, masked per row by
// the threshold key and gated). Where SparseKCta::fold holds, the list's newer candidates are
// selected inside the band's first block instead (softmax_folded), one key block fewer. The
// online softmax rescales lazily (online_softmax<true>).
//
// Persistent CTAs, one per SM, take tiles round-robin, position block fastest (the CTAs in flight
// share their KV head's rows in L2). Q, the tile's list length and its rows' selection state are
// double-buffered by tile parity and recycled through empty_q once the consumers have written
// the tile's output, so the producer loads the next tile while this one finishes (3-5% faster
// than a CTA per tile, which BSK_SPARSEK_PERSISTENT=0 gives for A/B timings). The K/V stages and
// the per-block rings below are indexed by g, the CTA's running block count over all its tiles.
//
// Why selected rows come by cp.async and not TMA: they are arbitrary rows, TMA's row gather
// (tile::gather4) exists only on sm_100, and one-row TMA boxes (two per row at D = 128) measured
// 1.4x slower for the whole kernel on an H100. 128 producer threads copy 16-byte chunks
// straight into the 128-byte-swizzled layout wgmma reads, and completion reaches the consumers
// through cp.async.mbarrier.arrive (the pattern of CUTLASS's cp.async warp-specialized GEMM
// mainloops), so the producer never waits for its own copies and keeps up to 2 K and 2 V tiles
// in flight.
//
// The per-column selection data (key = order code of u << 32 | j, and u - u_ref for the gate) is
// written with the K group into a ring one deeper than the K/V stages: consumers read it in the
// softmax after they have released the K stage, and slot g % (kStages + 1) is rewritten only
// once every consumer thread has released K(g - kStages), i.e. finished softmax(g - kStages - 1).
//
// Epilogue: each consumer warpgroup stages its 64 output rows in its own (no longer read) rows of
// the tile's Q buffer and writes them with 16-byte stores; LSE from registers. Fixed loop order,
// no atomics: bitwise reproducible.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/dense_fwd_sm90.cuh"
#include "kernels/sparsek_fwd_sm80.cuh"

namespace bsk::kernels::sm90 {

// An empty slot of a gathered block (past the list's end): its K/V chunks are zero-filled.
constexpr uint32_t kNoRow = 0xffffffffu;

template <typename Elem_, int kHeadDim_>
struct SparseKConfig {
  // The dense kernel's tiles, MMAs and shared-memory layouts (128 x 128 blocks, 2 K/V stages).
  using Base = Config<Elem_, kHeadDim_, /*kBlockN=*/128, /*kStages=*/2>;
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = Base::kBlockM, kBlockN = Base::kBlockN;
  static constexpr int kStages = Base::kStages, kMetaSlots = kStages + 1;
  static constexpr int kConsumerWGs = Base::kConsumerWGs, kThreads = Base::kThreads;
  // 128*56 + 256*224 = 64512 <= 65536. Not the dense kernel's 24/240: this producer computes
  // row offsets, scores and flags, and at 24 registers it spilled ~100 bytes into the loop that
  // issues the gathers; at 56 nothing spills (consumers included) and the kernel ran 9% faster
  // at S=131072 (bench/results/sparsek-regsplit-experiment-h100-128k.txt; 40/232: 7%).
  static constexpr int kProducerRegs = 56, kConsumerRegs = 224;

  struct SharedStorage {
    // Q double-buffered (by tile parity), with the rows' state and list length that go with it:
    // the producer fills the next tile's while the consumers work on this one.
    cute::array_aligned<Elem, cute::cosize_v<typename Base::SmemLayoutQ>, 1024> q[2];
    cute::array_aligned<Elem, cute::cosize_v<typename Base::SmemLayoutK>, 1024> k;
    cute::array_aligned<Elem, cute::cosize_v<typename Base::SmemLayoutK>, 1024> v;
    alignas(16) unsigned long long key[kMetaSlots][kBlockN];  // 16-byte column-pair loads
    alignas(16) float du[kMetaSlots][kBlockN];
    SparseKRow rows[2][kBlockM];  // per query position of the tile (written by the producer)
    int n_sel[2];                 // the tile's list length
    // Per selected block (meta slot) and producer warp: bit 0, some column is not selected by
    // every row; bit 1, some gate is fractional. Zero lets the consumers skip the per-element
    // selection work: the best-ranked keys, most of a list, are in for every row with gate 1.
    uint32_t flags[kMetaSlots][4];
    // Offsets of the K and V rows of the block being loaded, in 16-byte units from the head's
    // row 0 (kNoRow: zeros), computed once by the thread that reads the column's index, not by
    // all 16 copying threads. Stored in copy order (see the producer) so that one 16-byte load
    // fetches four of a thread's rows. V's are read one block later than K's, hence 3 buffers.
    alignas(16) uint32_t row_k[2][kBlockN], row_v[3][kBlockN];
    SparseKRow bound[2][4];  // per producer warp: max threshold key, min m, max gate offset
    uint64_t full_q[2], empty_q[2];
    uint64_t full_k[kStages], full_v[kStages], empty_k[kStages], empty_v[kStages];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm_90 CTA can have");
};

// Tensor maps of K and V over (seq, d, heads, batch) with boxes of 128 rows x 64 columns,
// 128-byte swizzled: the window band's blocks are contiguous rows. A kernel parameter of its
// own: the TMA takes the descriptors' addresses, and an address taken inside the SparseK
// parameters made every read of them a memory load (ptxas then spilled 600 bytes).
struct SparseKTmaMaps {
  cute::TmaDescriptor block_k, block_v;
};

template <class Cfg, typename RawElem>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    sparsek_fwd_sm90_kernel(const __grid_constant__ SparseKFwdParams<RawElem> p,
                            const __grid_constant__ SparseKTmaMaps pp) {
#ifdef BSK_SM90A_DEVICE
  using Elem = typename Cfg::Elem;
  using Base = typename Cfg::Base;
  static_assert(sizeof(Elem) == sizeof(RawElem));
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, D = Cfg::kHeadDim, kStages = Cfg::kStages;
  constexpr int kMeta = Cfg::kMetaSlots;
  constexpr int kConsumers = 128 * Cfg::kConsumerWGs;
  constexpr float kNegInf = -INFINITY;
  using SS = typename Cfg::SharedStorage;
  using Bar = cutlass::arch::ClusterBarrier;
  using TB = cutlass::arch::ClusterTransactionBarrier;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  SS& ss = *reinterpret_cast<SS*>(smem_raw);
  if (threadIdx.x == 0) {
    // Producer arrivals per phase: 128 for the copies (noinc), + 128 after the plain stores
    // (Q: the list length; K: the column selection state).
    for (int i = 0; i < 2; ++i) {
      Bar::init(&ss.full_q[i], 256);
      Bar::init(&ss.empty_q[i], kConsumers);  // Q buffer i and rows i free: the tile is done
    }
    for (int s = 0; s < kStages; ++s) {
      Bar::init(&ss.full_k[s], 256);
      Bar::init(&ss.full_v[s], 128);
      Bar::init(&ss.empty_k[s], kConsumers);  // every consumer thread, once read
      Bar::init(&ss.empty_v[s], kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  auto q_tile = [&](int i) {
    return make_tensor(make_smem_ptr(ss.q[i].data()), typename Base::SmemLayoutQ{});
  };
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Base::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Base::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Base::SmemLayoutVt{});

  // ---- tiles: persistent CTAs take tiles (position block fastest, then the heads' block, then
  // batch) round-robin; a tile's rows and key blocks are those of one sm80 CTA ----
  const DenseFwdParams<RawElem>& at = p.attn;
  const int positions = BM / p.heads, diag = at.seqlen_k - at.seqlen_q;
  const int tiles_x = (at.seqlen_q + positions - 1) / positions;
  const int tiles_y = p.heads_kv * at.group / p.heads, num_tiles = tiles_x * tiles_y * p.batch;
  using Cta = SparseKCta<BN, RawElem>;
  auto tile_cta = [&](int tile) {
    return Cta(p, BM, tile % tiles_x, (tile / tiles_x) % tiles_y, tile / (tiles_x * tiles_y));
  };
  // The kernel's block order: the window band first, then the list (SparseKCta numbers the list
  // first). A window block's TMA load needs nothing but the tile's position, so the first block
  // lands while the list's index loads and gathers are still on their way. Where the tile folds
  // its newer candidates into the band's first block (SparseKCta::fold), the band's second block
  // goes first, so that the folded block's per-element work overlaps a P V: the first block's
  // softmax overlaps nothing, and with the folded block there the kernel ran 2% slower than
  // without folding (bench/results/sparsek-variants-fold-experiment-h100-128k.txt).
  auto cta_block = [](const Cta& cta, int nb) {
    if (nb >= cta.win_blocks) return nb - cta.win_blocks;
    return cta.sel_blocks + (cta.fold && nb < 2 ? 1 - nb : nb);
  };
  auto folded = [](const Cta& cta, int cb) { return cta.fold && cb == cta.sel_blocks; };

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    // ---- producer warpgroup: gathers Q, K and V rows with cp.async ----
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    const int tid = threadIdx.x;
    constexpr int kChunks = D / 8;              // 16-byte chunks per row
    constexpr int kRowsPerPass = 128 / kChunks;  // 8 (D = 128) or 16 (D = 64)
    // The 128-byte swizzle repeats every 8 rows and the tile stacks its 8 x 64 atoms down the
    // rows first, so a thread's destination moves by a fixed 64 * kRowsPerPass elements per pass
    // (the tests would catch a layout where it does not).
    constexpr int kPassElems = 64 * kRowsPerPass;
    static_assert(kRowsPerPass % 8 == 0);
    const int r0 = tid / kChunks, c = (tid % kChunks) * 8;
    auto cp16 = [](const Elem* src, Elem* dst, bool valid) {
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                                       *reinterpret_cast<uint128_t*>(dst), valid);
    };
    // The gathered rows' copies: CuTe's zero-filling copy above takes a byte count, which ptxas
    // turned into ~20 instructions per 16-byte copy around a 64-bit offset; a copy here is a
    // 32-bit offset scaled into the address (one IMAD.WIDE) and cp.async's ignore-src predicate.
    auto cp16_row = [](const char* base, uint32_t off16, Elem* dst) {
      const bool none = off16 == kNoRow;
      const char* src = base + static_cast<uint64_t>(none ? 0u : off16) * 16u;
      asm volatile(
          "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n"
          " cp.async.cg.shared.global.L2::128B [%0], [%1], 16, p;\n}\n" ::"r"(
              static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
          "l"(src), "r"(static_cast<uint32_t>(none)));
    };
    // A stage's "full" barrier completes when every producer thread's copies have landed
    // (cp.async.mbarrier.arrive.noinc: the hardware arrives once the thread's earlier cp.async
    // are done, so no thread waits for its own copies) and, for Q and K, when every producer
    // thread has also arrived normally after writing the plain shared-memory data that goes with
    // them (list length; column selection state): the normal arrive releases those stores.
    auto acquire = [&](uint64_t* empty, int parity) { Bar::wait(empty, parity); };
    auto copies_arrive = [](uint64_t* full) { cutlass::arch::cpasync_barrier_arrive_noinc(full); };
    // This thread's 16-byte chunks of a K or V tile: rows r0 + i * kRowsPerPass, whose offsets
    // lie at off[r0 * kRowsPerThread + i] (copy order, written by `slot_of` below); base is the
    // head's row 0 plus this thread's column; dst is its first chunk in the stage.
    constexpr int kRowsPerThread = BN / kRowsPerPass;
    static_assert(kRowsPerThread % 4 == 0);
    auto copy_rows = [&](const uint32_t* off, const char* base, Elem* dst) {
      CUTE_UNROLL
      for (int i = 0; i < kRowsPerThread; i += 4) {
        const uint4 o = *reinterpret_cast<const uint4*>(off + r0 * kRowsPerThread + i);
        cp16_row(base, o.x, dst + (i + 0) * kPassElems);
        cp16_row(base, o.y, dst + (i + 1) * kPassElems);
        cp16_row(base, o.z, dst + (i + 2) * kPassElems);
        cp16_row(base, o.w, dst + (i + 3) * kPassElems);
      }
    };
    const int slot_of = (tid % kRowsPerPass) * kRowsPerThread + tid / kRowsPerPass;
    // Row j's offset in 16-byte units (the dispatch keeps K/V whose rows lie within 2^32 such
    // units of row 0 on this path; the strides are multiples of 8 elements).
    auto off16 = [](int j, int64_t stride) {
      return j >= 0 ? static_cast<uint32_t>(static_cast<uint64_t>(j) * stride * sizeof(Elem) / 16)
                    : kNoRow;
    };
    // The rows' selection state goes to shared memory, not consumer registers (which the two
    // accumulators already fill), published with the K barriers, not Q's (consumers read it
    // only in selected blocks, so the first Q K^T does not wait for its loads). Bounds over the
    // valid rows, for the per-block flags: a column whose key beats the highest threshold, whose
    // index is below the fewest candidates and whose u clears the largest gate offset by 1 is
    // selected by every row with gate 1.
    auto widen = [](SparseKRow& x, unsigned long long thr_key, int m, float b) {
      x.thr_key = max(x.thr_key, thr_key);
      x.m = min(x.m, m);
      x.b = fmaxf(x.b, b);
    };
    auto write_rows = [&](const Cta& cta, int qb) {
      SparseKRow bound{0ull, INT_MAX, kNegInf};
      if (tid < positions) {
        const SparseKRow row = cta.row(p, cta.m0 + tid);
        ss.rows[qb][tid] = row;
        if (cta.m0 + tid < at.seqlen_q) bound = row;
      }
      CUTE_UNROLL
      for (int o = 16; o > 0; o /= 2)
        widen(bound, __shfl_xor_sync(0xffffffffu, bound.thr_key, o),
              __shfl_xor_sync(0xffffffffu, bound.m, o), __shfl_xor_sync(0xffffffffu, bound.b, o));
      if (tid % 32 == 0) ss.bound[qb][tid / 32] = bound;
      cutlass::arch::NamedBarrier::sync(128, 5);  // producer warpgroup only
      // Thread 0 combines the warps' bounds into ss.bound[qb][0]. Kept in shared memory, not
      // in the producer's few registers.
      if (tid == 0) {
        CUTE_UNROLL
        for (int w = 1; w < 4; ++w)
          widen(bound, ss.bound[qb][w].thr_key, ss.bound[qb][w].m, ss.bound[qb][w].b);
        ss.bound[qb][0] = bound;
      }
      cutlass::arch::NamedBarrier::sync(128, 5);
    };
    // A window block is contiguous: thread 0 loads it with two TMA boxes (one per 64 columns,
    // into the 16 KB of 128 swizzled lines each occupies), the bytes counted on the stage's
    // barrier; the other threads' copy arrivals still come (with no copies of theirs pending),
    // so both kinds of block complete the same barrier the same way. Only selected blocks are
    // gathered with cp.async, whose 16-byte copies load the MIO queue the wgmmas issue through.
    constexpr uint32_t kTileBytes = BN * D * sizeof(Elem);
    auto load_block = [&](const TmaDescriptor* desc, uint64_t* full, auto& tile, int s, int row,
                          const Cta& cta) {
      TB::expect_transaction(full, kTileBytes);
      CUTE_UNROLL
      for (int h = 0; h < D / 64; ++h)
        SM90_TMA_LOAD_4D::copy(desc, full,
                               static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL),
                               &tile(0, 64 * h, s), 64 * h, row, cta.hk, cta.b);
    };

    int g = 0;  // key blocks this CTA has loaded, over all its tiles (the rings' position)
    for (int tile = blockIdx.x, it = 0; tile < num_tiles; tile += gridDim.x, ++it) {
      Cta cta = tile_cta(tile);
      cta.load_selection(p);
      const int qb = it & 1, b = cta.b, n_blocks = cta.n_blocks, sel_blocks = cta.sel_blocks;
      // Q and rows buffer qb are free once the consumers have finished tile it - 2.
      acquire(&ss.empty_q[qb], ((it >> 1) & 1) ^ 1);
      auto sQ = q_tile(qb);
      const auto* qg = reinterpret_cast<const Elem*>(at.q) + b * at.q_sb;
      for (int r = r0; r < BM; r += kRowsPerPass) {
        const int t = cta.m0 + r % positions, h = cta.h0 + r / positions;
        const bool valid = t < at.seqlen_q;
        cp16(qg + h * at.q_sh + (valid ? t : 0) * at.q_ss + c, &sQ(r, c), valid);
      }
      copies_arrive(&ss.full_q[qb]);
      if (tid == 0) ss.n_sel[qb] = cta.n_sel;
      Bar::arrive(&ss.full_q[qb]);
      write_rows(cta, qb);

      const auto* kg = reinterpret_cast<const Elem*>(at.k) + b * at.k_sb + cta.hk * at.k_sh;
      const auto* vg = reinterpret_cast<const Elem*>(at.v) + b * at.v_sb + cta.hk * at.v_sh;
      const float* ug = p.u + b * p.u_sb + cta.hk * p.u_sh;
      const char* k_base = reinterpret_cast<const char*>(kg + c);
      const char* v_base = reinterpret_cast<const char*>(vg + c);
      const float u_ref = cta.u_ref;
      // Per block, each producer thread fetches the global row of one key column (one list
      // read) and its score; the rows' offsets go through shared memory to the 16 threads
      // copying each row. The next block's index and score are fetched while this block's
      // copies are issued.
      auto score_of = [&](int cb, int j) {
        return (cb < sel_blocks || folded(cta, cb)) && j >= 0 ? ug[j * p.u_sj] : 0.f;
      };
      int j_next = n_blocks > 0 ? cta.key_row(p, cta_block(cta, 0), tid) : -1;
      float x_next = score_of(cta_block(cta, 0), j_next);
      // V(nb - 1) goes out after K(nb): the consumers need K(n) and V(n - 1) together, and
      // release K earlier than V, so a K load waiting behind the previous V's empty barrier
      // (the order K(n), V(n)) would lose half a block of lead time.
      auto load_v = [&](int nbv, int gv) {
        const int sv = gv % kStages, cbv = cta_block(cta, nbv);
        acquire(&ss.empty_v[sv], ((gv / kStages) & 1) ^ 1);
        if (cbv < sel_blocks) copy_rows(ss.row_v[gv % 3], v_base, &sV(r0, c, sv));
        else if (tid == 0)
          load_block(&pp.block_v, &ss.full_v[sv], sV, sv, cta.window_start(cbv), cta);
        copies_arrive(&ss.full_v[sv]);
      };
      for (int nb = 0; nb < n_blocks; ++nb, ++g) {
        const int s = g % kStages, parity = ((g / kStages) & 1) ^ 1;
        const int cb = cta_block(cta, nb);
        const bool sel = cb < sel_blocks;
        const int jc = j_next;
        const float x = x_next;
        ss.row_k[g & 1][slot_of] = off16(jc, at.k_ss);
        ss.row_v[g % 3][slot_of] = off16(jc, at.v_ss);
        // Also orders earlier reads of these buffers before the writes above for every thread:
        // K's buffer was last read two blocks ago and V's three blocks ago (in the iteration
        // two blocks ago), each before a barrier this thread has since passed.
        cutlass::arch::NamedBarrier::sync(128, 5);
        if (nb + 1 < n_blocks) j_next = cta.key_row(p, cta_block(cta, nb + 1), tid);
        acquire(&ss.empty_k[s], parity);
        if (sel) copy_rows(ss.row_k[g & 1], k_base, &sK(r0, c, s));
        else if (tid == 0)
          load_block(&pp.block_k, &ss.full_k[s], sK, s, cta.window_start(cb), cta);
        copies_arrive(&ss.full_k[s]);
        if (sel || folded(cta, cb)) {
          const int slot = g % kMeta;
          // An empty slot's index 0xffffffff is past every m: never selected.
          const unsigned long long key = jc >= 0 ? sparsek_key(x, jc) : 0xffffffffull;
          ss.key[slot][tid] = key;
          ss.du[slot][tid] = x - u_ref;
          if (sel) {
            // (x - u_ref) - b_row >= (x - u_ref) - bound.b in floats too: the gate is 1.
            const SparseKRow bound = ss.bound[qb][0];
            const bool all_rows = jc >= 0 && key >= bound.thr_key && jc < bound.m;
            const bool gate_one = jc < 0 || (x - u_ref) - bound.b >= 1.f;
            const uint32_t f = (__any_sync(0xffffffffu, !all_rows) ? 1u : 0u) |
                               (__any_sync(0xffffffffu, !gate_one) ? 2u : 0u);
            if (tid % 32 == 0) ss.flags[slot][tid / 32] = f;
          }
        }
        Bar::arrive(&ss.full_k[s]);
        if (nb > 0) load_v(nb - 1, g - 1);
        if (nb + 1 < n_blocks) x_next = score_of(cta_block(cta, nb + 1), j_next);
      }
      if (n_blocks > 0) load_v(n_blocks - 1, g - 1);
    }
    // Exiting is safe with copies in flight: they complete and arrive on their own.
    static_assert(BN == 128, "one producer thread per key column");
  } else {
    // ---- consumers: the dense kernel's pipeline, with SparseK masks and gates ----
    cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
    const int tid = threadIdx.x - 128;
    const int cwg = tid / 128;
    typename Base::MmaQK mma_qk;
    typename Base::MmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(tid);
    auto thr_pv = mma_pv.get_thread_slice(tid);
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, N, K, stage)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, N, K, stage)
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<BM>, Int<BN>>{});
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<BM>, Int<D>>{});
    Tensor rP = make_tensor<Elem>(tSrS.layout());
    Tensor tOrP = make_tensor(rP.data(), acc_as_a(tSrS.layout()));
    Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    Tensor O = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    Tensor cS = thr_qk.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
    Tensor cSrc = make_tensor(cS.data(), acc_rowcol(cS.layout()));
    Tensor cO = thr_pv.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
    Tensor cOrc = make_tensor(cO.data(), acc_rowcol(cO.layout()));
    constexpr int kRows = size<0>(S.layout());
    static_assert(kRows == 2);
    auto pos_of = [&](int r) { return get<0>(cSrc(r, 0)) % positions; };
    auto st_o = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Elem>{}, typename Base::MmaPV1{});
    auto thr_st_o = st_o.get_thread_slice(tid % 128);

    int g = 0;  // key blocks consumed, over all of this CTA's tiles (the rings' position)
    for (int tile = blockIdx.x, it = 0; tile < num_tiles; tile += gridDim.x, ++it) {
      Cta cta = tile_cta(tile);  // geometry; the list length comes with Q
      const int qb = it & 1;
      Bar::wait(&ss.full_q[qb], (it >> 1) & 1);
      cta.set_count(ss.n_sel[qb]);
      const int n_blocks = cta.n_blocks, sel_blocks = cta.sel_blocks, m0 = cta.m0;
      auto sQ = q_tile(qb);
      Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
      const SparseKRow* rows = ss.rows[qb];

      float row_m[kRows], row_l[kRows], corr[kRows];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) row_m[r] = kNegInf, row_l[r] = 0.f;
      clear(tOrO);

      // S *= the gates of meta slot `slot`'s columns, per row.
      auto gate = [&](int slot) {
        float rb[kRows];
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) rb[r] = rows[pos_of(r)].b;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(S); c += 2) {
          const float2 d2 = *reinterpret_cast<const float2*>(&ss.du[slot][get<1>(cSrc(0, c))]);
          CUTE_UNROLL
          for (int r = 0; r < kRows; ++r) {
            S(r, c) *= __saturatef(d2.x - rb[r]);
            S(r, c + 1) *= __saturatef(d2.y - rb[r]);
          }
        }
      };
      // Mask, gate and online softmax of block nb (ring position gn)'s S: leaves the P V weights
      // in S (gated for selected keys; the denominator takes the ungated weight, spec table) and
      // the factor that rescales O in corr.
      auto softmax = [&](int nb, int gn) {
        const int slot = gn % kMeta;
        const int cb = cta_block(cta, nb);
        // Per selected block, two independent steps: the gates where some gate is fractional
        // (most of a list under soft gates), the mask where some row drops a key (the list's
        // last blocks). Blocks with neither are dense blocks (same results: the skipped mask
        // changes nothing and the gates are 1). The gate goes first: a masked logit is -inf,
        // and a zero gate times -inf would be NaN.
        uint32_t flags = 0;
        if (cb < sel_blocks)
          flags = ss.flags[slot][0] | ss.flags[slot][1] | ss.flags[slot][2] | ss.flags[slot][3];
        // A thread's columns come in adjacent pairs (even first): one 16-byte load of their
        // keys or one 8-byte load of their gate offsets serves both of its rows (half the
        // shared-memory instructions, which share the MIO queue with the wgmmas).
        static_assert(size<1>(S) % 2 == 0);
        if ((flags & 2u) && p.gate_logits) gate(slot);
        if (flags & 1u) {
          SparseKRow rw[kRows];
          CUTE_UNROLL
          for (int r = 0; r < kRows; ++r) rw[r] = rows[pos_of(r)];
          CUTE_UNROLL
          for (int c = 0; c < size<1>(S); c += 2) {
            const ulonglong2 k2 =
                *reinterpret_cast<const ulonglong2*>(&ss.key[slot][get<1>(cSrc(0, c))]);
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r) {
              CUTE_UNROLL
              for (int e = 0; e < 2; ++e) {
                const unsigned long long key = e ? k2.y : k2.x;
                if (key < rw[r].thr_key ||
                    static_cast<uint32_t>(key) >= static_cast<uint32_t>(rw[r].m))
                  S(r, c + e) = kNegInf;
              }
            }
          }
        }
        if (cb >= sel_blocks) {
          const int n0 = cta.window_start(cb);
          // Not inside every row's window:
          if (n0 <= cta.i_last - p.window || n0 + BN - 1 > cta.i_first) {
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r) {
              const int i = m0 + pos_of(r) + diag;
              CUTE_UNROLL
              for (int c = 0; c < size<1>(S); ++c) {
                const int j = n0 + get<1>(cSrc(r, c));
                if (j > i || j <= i - p.window) S(r, c) = kNegInf;
              }
            }
          }
        }
        online_softmax<true>(S, row_m, row_l, corr, at.scale_log2,
                       [](int, int, float pe) { return pe; });
        // The value weights of a selected block, apart: inside online_softmax the gate turned
        // into per-element work (shared-memory loads, index math) on every block, the window's
        // and the all-gates-1 ones too, and doubled the instructions per block.
        if (flags & 2u) gate(slot);
      };
      // The folded band block (SparseKCta::fold), per element: a key of the row's window
      // (m_row <= j <= i) weighs 1; a newer candidate (m_grp <= j < m_row) counts where it beats
      // the row's threshold key, gated as a list key; anything else is out (the keys below
      // m_grp are the list's). Its own loop: inside softmax() above, a branch made ptxas
      // restructure the main loop and spill (session 11).
      auto softmax_folded = [&](int nb, int gn) {
        const int slot = gn % kMeta;
        const int n0 = cta.window_start(cta_block(cta, nb));
        SparseKRow rw[kRows];
        int m_row[kRows];
        uint32_t n_cand[kRows];  // the row's newer candidates: m_row - m_grp
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          rw[r] = rows[pos_of(r)];
          m_row[r] = m0 + pos_of(r) + diag - p.window + 1;
          n_cand[r] = static_cast<uint32_t>(max(m_row[r] - cta.m_grp, 0));
        }
        // Two passes, as in softmax(): the gates first (a zero gate times a masked -inf would
        // be NaN), then the mask; one pass loading both kept too much live and spilled.
        auto gate_candidates = [&] {
          CUTE_UNROLL
          for (int c = 0; c < size<1>(S); c += 2) {
            const int col = get<1>(cSrc(0, c));
            float2 d2;  // loaded at each call: reused, the loads stayed live through the softmax
            asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
                         : "=f"(d2.x), "=f"(d2.y)
                         : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(&ss.du[slot][col]))));
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r)
              CUTE_UNROLL
              for (int e = 0; e < 2; ++e)
                if (n0 + col + e < m_row[r]) S(r, c + e) *= __saturatef((e ? d2.y : d2.x) - rw[r].b);
          }
        };
        if (p.gate_logits) gate_candidates();
        CUTE_UNROLL
        for (int c = 0; c < size<1>(S); c += 2) {
          const int col = get<1>(cSrc(0, c));
          const ulonglong2 k2 = *reinterpret_cast<const ulonglong2*>(&ss.key[slot][col]);
          CUTE_UNROLL
          for (int r = 0; r < kRows; ++r) {
            CUTE_UNROLL
            for (int e = 0; e < 2; ++e) {
              // m_row <= j <= i = m_row + w - 1, and m_grp <= j < m_row, as unsigned ranges.
              const int j = n0 + col + e;
              const bool in_window = static_cast<uint32_t>(j - m_row[r]) < static_cast<uint32_t>(p.window);
              const bool picked = static_cast<uint32_t>(j - cta.m_grp) < n_cand[r] &&
                                  (e ? k2.y : k2.x) >= rw[r].thr_key;
              if (!in_window && !picked) S(r, c + e) = kNegInf;
            }
          }
        }
        online_softmax<true>(S, row_m, row_l, corr, at.scale_log2,
                       [](int, int, float pe) { return pe; });
        gate_candidates();  // the value weights (0 where out)
      };
      auto convert_p = [&] {
        CUTE_UNROLL
        for (int i = 0; i < size(rP); ++i) rP(i) = static_cast<Elem>(tSrS(i));
      };

      if (n_blocks > 0) {
        const int sk = g % kStages;
        Bar::wait(&ss.full_k[sk], (g / kStages) & 1);
        wg_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, sk), tSrS);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tSrS);
        Bar::arrive(&ss.empty_k[sk]);
        softmax(0, g);
        convert_p();
      }
      // Block n >= 1: S(n) and P(n-1) V(n-1) on the tensor cores, then S(n)'s softmax while the
      // P V runs. The folded block (always n = 1, cta_block) takes a peeled copy of the step
      // (inlined by force: as a call, ptxas passed the fragments through a 1.3 KB stack frame).
      auto step = [&](int n, auto is_folded) __attribute__((always_inline)) {
        const int gk = g + n, gv = gk - 1;
        const int sk = gk % kStages, sv = gv % kStages;
        Bar::wait(&ss.full_k[sk], (gk / kStages) & 1);
        Bar::wait(&ss.full_v[sv], (gv / kStages) & 1);
        wg_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, sk), tSrS);
        wg_issue<false>(mma_pv, tOrP, tOrV(_, _, _, sv), tOrO);
        warpgroup_wait<1>();  // S(n) is ready; P(n-1) V(n-1) may still run
        warpgroup_fence_operand(tSrS);
        Bar::arrive(&ss.empty_k[sk]);
        if constexpr (decltype(is_folded)::value) softmax_folded(n, gk);
        else softmax(n, gk);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(rP);
        Bar::arrive(&ss.empty_v[sv]);
        rescale_o(O, corr);
        convert_p();
      };
      int n = 1;
      if (cta.fold) step(n++, std::true_type{});  // fold implies at least 2 band blocks
      for (; n < n_blocks; ++n) step(n, std::false_type{});
      if (n_blocks > 0) {
        const int gv = g + n_blocks - 1, sv = gv % kStages;
        Bar::wait(&ss.full_v[sv], (gv / kStages) & 1);
        wg_issue<false>(mma_pv, tOrP, tOrV(_, _, _, sv), tOrO);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tOrO);
        warpgroup_fence_operand(rP);
        Bar::arrive(&ss.empty_v[sv]);
      }
      g += n_blocks;

      // ---- epilogue: normalize, LSE, O staged in this warpgroup's Q rows, 16-byte stores ----
      const int b = cta.b, h0 = cta.h0;
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const float l = normalize_row(O, r, row_l[r]);
        const int rr = get<0>(cOrc(r, 0));
        const int t = m0 + rr % positions, h = h0 + rr / positions;
        if (at.lse != nullptr && tid % 4 == 0 && t < at.seqlen_q)
          at.lse[b * at.lse_sb + h * at.lse_sh + t * at.lse_ss] =
              l > 0.f ? row_m[r] * at.softmax_scale + logf(l) : kNegInf;
      }
      // This warpgroup's last Q K^T has completed (waited above), so its 64 Q rows are free:
      // stage O there with stmatrix (as the dense kernel does), then 16-byte global stores.
      Tensor sOw = local_tile(sQ, Shape<_64, Int<D>>{}, make_coord(cwg, 0));
      {
        Tensor rO = make_tensor<Elem>(tOrO.layout());
        CUTE_UNROLL
        for (int i = 0; i < size(tOrO); ++i) rO(i) = static_cast<Elem>(tOrO(i));
        copy(st_o, thr_st_o.retile_S(rO), thr_st_o.partition_D(sOw));
      }
      cutlass::arch::NamedBarrier::sync(128, 3 + cwg);
      constexpr int kChunks = D / 8;
      auto* og = reinterpret_cast<Elem*>(at.out) + b * at.o_sb;
      for (int i = tid % 128; i < 64 * kChunks; i += 128) {
        const int rw = i / kChunks, cc = (i % kChunks) * 8, rr = 64 * cwg + rw;
        const int t = m0 + rr % positions, h = h0 + rr / positions;
        if (t < at.seqlen_q)
          *reinterpret_cast<uint128_t*>(og + h * at.o_sh + t * at.o_ss + cc) =
              *reinterpret_cast<const uint128_t*>(&sOw(rw, cc));
      }
      // Every thread has read its staged chunks into registers for the stores above: Q buffer
      // qb (and the rows beside it) can take tile it + 2.
      Bar::arrive(&ss.empty_q[qb]);
    }
  }
#endif
}

}  // namespace bsk::kernels::sm90
