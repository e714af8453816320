// The FP8 GEMM mainloop shared by the dense and grouped GEMMs (fp8_gemm.cu, fp8_grouped_gemm.cu): the
// kernel template, its tile schedulers and the host launch template. Each .cu file instantiates the
// kernels its heuristics can choose (gemm_heuristics.h).
//
// out[M, N] = a[M, K] @ b[N, K]^T with per-128 K-block scales, per group for the grouped layouts:
// TileWalk (one per GemmLayout) gives each persistent CTA its sequence of output tiles (dense; contiguous
// grouped, each tile's expert read from m_indices; masked grouped, only the tiles below masked_m; k-grouped,
// each group's K range read from k_offsets), and everything below runs per tile as in the dense kernel:
//
// One persistent CTA per SM walks output tiles (grouped along M so concurrently running tiles share A
// and B in L2). Inside a CTA, warpgroups specialize:
//   - the last warpgroup is the producer: it drops to 40 registers and one thread issues TMA copies of
//     A (BLOCK_M x 128 bytes), B (BLOCK_N x 128 bytes) and A's scales into a ring of shared-memory
//     stages, each guarded by a "full" and an "empty" mbarrier;
//   - the other BLOCK_M / 64 warpgroups are math warpgroups (raised to 232 registers), each owning 64
//     rows of the tile. Per 128-wide K block they run 4 wgmma m64nBLOCK_Nk32 (e4m3 x e4m3 -> fp32) into
//     a fresh fragment, release the stage, then "promote": acc += partial * a_scale * b_scale in FP32.
// The tensor cores therefore never accumulate more than 128 K-elements. Where registers allow (1D2D,
// BLOCK_N <= 128) each math warpgroup keeps two partial fragments and issues K block kb + 1 before it
// promotes kb, so the FFMAs overlap the tensor cores. The epilogue stores bf16 or fp32 with masked
// plain stores straight from registers.
//
// Variants (template parameters, selected through Fp8GemmConfig; the defaults are the kernel above):
//   - kOverlap: the next tile's first K block is issued to the tensor cores before the epilogue, and
//     (runtime flag, bf16 only) the epilogue writes the tile into a swizzled shared-memory staging
//     buffer with stmatrix, and one thread per math warpgroup issues TMA stores that drain while the
//     next tile computes;
//   - kCluster = 2 (dense only): clusters of two CTAs on vertically adjacent tiles; each CTA loads half of
//     the shared B tile and multicasts it into both CTAs' stage, and consumers release a stage in both CTAs.
// Grouped tiles that are not whole (rows past masked_m, padding rows, the M tail of a group) go out as
// register stores, row by row; a whole tile takes the config's epilogue.
// Design notes and measurements: NOTES.md beside this file.

#pragma once

#include "fp8_gemm.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "../hopper.cuh"
#include "gemm_heuristics.h"

namespace dskernels {
namespace fp8_gemm_detail {

// Kernel arguments besides the tensor maps (named namespace: its device-only members would draw
// unused-function warnings in the compute_80 pass if they had internal linkage).
struct Params {
  const float* b_scale;  // 1D2D only: [G][ceil(N/128)][K/128] row-major (G = 1 dense)
  void* out;             // [out rows, N] row-major (grouped layouts: their [G * rows, N] flattening)
  const int* rows;       // contiguous: m_indices [M]; masked: masked_m [G]; k-grouped: k_offsets [G + 1]
  int M, N, K;           // one group's problem (contiguous: M_total; masked: M_max); K: k-grouped K_total
  int G;                 // groups (1 dense)
  int num_m_blocks, num_n_blocks;  // of one group (masked: of M_max)
  int group_m_blocks;    // m blocks per rasterization group
  int a_scale_group_rows;  // masked: a_scale row of (g, m) is g * this + m; 0: a 3D map (m, kb, g)
  bool out_fp32, accumulate, paired_stores;
  bool tma_store;        // kOverlap kernels: the epilogue goes through smem and TMA stores (bf16 only)

  // Tile t of a [m_blocks x num_n_blocks] problem -> (m_block, n_block): groups of group_m_blocks
  // m-blocks, m fastest inside a group, so the ~num_sms tiles in flight cover a few m-blocks times many
  // n-blocks and reuse both operands in L2.
  __device__ __forceinline__ void tile_coords(int t, int m_blocks, int& m_block, int& n_block) const {
    const int group_tiles = group_m_blocks * num_n_blocks;
    const int first_m = (t / group_tiles) * group_m_blocks;
    const int rows_in_group = min(m_blocks - first_m, group_m_blocks);
    const int r = t % group_tiles;
    m_block = first_m + r % rows_in_group;
    n_block = r / rows_in_group;
  }

  // Writes out[row, col] = x and out[row, col + 1] = y (or adds into them), masked to N columns (the
  // caller masks rows).
  __device__ __forceinline__ void store_pair(int row, int col, float x, float y) const {
    if (col >= N) return;
    const size_t idx = static_cast<size_t>(row) * N + col;
    const bool second = col + 1 < N;
    if (out_fp32) {
      float* o = static_cast<float*>(out) + idx;
      if (paired_stores) {
        float2 v = make_float2(x, y);
        if (accumulate) {
          const float2 old = *reinterpret_cast<const float2*>(o);
          v.x += old.x;
          v.y += old.y;
        }
        *reinterpret_cast<float2*>(o) = v;
      } else {
        o[0] = accumulate ? o[0] + x : x;
        if (second) o[1] = accumulate ? o[1] + y : y;
      }
    } else {
      __nv_bfloat16* o = static_cast<__nv_bfloat16*>(out) + idx;
      if (paired_stores) {
        *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(x, y);
      } else {
        o[0] = __float2bfloat16_rn(x);
        if (second) o[1] = __float2bfloat16_rn(y);
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Tile schedulers: the persistent CTA's walk over output tiles, one per layout. The producer and the
// math warpgroups of a CTA walk the same sequence independently (deterministic, no shared state), so
// they agree on every stage's (tile, K block) as in the dense kernel.
// ------------------------------------------------------------------------------------------------

// One output tile as the mainloop and the epilogue see it.
struct TileJob {
  int m0, n0;       // tile origin in its group's [M, N] problem
  int group;        // its group: expert (contiguous: the segment's, -1 when it has none), 0 dense
  int kb0, num_kb;  // K blocks [kb0, kb0 + num_kb) of the mainloop (0: no math, acc stays 0)
  int a_row;        // TMA row of A's tile row 0
  int b_row;        // TMA row of B's tile row 0 (grouped: group * N + n0)
  int out_row;      // row of out (flattened) of tile row 0
  int rows;         // tile rows written: [0, rows); -1: per row by m_indices (contiguous, partial tile)
  bool nan;         // k-grouped: the group's segment breaks the layout rule: its rows are written NaN
};

template <GemmLayout kLayout, int BM, int BN>
struct TileWalk {
  int t, stride;
  // masked: group g's tiles are [first, first + count) of the walk (count < 0: not read yet), valid rows
  int g = 0, first = 0, count = -1, valid = 0;

  __device__ __forceinline__ TileWalk(int first_tile, int tile_stride) : t(first_tile), stride(tile_stride) {}

  // The next tile of this CTA into j; false when none is left. Contiguous: called by whole warps (the
  // segment's expert is a warp reduction); the others by any thread.
  __device__ __forceinline__ bool next(const Params& p, TileJob& j, int lane) {
    const int kb_total = p.K / 128;
    int m_block, n_block;
    j.nan = false;
    j.kb0 = 0;
    j.num_kb = kb_total;
    if constexpr (kLayout == GemmLayout::kDense) {
      if (t >= p.num_m_blocks * p.num_n_blocks) return false;
      p.tile_coords(t, p.num_m_blocks, m_block, n_block);
      j.m0 = m_block * BM;
      j.n0 = n_block * BN;
      j.group = 0;
      j.a_row = j.out_row = j.m0;
      j.b_row = j.n0;
      j.rows = min(BM, p.M - j.m0);
    } else if constexpr (kLayout == GemmLayout::kContiguous) {
      if (t >= p.num_m_blocks * p.num_n_blocks) return false;
      p.tile_coords(t, p.num_m_blocks, m_block, n_block);
      j.m0 = m_block * BM;
      j.n0 = n_block * BN;
      // The expert of the tile's aligned 128-row segment is the largest valid id among its rows (the
      // reference's segment_experts); the tile is whole when all its BM rows carry it.
      const int seg0 = j.m0 / 128 * 128;
      int expert = -1;
      int ids[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = seg0 + 4 * lane + i;
        ids[i] = r < p.M ? __ldg(p.rows + r) : -1;
        if (ids[i] >= 0 && ids[i] < p.G) expert = max(expert, ids[i]);
      }
      expert = __reduce_max_sync(0xffffffffu, expert);
      bool whole = expert >= 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = seg0 + 4 * lane + i;
        if (r >= j.m0 && r < j.m0 + BM) whole = whole && r < p.M && ids[i] == expert;
      }
      whole = __all_sync(0xffffffffu, whole);
      j.group = expert;
      j.num_kb = expert >= 0 ? kb_total : 0;
      j.a_row = j.out_row = j.m0;
      j.b_row = max(expert, 0) * p.N + j.n0;
      j.rows = whole ? BM : -1;
    } else if constexpr (kLayout == GemmLayout::kMasked) {
      // Groups in order, each with ceil(valid rows / BM) x n-blocks tiles: the walk covers only tiles
      // with rows, so an expert with none costs nothing and the CTAs share the work evenly.
      for (;;) {
        if (g >= p.G) return false;
        if (count < 0) {
          valid = min(max(__ldg(p.rows + g), 0), p.M);
          count = (valid + BM - 1) / BM * p.num_n_blocks;
        }
        if (t < first + count) break;
        first += count;
        count = -1;
        ++g;
      }
      p.tile_coords(t - first, (valid + BM - 1) / BM, m_block, n_block);
      j.m0 = m_block * BM;
      j.n0 = n_block * BN;
      j.group = g;
      j.a_row = j.out_row = g * p.M + j.m0;
      j.b_row = g * p.N + j.n0;
      j.rows = min(BM, valid - j.m0);
    } else {  // kKGrouped
      const int group_tiles = p.num_m_blocks * p.num_n_blocks;
      if (t >= p.G * group_tiles) return false;
      const int group = t / group_tiles;
      p.tile_coords(t - group * group_tiles, p.num_m_blocks, m_block, n_block);
      j.m0 = m_block * BM;
      j.n0 = n_block * BN;
      j.group = group;
      const int start = __ldg(p.rows + group), end = __ldg(p.rows + group + 1);
      j.nan = start < 0 || end > p.K || end < start || start % 128 != 0 || (end - start) % 128 != 0;
      j.kb0 = j.nan ? 0 : start / 128;
      j.num_kb = j.nan ? 0 : (end - start) / 128;
      j.a_row = j.m0;
      j.b_row = j.n0;
      j.out_row = group * p.M + j.m0;
      j.rows = min(BM, p.M - j.m0);
    }
    t += stride;
    return true;
  }
};

// PTX wrappers this file needs beyond csrc/hopper.cuh. TODO: move to hopper.cuh (not edited here while
// another change to it is in flight); named distinctly so they cannot clash with its helpers.
namespace sm90 {

// Named barrier kId (1..15) over kThreads threads of the CTA. Immediate operands, so ptxas reserves only
// the barriers used (a register id makes it reserve all 16). Move to hopper.cuh.
template <int kId, int kThreads>
__device__ __forceinline__ void bar_sync() {
  asm volatile("bar.sync %0, %1;" ::"n"(kId), "n"(kThreads) : "memory");
}

// Stores four 8x8 b16 matrices: lanes 8i .. 8i+7 give the row addresses of matrix i; register i of lane
// l holds elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i (low half first), which is
// the wgmma accumulator layout of one 8x8 block after packing pairs to bf16x2. Move to hopper.cuh.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

// 3-D tile reduction shared -> global: global += smem (fp32 add, performed in L2), in the calling
// thread's current bulk group; out-of-bounds parts of the box are skipped. Move to hopper.cuh.
__device__ __forceinline__ void tma_reduce_add_3d(const CUtensorMap* map, const void* smem_src, int32_t c0, int32_t c1,
                                                  int32_t c2) {
  asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(hopper::smem_addr(smem_src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}

// Stores a float2 into shared memory at a 32-bit shared address.
__device__ __forceinline__ void st_shared_f32x2(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(x), "f"(y) : "memory");
}

// Two floats -> bf16x2 bits (x in the low half).
__device__ __forceinline__ uint32_t pack_bf16x2(float x, float y) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace sm90
}  // namespace fp8_gemm_detail

namespace {

using fp8_gemm_detail::Params;
using fp8_gemm_detail::TileJob;
using fp8_gemm_detail::TileWalk;

constexpr int kBlockK = 128;                 // K elements (= bytes) per stage; also the scale block
constexpr int kMaxDynamicSmem = 232448;      // 227 KB: the H100's per-block opt-in limit
// Registers per thread after setmaxnreg: producer warpgroup and math warpgroups. 1D1D's promotion
// needs a few more in the math warpgroups (it reads b scales per column pair), which the producer's one
// issuing thread gives up (24: setmaxnreg's minimum).
__host__ __device__ constexpr int producer_regs(bool per_row) { return per_row ? 24 : 40; }
__host__ __device__ constexpr int math_regs(bool per_row) { return per_row ? 240 : 232; }
constexpr int kGroupRows = 1024;             // rows of A shared by the tiles of one rasterization group

constexpr int round_up(int x, int to) { return (x + to - 1) / to * to; }
constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

// Compile-time geometry of one instantiation. kOverlap adds a staging tile for the TMA-store epilogue
// (BM x BN, bf16, or fp32 with kF32Out: the k-grouped weight gradient; one 64-row slice per math
// warpgroup) and takes it from the stages.
template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false, bool kF32Out = false>
struct Tile {
  static_assert(BM == 64 || BM == 128, "one or two math warpgroups of 64 rows");
  static_assert(BN % 8 == 0 && BN >= 16 && BN <= 256, "wgmma N");
  // A BLOCK_N-wide tile then overlaps at most two 128-row blocks of b_scale (1D2D).
  static_assert(BN <= 128 + gcd(BN, 128), "tile would straddle three b_scale blocks");
  static_assert(!kOverlap || BN % 16 == 0, "the staging epilogue writes pairs of 8-column groups");

  static constexpr int kMathWarpgroups = BM / 64;
  static constexpr int kThreads = 128 * (kMathWarpgroups + 1);
  static constexpr int kABytes = BM * kBlockK;  // multiple of 1024: swizzle atoms stay aligned
  static constexpr int kBBytes = BN * kBlockK;
  static constexpr int kAScaleBytes = round_up(BM * 4, 128);
  static constexpr int kBScaleBytes = kScaleBPerRow ? round_up(BN * 4, 128) : 0;
  static constexpr int kStageBytes = kABytes + kBBytes + kAScaleBytes + kBScaleBytes;
  // Staging tile of the TMA-store epilogue: per math warpgroup, 64 rows x BN elements cut into panels of
  // kStoreSwizzle bytes per row (one TMA box of {kStorePanelCols, 64} each), each panel laid out as the
  // tensor map's swizzle expects: 128-byte swizzle when a row of the tile is a multiple of 128 bytes, else
  // 32-byte swizzle (16 bf16 columns). Either way the 8 rows of one stmatrix 8x8 matrix (bf16) or the 8
  // rows of a warp's float2 stores (fp32) land in 8 different 16-byte bank groups.
  static constexpr int kOutBytes = kF32Out ? 4 : 2;
  static_assert(!kF32Out || BN % 32 == 0, "fp32 staging: whole 128-byte panels");
  static constexpr int kStoreSwizzle = (BN * kOutBytes) % 128 == 0 ? 128 : 32;
  static constexpr int kStorePanelCols = kStoreSwizzle / kOutBytes;
  static constexpr int kStorePanels = BN / kStorePanelCols;
  static_assert(kStorePanels * kStorePanelCols == BN, "whole panels");
  static constexpr int kStorePanelBytes = 64 * kStoreSwizzle;
  static constexpr int kCdWarpgroupBytes = 64 * BN * kOutBytes;  // multiple of 1024 (BN % 8 == 0)
  static constexpr int kCdBytes = kOverlap ? kMathWarpgroups * kCdWarpgroupBytes : 0;
  static constexpr int kStages = std::min(32, (kMaxDynamicSmem - 1024 - 32 * 16 - kCdBytes) / kStageBytes);
  // Layout: [A x stages][B x stages][staging (kOverlap)][a_scale x stages][b_scale x stages]
  //         [full x stages][empty x stages]. The staging tile starts 1024-aligned (A, B multiples of 1024).
  static constexpr int kBOffset = kStages * kABytes;
  static constexpr int kCdOffset = kBOffset + kStages * kBBytes;
  static constexpr int kAScaleOffset = kCdOffset + kCdBytes;
  static constexpr int kBScaleOffset = kAScaleOffset + kStages * kAScaleBytes;
  static constexpr int kBarrierOffset = kBScaleOffset + kStages * kBScaleBytes;
  // +1024: the dynamic shared-memory base is re-aligned to 1024 bytes for the 128-byte swizzle.
  static constexpr int kSmemBytes = kBarrierOffset + kStages * 16 + 1024;
  // TMA completes whole boxes, out-of-bounds parts included.
  static constexpr uint32_t kTxBytes = kABytes + kBBytes + BM * 4 + (kScaleBPerRow ? BN * 4 : 0);
  static_assert(kStages >= 2 && kSmemBytes <= kMaxDynamicSmem, "shared memory");
  static_assert(kCdOffset % 1024 == 0 && kCdWarpgroupBytes % 1024 == 0 && kStorePanelBytes % 1024 == 0,
                "staging panels must start on their swizzle pattern's period");

  // Byte offset of bf16 element (r, c) in one warpgroup's staging slice (r < 64, c < BN, c % 8 == 0:
  // the start of a 16-byte chunk): panel c / kStorePanelCols, row r at r * kStoreSwizzle inside it, and
  // the TMA swizzle: 16-byte chunk bits [4, 4 + log2(kStoreSwizzle / 16)) XOR address bits [7, ...).
  __device__ __forceinline__ static uint32_t cd_offset(int r, int c) {
    const uint32_t off = r * kStoreSwizzle + (c % kStorePanelCols) * kOutBytes;
    const uint32_t swizzled = off ^ (((off >> 7) & (kStoreSwizzle / 16 - 1)) << 4);
    return (c / kStorePanelCols) * kStorePanelBytes + swizzled;
  }
};

// What a math thread keeps of one K block between issuing its wgmma and promoting the result (1D1D's
// per-column b scales stay in the stage's shared memory until the promotion reads them).
struct KBlockScales {
  float a_lo, a_hi;  // a_scale of rows `row` and `row + 8`
  float b_lo, b_hi;  // 1D2D: b_scale of the tile's first and second 128-row block
  int stage;
};

// The tile a CTA (or, with clusters, this CTA of the cluster) computes, and its 1D2D b_scale rows.
struct TileInfo {
  TileJob job;
  const float* b_scale_lo;  // columns [n0, n0 + 8 * first_groups) use this row of b_scale,
  const float* b_scale_hi;  // the rest the next one
  int first_groups;
};

template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false, int kCluster = 1,
          GemmLayout kLayout = GemmLayout::kDense>
__global__ void __launch_bounds__(Tile<BM, BN, kScaleBPerRow, kOverlap, kLayout == GemmLayout::kKGrouped>::kThreads, 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                    const __grid_constant__ CUtensorMap tmap_a_scale,
                    const __grid_constant__ CUtensorMap tmap_b_scale, const Params p,
                    const __grid_constant__ CUtensorMap tmap_out) {
#if DSK_HOPPER_DEVICE
  using T = Tile<BM, BN, kScaleBPerRow, kOverlap, kLayout == GemmLayout::kKGrouped>;
  using namespace hopper;
  namespace x = fp8_gemm_detail::sm90;
  constexpr int S = T::kStages;
  static_assert(kCluster == 1 || (kCluster == 2 && BN % 16 == 0), "B is split in two 8-row-aligned halves");
  static_assert(kCluster == 1 || kLayout == GemmLayout::kDense, "clusters pair dense m blocks only");
  static_assert(kLayout != GemmLayout::kKGrouped || kScaleBPerRow, "the weight gradient is 1D1D");
  static_assert(kLayout == GemmLayout::kKGrouped || kLayout == GemmLayout::kDense || !kScaleBPerRow,
                "grouped forward GEMMs are 1D2D");
  using Walk = TileWalk<kLayout, BM, BN>;
  // The contiguous walk reduces each tile's segment over a warp: the producer keeps a whole warp.
  constexpr bool kWarpWalk = kLayout == GemmLayout::kContiguous;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + T::kBarrierOffset);
  uint64_t* empty = full + S;

  const int warpgroup = threadIdx.x / 128;
  const int num_k_blocks = p.K / kBlockK;
  // Without clusters, tile t is one CTA's; with clusters, t is the cluster's (p.num_m_blocks counts
  // pairs of m blocks) and CTA `cta_rank` of the cluster takes m block kCluster * pair + cta_rank.
  // Both CTAs of a cluster walk the same t sequence, so they agree on every stage's (tile, kb).
  const int num_tiles = p.num_m_blocks * p.num_n_blocks;  // (dense clusters only)
  const int cta_rank = kCluster > 1 ? static_cast<int>(cluster_ctarank()) : 0;
  const int first_tile = kCluster > 1 ? static_cast<int>(cluster_id_x()) : static_cast<int>(blockIdx.x);
  const int tile_stride = kCluster > 1 ? static_cast<int>(num_clusters_x()) : static_cast<int>(gridDim.x);

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbarrier_init(&full[s], 1);                                  // the producer's arrive.expect_tx
      mbarrier_init(&empty[s], 4 * T::kMathWarpgroups * kCluster);  // one arrival per math warp per CTA
    }
    fence_mbarrier_init();
    fence_proxy_async_smem();
  }
  // With clusters the peer's multicast and remote arrivals target these barriers: sync the cluster.
  if constexpr (kCluster > 1)
    cluster_sync();
  else
    __syncthreads();

  if (warpgroup == T::kMathWarpgroups) {
    // ---------------- producer ----------------
    setmaxnreg_dec<producer_regs(kScaleBPerRow)>();
    const int lane = threadIdx.x % 32;
    if (threadIdx.x % 128 < (kWarpWalk ? 32 : 1)) {  // one thread issues every copy (lane 0)
      if (lane == 0) {
        tma_prefetch_descriptor(&tmap_a);
        tma_prefetch_descriptor(&tmap_b);
        tma_prefetch_descriptor(&tmap_a_scale);
        if constexpr (kScaleBPerRow) tma_prefetch_descriptor(&tmap_b_scale);
      }
      int s = 0;
      uint32_t phase = 0;
      if constexpr (kCluster == 1) {
        Walk walk(first_tile, tile_stride);
        TileJob j;
        while (walk.next(p, j, lane)) {
          if (lane != 0) continue;  // (kWarpWalk: the other lanes only take part in the walk)
          // a_scale's TMA row: masked with a 2D map, g * a_scale_group_rows + m0; else A's row.
          const bool scale_3d = kLayout == GemmLayout::kMasked && p.a_scale_group_rows == 0;
          const int sa_row = kLayout == GemmLayout::kMasked ? j.group * p.a_scale_group_rows + j.m0 : j.a_row;
          for (int kb = j.kb0; kb < j.kb0 + j.num_kb; ++kb) {
            mbarrier_wait(&empty[s], phase ^ 1);
            mbarrier_arrive_expect_tx(&full[s], T::kTxBytes);
            tma_load_2d(smem + s * T::kABytes, &tmap_a, &full[s], kb * kBlockK, j.a_row);
            tma_load_2d(smem + T::kBOffset + s * T::kBBytes, &tmap_b, &full[s], kb * kBlockK, j.b_row);
            uint8_t* sa_dst = smem + T::kAScaleOffset + s * T::kAScaleBytes;
            if (scale_3d)
              tma_load_3d(sa_dst, &tmap_a_scale, &full[s], j.m0, kb, j.group);
            else
              tma_load_2d(sa_dst, &tmap_a_scale, &full[s], sa_row, kb);
            if constexpr (kScaleBPerRow)
              tma_load_2d(smem + T::kBScaleOffset + s * T::kBScaleBytes, &tmap_b_scale, &full[s], j.n0, kb);
            if (++s == S) { s = 0; phase ^= 1; }
          }
        }
      } else {
        for (int t = first_tile; t < num_tiles; t += tile_stride) {
          int m_block, n_block;
          p.tile_coords(t, p.num_m_blocks, m_block, n_block);
          m_block = m_block * kCluster + cta_rank;
          const int m0 = m_block * BM, n0 = n_block * BN;
          // The second CTA of a pair past the last m block (odd count) still loads and multicasts its half
          // of B and consumes every stage (the peer needs both), but skips its all-out-of-bounds A loads.
          const bool a_valid = m0 < p.M;
          const uint32_t tx = a_valid ? T::kTxBytes : T::kTxBytes - T::kABytes - BM * 4;
          constexpr int kHalfRows = BN / kCluster;
          for (int kb = 0; kb < num_k_blocks; ++kb) {
            // Stage s is free once the math warps of both CTAs released it (the multicast writes the
            // peer's copy too). A plain (CTA-scope acquire) wait, as in the cluster_m = 1 path: the
            // remote arrivals carry no data this thread reads, and the TMA issued below is causally after
            // the observed phase. (An `.acquire.cluster` wait added a CCTL.IVALL after every try_wait: an
            // invalidation of the SM's L1, where the math warps' __ldg'd b_scale is cached.)
            mbarrier_wait(&empty[s], phase ^ 1);
            // The peer's half of B may complete_tx on full[s] before this expect_tx: the phase cannot
            // complete until this arrival, and the transaction count may go transiently negative.
            mbarrier_arrive_expect_tx(&full[s], tx);
            if (a_valid) {
              tma_load_2d(smem + s * T::kABytes, &tmap_a, &full[s], kb * kBlockK, m0);
              tma_load_2d(smem + T::kAScaleOffset + s * T::kAScaleBytes, &tmap_a_scale, &full[s], m0, kb);
            }
            // Rows [cta_rank * kHalfRows, +kHalfRows) of the B tile, into both CTAs (box {128, BN / 2}).
            tma_load_2d_multicast(smem + T::kBOffset + s * T::kBBytes + cta_rank * kHalfRows * kBlockK, &tmap_b,
                                     &full[s], kb * kBlockK, n0 + cta_rank * kHalfRows,
                                     static_cast<uint16_t>((1u << kCluster) - 1));
            if constexpr (kScaleBPerRow)
              tma_load_2d(smem + T::kBScaleOffset + s * T::kBScaleBytes, &tmap_b_scale, &full[s], n0, kb);
            if (++s == S) { s = 0; phase ^= 1; }
          }
        }
      }
    }
  } else {
    // ---------------- math warpgroups ----------------
    setmaxnreg_inc<math_regs(kScaleBPerRow)>();
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int row = warpgroup * 64 + warp * 16 + lane / 4;  // tile row of acc[4j + 0/1]; +8 for 4j + 2/3
    const int col = 2 * (lane % 4);                          // tile column of acc[4j + 0] minus 8j
    const int num_n_scale_blocks = (p.N + 127) / 128;

    // Two partial fragments when registers allow (BN <= 128): K block kb + 1 is issued before kb is
    // promoted, so this warpgroup's FFMAs overlap its own next wgmma, not only the other one's.
    constexpr bool kPipelined = BN <= 128;
    float partial0[BN / 2], partial1[kPipelined ? BN / 2 : 1];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) partial0[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < (kPipelined ? BN / 2 : 1); ++i) partial1[i] = 0.0f;

    int s = 0;
    uint32_t phase = 0;

    // The next tile of this CTA into ti (false when none is left), with its b_scale rows.
    Walk walk(first_tile, tile_stride);
    int cluster_t = first_tile;  // (clusters: the dense walk over pairs of m blocks)
    auto next_tile = [&](TileInfo& ti) {
      TileJob& j = ti.job;
      if constexpr (kCluster == 1) {
        if (!walk.next(p, j, lane)) return false;
      } else {
        if (cluster_t >= num_tiles) return false;
        int m_block, n_block;
        p.tile_coords(cluster_t, p.num_m_blocks, m_block, n_block);
        cluster_t += tile_stride;
        j.m0 = (m_block * kCluster + cta_rank) * BM;
        j.n0 = n_block * BN;
        j.group = 0;
        j.kb0 = 0;
        j.num_kb = num_k_blocks;
        j.a_row = j.out_row = j.m0;
        j.b_row = j.n0;
        j.rows = min(BM, p.M - j.m0);
        j.nan = false;
      }
      // 1D2D: columns [n0, n0 + 8 * first_groups) use b_scale row n0 / 128 of the group, the rest the next.
      const float* group_scales =
          p.b_scale + static_cast<size_t>(max(j.group, 0)) * num_n_scale_blocks * num_k_blocks;
      const int scale_row = j.n0 / 128;
      ti.b_scale_lo = group_scales + static_cast<size_t>(scale_row) * num_k_blocks;
      ti.b_scale_hi = group_scales + static_cast<size_t>(min(scale_row + 1, num_n_scale_blocks - 1)) * num_k_blocks;
      ti.first_groups = (128 - j.n0 % 128) / 8;
      return true;
    };

    float acc[BN / 2];
    KBlockScales sc0, sc1;

    // Waits for K block kb's stage, reads its scales and issues its 4 wgmma into d (one commit group).
    auto issue = [&](float(&d)[BN / 2], KBlockScales& sc, int kb, const TileInfo& ti) {
      if constexpr (!kScaleBPerRow) {
        // Issued before the wait so the global latency hides behind the barrier.
        sc.b_lo = __ldg(ti.b_scale_lo + kb);
        sc.b_hi = (128 % BN != 0) ? __ldg(ti.b_scale_hi + kb) : 0.0f;
      }
      mbarrier_wait(&full[s], phase);
      const uint64_t desc_a = smem_desc_k_major_sw128(smem + s * T::kABytes + warpgroup * 64 * kBlockK);
      const uint64_t desc_b = smem_desc_k_major_sw128(smem + T::kBOffset + s * T::kBBytes);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < kBlockK / 32; ++k)  // 32 bytes of K per wgmma: +2 in the descriptor's >>4 units
        wgmma_m64k32_e4m3<BN>(d, desc_a + 2 * k, desc_b + 2 * k, k);
      wgmma_commit_group();
      const float* a_scale = reinterpret_cast<const float*>(smem + T::kAScaleOffset + s * T::kAScaleBytes);
      sc.a_lo = a_scale[row];
      sc.a_hi = a_scale[row + 8];
      sc.stage = s;
      if (++s == S) { s = 0; phase ^= 1; }
    };

    // After the wait that completed d's group: frees its stage (in both CTAs of a cluster: the peer's
    // producer multicasts into this CTA's copy of the stage) and adds d * scales into acc.
    // Why the two arrivals need no cluster-scope fence (kCluster = 2): stage s of this CTA is written by
    // (1) this CTA's producer: A, A scales, (1D1D) B scales, and its half of B (multicast into both CTAs),
    // and (2) the peer's producer: only its half of B (multicast). This warp reads the stage through
    // (a) wgmma (async proxy): A and both halves of B, and (b) generic ld.shared of the scales.
    // - (a) is complete, not merely ordered, once wgmma.wait_group has returned for d's group (the caller
    //   did that), so any producer, local or remote, may overwrite A and B after observing an arrival
    //   that follows it in program order; no fence is involved (CUTLASS's multicast consumer_release is
    //   the same plain remote arrive).
    // - (b) is overwritten only by this CTA's producer, and the local arrival is the cluster_m = 1
    //   kernel's mbarrier.arrive (release, CTA scope) paired with that producer's CTA-scope acquire wait.
    // Both CTAs walk the same (tile, kb) sequence, so the peer's barrier receives exactly one arrival per
    // math warp of this CTA per phase (empty count = 4 x math warpgroups x kCluster), and never one for
    // the next phase early: this CTA consumes stage s again only after full[s] completes again, which
    // needs the peer's next multicast, issued after the peer's empty[s] phase has completed.
    auto retire = [&](float(&d)[BN / 2], const KBlockScales& sc, const TileInfo& ti) {
      fence_registers(d);
      auto release = [&]() {
        __syncwarp();
        if (lane == 0) {
          mbarrier_arrive(&empty[sc.stage]);
          if constexpr (kCluster > 1) mbarrier_arrive_remote(&empty[sc.stage], static_cast<uint32_t>(cta_rank ^ 1));
        }
      };
      if constexpr (kScaleBPerRow) {
        // 1D1D: this thread's column pairs' b scales, read from the stage (released only after them): held
        // in registers from issue to retire they would leave too few for a second partial fragment.
        const float* b_scale = reinterpret_cast<const float*>(smem + T::kBScaleOffset + sc.stage * T::kBScaleBytes);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const float2 b = *reinterpret_cast<const float2*>(b_scale + 8 * j + col);
          acc[4 * j + 0] = fmaf(d[4 * j + 0], sc.a_lo * b.x, acc[4 * j + 0]);
          acc[4 * j + 1] = fmaf(d[4 * j + 1], sc.a_lo * b.y, acc[4 * j + 1]);
          acc[4 * j + 2] = fmaf(d[4 * j + 2], sc.a_hi * b.x, acc[4 * j + 2]);
          acc[4 * j + 3] = fmaf(d[4 * j + 3], sc.a_hi * b.y, acc[4 * j + 3]);
        }
        release();
      } else {
        release();
        const float lo0 = sc.a_lo * sc.b_lo, hi0 = sc.a_hi * sc.b_lo;
        const float lo1 = sc.a_lo * sc.b_hi, hi1 = sc.a_hi * sc.b_hi;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const bool second = (128 % BN != 0) && j >= ti.first_groups;
          const float lo = second ? lo1 : lo0, hi = second ? hi1 : hi0;
          acc[4 * j + 0] = fmaf(d[4 * j + 0], lo, acc[4 * j + 0]);
          acc[4 * j + 1] = fmaf(d[4 * j + 1], lo, acc[4 * j + 1]);
          acc[4 * j + 2] = fmaf(d[4 * j + 2], hi, acc[4 * j + 2]);
          acc[4 * j + 3] = fmaf(d[4 * j + 3], hi, acc[4 * j + 3]);
        }
      }
    };

    // Masked stores of acc straight from registers (Fp8GemmEpilogue::kRegisters), rows [0, rows) of the
    // tile; a contiguous partial tile (rows < 0) decides per row by its m_indices entry: the segment's
    // expert is written, padding (-1) left alone, any other id written NaN (the layout is broken there).
    // A k-grouped tile of a broken segment is written NaN; one with no K blocks adds nothing.
    auto store_registers = [&](const TileInfo& ti) {
      const TileJob& j = ti.job;
      if (kLayout == GemmLayout::kKGrouped && p.accumulate && j.num_kb == 0 && !j.nan) return;
      bool write_lo = row < j.rows, write_hi = row + 8 < j.rows, nan_lo = j.nan, nan_hi = j.nan;
      if (kLayout == GemmLayout::kContiguous && j.rows < 0) {
        const int r_lo = j.m0 + row, r_hi = r_lo + 8;
        const int id_lo = r_lo < p.M ? __ldg(p.rows + r_lo) : -1, id_hi = r_hi < p.M ? __ldg(p.rows + r_hi) : -1;
        write_lo = id_lo != -1;
        write_hi = id_hi != -1;
        nan_lo = id_lo != j.group;
        nan_hi = id_hi != j.group;
      }
      const float kNaN = __int_as_float(0x7fc00000);
#pragma unroll
      for (int jj = 0; jj < BN / 8; ++jj) {
        const int c = j.n0 + 8 * jj + col;
        if (write_lo)
          p.store_pair(j.out_row + row, c, nan_lo ? kNaN : acc[4 * jj + 0], nan_lo ? kNaN : acc[4 * jj + 1]);
        if (write_hi)
          p.store_pair(j.out_row + row + 8, c, nan_hi ? kNaN : acc[4 * jj + 2], nan_hi ? kNaN : acc[4 * jj + 3]);
      }
    };

    // bf16 acc -> this warpgroup's swizzled staging slice (stmatrix) -> TMA stores by one thread, left in
    // flight. Only the issuing thread's bulk-group waits order the slice's reuse: it waits until the
    // previous tile's stores have read the slice, then the named barrier releases the other threads.
    const bool store_leader = threadIdx.x % 128 == 0;
    auto warpgroup_barrier = [&]() {  // the 128 threads of this math warpgroup (ids 1 and 2)
      if (warpgroup == 0)
        x::bar_sync<1, 128>();
      else
        x::bar_sync<2, 128>();
    };
    auto store_tma = [&](const TileInfo& ti) {
      uint8_t* cd = smem + T::kCdOffset + warpgroup * T::kCdWarpgroupBytes;
      if (store_leader) bulk_wait_group_read<0>();
      warpgroup_barrier();
      // stmatrix x4 covers column groups 2jj and 2jj + 1, rows 0-7 and 8-7 of this warp's 16: matrix
      // i = lane / 8 is (group 2jj + i / 2, half i % 2); lane gives row lane % 8 of matrix i.
      const uint32_t cd_base = smem_addr(cd);
      if constexpr (T::kOutBytes == 4) {
        // fp32 (the k-grouped gradient): this thread's column pairs of rows r and r + 8 as float2, NaN for
        // a group whose segment breaks the layout rule.
        const int r = warp * 16 + lane / 4;
        const float kNaN = __int_as_float(0x7fc00000);
        const bool nan = ti.job.nan;
#pragma unroll
        for (int jj = 0; jj < BN / 8; ++jj) {
          const int c = 8 * jj + col;
          x::st_shared_f32x2(cd_base + T::cd_offset(r, c), nan ? kNaN : acc[4 * jj + 0], nan ? kNaN : acc[4 * jj + 1]);
          x::st_shared_f32x2(cd_base + T::cd_offset(r + 8, c), nan ? kNaN : acc[4 * jj + 2],
                             nan ? kNaN : acc[4 * jj + 3]);
        }
      } else {
        const int mi = lane / 8;
        const int r = warp * 16 + (lane % 8) + 8 * (mi & 1);
#pragma unroll
        for (int jj = 0; jj < BN / 16; ++jj) {
          const int c = 16 * jj + 8 * (mi >> 1);
          x::stmatrix_x4(cd_base + T::cd_offset(r, c), x::pack_bf16x2(acc[8 * jj + 0], acc[8 * jj + 1]),
                         x::pack_bf16x2(acc[8 * jj + 2], acc[8 * jj + 3]),
                         x::pack_bf16x2(acc[8 * jj + 4], acc[8 * jj + 5]),
                         x::pack_bf16x2(acc[8 * jj + 6], acc[8 * jj + 7]));
        }
      }
      fence_proxy_async_smem();  // this thread's generic-proxy writes -> visible to the TMA (async proxy)
      warpgroup_barrier();
      if (store_leader) {
        // (the caller checked the slice's rows: all written, or rows that the tensor map clips: dense at
        // M; k-grouped at the group's M, its map being 3D (n, m, group))
#pragma unroll
        for (int q = 0; q < T::kStorePanels; ++q) {
          const int col0 = ti.job.n0 + q * T::kStorePanelCols;
          if (col0 >= p.N) continue;
          uint8_t* panel = cd + q * T::kStorePanelBytes;
          if constexpr (kLayout == GemmLayout::kKGrouped) {
            const int row0 = ti.job.m0 + warpgroup * 64;
            if (p.accumulate)
              x::tma_reduce_add_3d(&tmap_out, panel, col0, row0, ti.job.group);
            else
              tma_store_3d(&tmap_out, panel, col0, row0, ti.job.group);
          } else {
            tma_store_2d(&tmap_out, panel, col0, ti.job.out_row + warpgroup * 64);
          }
        }
        bulk_commit_group();
      }
    };

    // The epilogue of one tile: TMA stores for a warpgroup slice whose 64 rows are all written (dense:
    // any slice that starts inside M, the store clips the tail), register stores for the rest.
    auto store = [&](const TileInfo& ti) {
      if constexpr (kOverlap) {
        constexpr bool kClipped = kLayout == GemmLayout::kDense || kLayout == GemmLayout::kKGrouped;
        if (kLayout == GemmLayout::kKGrouped && p.accumulate && ti.job.num_kb == 0 && !ti.job.nan) return;
        const int first_row = warpgroup * 64;
        const bool slice_tma = kClipped ? first_row < ti.job.rows : first_row + 64 <= ti.job.rows;
        if (p.tma_store && slice_tma) {
          store_tma(ti);
          return;
        }
        if (kClipped && p.tma_store) return;  // (a slice past the rows: nothing to write)
      }
      store_registers(ti);
    };

    // K blocks [1, n) of a tile whose block 0 is issued into partial0 (sc0), then waits for all of them
    // and promotes them in order. partial0 holds even K blocks, partial1 odd ones; at most two groups in
    // flight. The steady loop has no data-dependent waits, which lets ptxas prove the overlap is safe.
    auto mainloop_pipelined = [&](const TileInfo& ti) {
      if constexpr (kPipelined) {
        const int k0 = ti.job.kb0, n = ti.job.num_kb;
        int kb = 0;
        for (; kb + 2 < n; kb += 2) {
          issue(partial1, sc1, k0 + kb + 1, ti);
          wgmma_wait_group<1>();
          retire(partial0, sc0, ti);
          issue(partial0, sc0, k0 + kb + 2, ti);
          wgmma_wait_group<1>();
          retire(partial1, sc1, ti);
        }
        if (kb + 1 < n) {
          issue(partial1, sc1, k0 + kb + 1, ti);
          wgmma_wait_group<1>();
          retire(partial0, sc0, ti);
          wgmma_wait_group<0>();
          retire(partial1, sc1, ti);
        } else {
          wgmma_wait_group<0>();
          retire(partial0, sc0, ti);
        }
      }
    };

    // kOverlap: K block 0 of a tile is issued at the end of the previous tile (before its epilogue), or
    // here for the first tile.
    TileInfo ti;
    bool have = next_tile(ti);
    if constexpr (kOverlap) {
      if (have && ti.job.num_kb > 0) issue(partial0, sc0, ti.job.kb0, ti);
    }
    while (have) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;

      if constexpr (kOverlap) {
        // K block 0 was issued before the previous tile's epilogue and has most likely finished by now.
        // Waiting here (rather than with the first wait_group<1> below) keeps the wgmma pipeline state
        // at the tile loop's back edge empty; without it ptxas serializes every wgmma (C7514).
        wgmma_wait_group<0>();
      }
      if (ti.job.num_kb > 0) {
        if constexpr (kPipelined) {
          if constexpr (!kOverlap) issue(partial0, sc0, ti.job.kb0, ti);
          mainloop_pipelined(ti);
        } else {
          // One fragment: issue, wait, promote per K block (block 0 already issued with kOverlap).
          for (int kb = 0; kb < ti.job.num_kb; ++kb) {
            if (!kOverlap || kb > 0) issue(partial0, sc0, ti.job.kb0 + kb, ti);
            wgmma_wait_group<0>();
            retire(partial0, sc0, ti);
          }
        }
      }

      if constexpr (kOverlap) {
        // No wgmma is in flight and acc is final: start the next tile's tensor-core work, then store.
        TileInfo next;
        const bool have_next = next_tile(next);
        if (have_next && next.job.num_kb > 0) issue(partial0, sc0, next.job.kb0, next);
        store(ti);
        ti = next;
        have = have_next;
      } else {
        store(ti);
        have = next_tile(ti);
      }
    }
    if constexpr (kOverlap) {
      // Nothing is in flight here at run time (the last tile issues no next K block), but ptxas cannot
      // tell: without this wait it injects one (C7517).
      wgmma_wait_group<0>();
      // The last tile's TMA stores must be complete before the CTA exits.
      if (p.tma_store && store_leader) bulk_wait_group<0>();
    }
  }
  // Remote arrivals and multicast writes target the peer's shared memory until its last stage: neither
  // CTA of a cluster may exit before both are done. Every thread (the idle producer lanes included)
  // takes part, so no rule about exited threads is relied on.
  if constexpr (kCluster > 1) cluster_sync();
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a target without wgmma/TMA; the host launcher refuses such devices
#endif
}

// ------------------------------------------------------------------------------------------------
// Host
// ------------------------------------------------------------------------------------------------

struct Problem {
  const void* a;
  const float* a_scale;
  int a_scale_ld;
  const void* b;
  const float* b_scale;
  int b_scale_ld;
  void* out;
  bool out_fp32, accumulate;
  int M, N, K, num_sms;
  cudaStream_t stream;
  bool tma_store;  // config asked for Fp8GemmEpilogue::kTmaStore (kOverlap kernels only)
  int device;
  // Grouped layouts (fp8_grouped_gemm.cu): M, N, K are one group's (contiguous: M_total; masked: M_max;
  // k-grouped: K = K_total); a is [G * M, K] when masked, b [G * N, K] when contiguous or masked.
  GemmLayout layout = GemmLayout::kDense;
  const int* rows = nullptr;  // m_indices, masked_m or k_offsets
  int G = 1;
  int a_scale_gs = 0;  // masked: a_scale's stride between groups (elements); == M: one [Kb][G * M] array
};

constexpr int kMaxDevices = 64;  // device ordinals with a cached occupancy answer

// The cluster launch configuration shared by the occupancy query and the launch: a 1-D grid of `ctas` CTAs
// in clusters of `cluster` CTAs along x. `attr` is the storage cfg.attrs points to (it must outlive cfg).
cudaLaunchConfig_t cluster_launch_config(int ctas, int cluster, int threads, int smem_bytes, cudaStream_t stream,
                                         cudaLaunchAttribute& attr) {
  attr = cudaLaunchAttribute{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(ctas);
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// How many clusters of `kernel` fit on the device at once: a cluster launch needs `cluster` free SMs in
// one GPC, and GPCs need not have an even SM count, so this can be below num_sms / cluster (on an H100
// SXM with one CTA per SM, expected 66 for cluster 2: 132 SMs in TPCs of 2). The persistent grid must not
// exceed it, or the extra clusters would run as a second wave. `cache` is the kernel's own (one per
// instantiation: every fp8_gemm_kernel has the same function type, so a cache keyed on the type, as
// before, was shared by all cluster kernels and answered for whichever was queried first). A failed
// query or an answer of 0 is not cached (and falls back to num_sms / cluster; a kernel that cannot run
// as a cluster at all then fails at launch with the driver's error).
int resident_clusters(const void* kernel, int cluster, int threads, int smem_bytes, const Problem& q,
                      std::atomic<int> (&cache)[kMaxDevices]) {
  std::atomic<int>* slot = q.device >= 0 && q.device < kMaxDevices ? &cache[q.device] : nullptr;
  if (slot != nullptr) {
    const int cached = slot->load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch_config(cluster, cluster, threads, smem_bytes, nullptr, attr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters < 1) {
    (void)cudaGetLastError();  // not sticky: clear it so the launch's check does not report it
    return std::max(1, q.num_sms / cluster);
  }
  if (slot != nullptr) slot->store(clusters, std::memory_order_relaxed);
  return clusters;
}

// Raises the kernel's dynamic shared-memory limit and returns in *ctas the persistent grid its launch
// uses for q: min(num_sms, tiles) CTAs, or with clusters min(resident clusters, tiles) clusters of
// kCluster CTAs, where a tile is then a cluster's (kCluster vertically adjacent m blocks).
template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false, int kCluster = 1,
          GemmLayout kLayout = GemmLayout::kDense>
cudaError_t persistent_grid(const Problem& q, int* ctas) {
  using T = Tile<BM, BN, kScaleBPerRow, kOverlap, kLayout == GemmLayout::kKGrouped>;
  auto kernel = fp8_gemm_kernel<BM, BN, kScaleBPerRow, kOverlap, kCluster, kLayout>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  if (err != cudaSuccess) return err;
  // Tiles of one group (masked: at most; the walk skips the rows past masked_m on the device) times groups.
  const int groups = kLayout == GemmLayout::kMasked || kLayout == GemmLayout::kKGrouped ? q.G : 1;
  const long long num_tiles =
      static_cast<long long>(((q.M + BM - 1) / BM + kCluster - 1) / kCluster) * ((q.N + BN - 1) / BN) * groups;
  if constexpr (kCluster == 1) {
    *ctas = static_cast<int>(std::max(1LL, std::min<long long>(q.num_sms, num_tiles)));
  } else {
    static std::atomic<int> cache[kMaxDevices];  // this kernel's occupancy per device; 0 = not queried yet
    const int resident =
        resident_clusters(reinterpret_cast<const void*>(kernel), kCluster, T::kThreads, T::kSmemBytes, q, cache);
    *ctas = static_cast<int>(std::max(1LL, std::min<long long>(resident, num_tiles))) * kCluster;
  }
  return cudaSuccess;
}

template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false, int kCluster = 1,
          GemmLayout kLayout = GemmLayout::kDense>
cudaError_t launch(const Problem& q) {
  using T = Tile<BM, BN, kScaleBPerRow, kOverlap, kLayout == GemmLayout::kKGrouped>;
  using namespace hopper;
  // setmaxnreg redistributes the CTA's registers: the launch gives each thread the entry count, at most
  // 65536 / threads rounded down to a multiple of 8 (168 for 384 threads); asking for more hangs.
  static_assert(128 * (producer_regs(kScaleBPerRow) + T::kMathWarpgroups * math_regs(kScaleBPerRow)) <=
                    T::kThreads * (65536 / T::kThreads / 8 * 8),
                "register file after setmaxnreg");
  static_assert(T::kTxBytes < (1u << 20), "mbarrier transaction count range");
  const int num_k_blocks = q.K / kBlockK;
  constexpr bool kMasked = kLayout == GemmLayout::kMasked;
  const uint64_t a_rows = static_cast<uint64_t>(q.M) * (kMasked ? q.G : 1);
  const uint64_t b_rows =
      static_cast<uint64_t>(q.N) * (kMasked || kLayout == GemmLayout::kContiguous ? q.G : 1);
  // masked a_scale: one [Kb][G * M_max] array (a 2D map over G * M_max rows), or one [Kb][ld] per group
  // (a 3D map (m, kb, g))
  const bool scale_flat = !kMasked || q.a_scale_gs == q.M;

  CUtensorMap tmap_a{}, tmap_b{}, tmap_a_scale{}, tmap_b_scale{}, tmap_out{};
  cudaError_t err = make_tensor_map_2d(&tmap_a, CU_TENSOR_MAP_DATA_TYPE_UINT8, q.a, q.K, a_rows, q.K, kBlockK, BM,
                                       CU_TENSOR_MAP_SWIZZLE_128B);
  // With clusters each CTA loads (and multicasts) half of the B tile.
  if (err == cudaSuccess)
    err = make_tensor_map_2d(&tmap_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, q.b, q.K, b_rows, q.K, kBlockK, BN / kCluster,
                             CU_TENSOR_MAP_SWIZZLE_128B);
  if (err == cudaSuccess && scale_flat)
    err = make_tensor_map_2d(&tmap_a_scale, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, q.a_scale, a_rows, num_k_blocks,
                             static_cast<uint64_t>(q.a_scale_ld) * 4, BM, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
  if (err == cudaSuccess && !scale_flat) {
    const uint64_t dims[3] = {static_cast<uint64_t>(q.M), static_cast<uint64_t>(num_k_blocks),
                              static_cast<uint64_t>(q.G)};
    const uint64_t strides[2] = {static_cast<uint64_t>(q.a_scale_ld) * 4, static_cast<uint64_t>(q.a_scale_gs) * 4};
    const uint32_t box[3] = {BM, 1, 1};
    err = make_tensor_map_3d(&tmap_a_scale, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, q.a_scale, dims, strides, box,
                             CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (err == cudaSuccess && kScaleBPerRow)
    err = make_tensor_map_2d(&tmap_b_scale, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, q.b_scale, q.N, num_k_blocks,
                             static_cast<uint64_t>(q.b_scale_ld) * 4, BN, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
  // TMA store: bf16 rows whose stride (2N bytes) and base are 16-byte aligned; else register stores.
  const uintptr_t out_addr = reinterpret_cast<uintptr_t>(q.out);
  // k-grouped: fp32 [G, M, N] as a 3D map, so that a tile's rows past its group's M are clipped.
  constexpr bool kKGroupedOut = kLayout == GemmLayout::kKGrouped;
  const bool tma_store = kOverlap && q.tma_store && q.out_fp32 == kKGroupedOut &&
                         q.N % (kKGroupedOut ? 4 : 8) == 0 && out_addr % 16 == 0;
  if (err == cudaSuccess && tma_store && !kKGroupedOut)
    err = make_tensor_map_2d(&tmap_out, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, q.out, q.N, a_rows,
                             static_cast<uint64_t>(q.N) * 2, T::kStorePanelCols, 64,
                             T::kStoreSwizzle == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_32B);
  if (err == cudaSuccess && tma_store && kKGroupedOut) {
    const uint64_t dims[3] = {static_cast<uint64_t>(q.N), static_cast<uint64_t>(q.M), static_cast<uint64_t>(q.G)};
    const uint64_t strides[2] = {static_cast<uint64_t>(q.N) * 4, static_cast<uint64_t>(q.N) * q.M * 4};
    const uint32_t box[3] = {static_cast<uint32_t>(T::kStorePanelCols), 64, 1};
    err = make_tensor_map_3d(&tmap_out, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, q.out, dims, strides, box,
                             CU_TENSOR_MAP_SWIZZLE_128B);
  }
  if (err != cudaSuccess) return err;

  Params p{};
  p.b_scale = q.b_scale;
  p.out = q.out;
  p.M = q.M;
  p.N = q.N;
  p.K = q.K;
  // With clusters the rasterized units are pairs of m blocks (same ~1024 rows per group).
  p.num_m_blocks = ((q.M + BM - 1) / BM + kCluster - 1) / kCluster;
  p.num_n_blocks = (q.N + BN - 1) / BN;
  p.group_m_blocks = kGroupRows / (BM * kCluster);
  p.out_fp32 = q.out_fp32;
  p.accumulate = q.accumulate;
  p.paired_stores = q.N % 2 == 0 && out_addr % (q.out_fp32 ? 8 : 4) == 0;
  p.tma_store = tma_store;
  p.rows = q.rows;
  p.G = q.G;
  p.a_scale_group_rows = kMasked && scale_flat ? q.M : 0;

  auto kernel = fp8_gemm_kernel<BM, BN, kScaleBPerRow, kOverlap, kCluster, kLayout>;
  int grid = 0;
  err = persistent_grid<BM, BN, kScaleBPerRow, kOverlap, kCluster, kLayout>(q, &grid);
  if (err != cudaSuccess) return err;
  if constexpr (kCluster == 1) {
    kernel<<<grid, T::kThreads, T::kSmemBytes, q.stream>>>(tmap_a, tmap_b, tmap_a_scale, tmap_b_scale, p, tmap_out);
    return cudaGetLastError();
  } else {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_launch_config(grid, kCluster, T::kThreads, T::kSmemBytes, q.stream, attr);
    return cudaLaunchKernelEx(&cfg, kernel, tmap_a, tmap_b, tmap_a_scale, tmap_b_scale, p, tmap_out);
  }
}

// ------------------------------------------------------------------------------------------------
// The table of compiled kernels each .cu file keeps (its layouts' instantiations).
// ------------------------------------------------------------------------------------------------

// One compiled kernel. `overlap` entries serve both Fp8GemmEpilogue::kOverlap and kTmaStore (a runtime
// flag).
struct ConfigEntry {
  int block_m, block_n;
  ScaleGranularity gran;
  bool overlap;
  int cluster_m;
  GemmLayout layout;
  cudaError_t (*launch)(const Problem&);
  cudaError_t (*grid)(const Problem&, int* ctas);  // the persistent grid `launch` uses (fp8_gemm_grid_ctas)
};

// The entry of one compiled kernel (its fields follow from the template arguments).
template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false, int kCluster = 1,
          GemmLayout kLayout = GemmLayout::kDense>
constexpr ConfigEntry kernel_entry() {
  return {BM,
          BN,
          kScaleBPerRow ? ScaleGranularity::k1D1D : ScaleGranularity::k1D2D,
          kOverlap,
          kCluster,
          kLayout,
          launch<BM, BN, kScaleBPerRow, kOverlap, kCluster, kLayout>,
          persistent_grid<BM, BN, kScaleBPerRow, kOverlap, kCluster, kLayout>};
}

template <size_t kCount>
const ConfigEntry* find_config(const ConfigEntry (&table)[kCount], Fp8GemmConfig c, ScaleGranularity gran,
                               GemmLayout layout) {
  const bool overlap = c.epilogue != Fp8GemmEpilogue::kRegisters;
  if (c.epilogue != Fp8GemmEpilogue::kRegisters && c.epilogue != Fp8GemmEpilogue::kOverlap &&
      c.epilogue != Fp8GemmEpilogue::kTmaStore)
    return nullptr;
  for (const ConfigEntry& e : table)
    if (e.block_m == c.block_m && e.block_n == c.block_n && e.gran == gran && e.overlap == overlap &&
        e.cluster_m == c.cluster_m && e.layout == layout)
      return &e;
  return nullptr;
}

inline bool is_valid_alignment(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The current device into *device; cudaErrorNotSupported unless it is compute capability 9.x.
inline cudaError_t current_sm90_device(int* device) {
  int major = 0;
  cudaError_t err = cudaGetDevice(device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, *device);
  if (err != cudaSuccess) return err;
  return major == 9 ? cudaSuccess : cudaErrorNotSupported;
}

}  // namespace
}  // namespace dskernels
