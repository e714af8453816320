// Block-scaled FP8 GEMM for Hopper: out[M, N] = a[M, K] @ b[N, K]^T with per-128 K-block scales.
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
//   - kCluster = 2: clusters of two CTAs on vertically adjacent tiles; each CTA loads half of the
//     shared B tile and multicasts it into both CTAs' stage, and consumers release a stage in both CTAs.
// Design notes and measurements: NOTES.md beside this file.

#include "fp8_gemm.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "../hopper.cuh"

namespace dskernels {
namespace fp8_gemm_detail {

// Kernel arguments besides the tensor maps (named namespace: its device-only members would draw
// unused-function warnings in the compute_80 pass if they had internal linkage).
struct Params {
  const float* b_scale;  // 1D2D only: [ceil(N/128), K/128] row-major
  void* out;
  int M, N, K;
  int num_m_blocks, num_n_blocks;
  int group_m_blocks;    // m blocks per rasterization group
  bool out_fp32, accumulate, paired_stores;
  bool tma_store;        // kOverlap kernels: the epilogue goes through smem and TMA stores (bf16 only)

  // Tile t -> (m_block, n_block): groups of group_m_blocks m-blocks, m fastest inside a group, so the
  // ~num_sms tiles in flight cover a few m-blocks times many n-blocks and reuse both operands in L2.
  __device__ __forceinline__ void tile_coords(int t, int& m_block, int& n_block) const {
    const int group_tiles = group_m_blocks * num_n_blocks;
    const int first_m = (t / group_tiles) * group_m_blocks;
    const int rows_in_group = min(num_m_blocks - first_m, group_m_blocks);
    const int r = t % group_tiles;
    m_block = first_m + r % rows_in_group;
    n_block = r / rows_in_group;
  }

  // Writes out[row, col] = x and out[row, col + 1] = y (or adds into them), masked to [M, N].
  __device__ __forceinline__ void store_pair(int row, int col, float x, float y) const {
    if (row >= M || col >= N) return;
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

// Two floats -> bf16x2 bits (x in the low half).
__device__ __forceinline__ uint32_t pack_bf16x2(float x, float y) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&v);
}

}  // namespace sm90
}  // namespace fp8_gemm_detail

namespace {

using fp8_gemm_detail::Params;

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

// Compile-time geometry of one instantiation. kOverlap adds a bf16 staging tile for the TMA-store
// epilogue (BM x BN x 2 bytes, one 64-row slice per math warpgroup) and takes it from the stages.
template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false>
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
  // Staging tile of the TMA-store epilogue: per math warpgroup, 64 rows x BN bf16 cut into panels of
  // kStoreSwizzle bytes per row (one TMA box of {kStorePanelCols, 64} each), each panel laid out as the
  // tensor map's swizzle expects: 128-byte swizzle when BN % 64 == 0, else 32-byte swizzle (16 columns).
  // Either way the 8 rows of one stmatrix 8x8 matrix land in 8 different 16-byte bank groups.
  static constexpr int kStoreSwizzle = BN % 64 == 0 ? 128 : 32;
  static constexpr int kStorePanelCols = kStoreSwizzle / 2;
  static constexpr int kStorePanels = BN / kStorePanelCols;
  static_assert(kStorePanels * kStorePanelCols == BN, "whole panels");
  static constexpr int kStorePanelBytes = 64 * kStoreSwizzle;
  static constexpr int kCdWarpgroupBytes = 64 * BN * 2;  // multiple of 1024 (BN % 8 == 0)
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
    const uint32_t off = r * kStoreSwizzle + (c % kStorePanelCols) * 2;
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
  int m0, n0;
  const float* b_scale_lo;  // columns [n0, n0 + 8 * first_groups) use this row of b_scale,
  const float* b_scale_hi;  // the rest the next one
  int first_groups;
};

template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false, int kCluster = 1>
__global__ void __launch_bounds__(Tile<BM, BN, kScaleBPerRow, kOverlap>::kThreads, 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                    const __grid_constant__ CUtensorMap tmap_a_scale,
                    const __grid_constant__ CUtensorMap tmap_b_scale, const Params p,
                    const __grid_constant__ CUtensorMap tmap_out) {
#if DSK_HOPPER_DEVICE
  using T = Tile<BM, BN, kScaleBPerRow, kOverlap>;
  using namespace hopper;
  namespace x = fp8_gemm_detail::sm90;
  constexpr int S = T::kStages;
  static_assert(kCluster == 1 || (kCluster == 2 && BN % 16 == 0), "B is split in two 8-row-aligned halves");

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + T::kBarrierOffset);
  uint64_t* empty = full + S;

  const int warpgroup = threadIdx.x / 128;
  const int num_k_blocks = p.K / kBlockK;
  // Without clusters, tile t is one CTA's; with clusters, t is the cluster's (p.num_m_blocks counts
  // pairs of m blocks) and CTA `cta_rank` of the cluster takes m block kCluster * pair + cta_rank.
  // Both CTAs of a cluster walk the same t sequence, so they agree on every stage's (tile, kb).
  const int num_tiles = p.num_m_blocks * p.num_n_blocks;
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
    if (threadIdx.x % 128 == 0) {
      tma_prefetch_descriptor(&tmap_a);
      tma_prefetch_descriptor(&tmap_b);
      tma_prefetch_descriptor(&tmap_a_scale);
      if constexpr (kScaleBPerRow) tma_prefetch_descriptor(&tmap_b_scale);
      int s = 0;
      uint32_t phase = 0;
      for (int t = first_tile; t < num_tiles; t += tile_stride) {
        int m_block, n_block;
        p.tile_coords(t, m_block, n_block);
        if constexpr (kCluster > 1) m_block = m_block * kCluster + cta_rank;
        const int m0 = m_block * BM, n0 = n_block * BN;
        if constexpr (kCluster == 1) {
          for (int kb = 0; kb < num_k_blocks; ++kb) {
            mbarrier_wait(&empty[s], phase ^ 1);
            mbarrier_arrive_expect_tx(&full[s], T::kTxBytes);
            tma_load_2d(smem + s * T::kABytes, &tmap_a, &full[s], kb * kBlockK, m0);
            tma_load_2d(smem + T::kBOffset + s * T::kBBytes, &tmap_b, &full[s], kb * kBlockK, n0);
            tma_load_2d(smem + T::kAScaleOffset + s * T::kAScaleBytes, &tmap_a_scale, &full[s], m0, kb);
            if constexpr (kScaleBPerRow)
              tma_load_2d(smem + T::kBScaleOffset + s * T::kBScaleBytes, &tmap_b_scale, &full[s], n0, kb);
            if (++s == S) { s = 0; phase ^= 1; }
          }
        } else {
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

    auto tile_info = [&](int t) {
      int m_block, n_block;
      p.tile_coords(t, m_block, n_block);
      if constexpr (kCluster > 1) m_block = m_block * kCluster + cta_rank;
      TileInfo ti;
      ti.m0 = m_block * BM;
      ti.n0 = n_block * BN;
      // 1D2D: columns [n0, n0 + 8 * first_groups) use b_scale row n0 / 128, the rest the next row.
      const int scale_row = ti.n0 / 128;
      ti.b_scale_lo = p.b_scale + static_cast<size_t>(scale_row) * num_k_blocks;
      ti.b_scale_hi =
          p.b_scale + static_cast<size_t>(min(scale_row + 1, num_n_scale_blocks - 1)) * num_k_blocks;
      ti.first_groups = (128 - ti.n0 % 128) / 8;
      return ti;
    };

    float acc[BN / 2];

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

    // Masked stores of acc straight from registers (Fp8GemmEpilogue::kRegisters).
    auto store_registers = [&](const TileInfo& ti) {
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int c = ti.n0 + 8 * j + col;
        p.store_pair(ti.m0 + row, c, acc[4 * j + 0], acc[4 * j + 1]);
        p.store_pair(ti.m0 + row + 8, c, acc[4 * j + 2], acc[4 * j + 3]);
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
      const int mi = lane / 8;
      const int r = warp * 16 + (lane % 8) + 8 * (mi & 1);
      const uint32_t cd_base = smem_addr(cd);
#pragma unroll
      for (int jj = 0; jj < BN / 16; ++jj) {
        const int c = 16 * jj + 8 * (mi >> 1);
        x::stmatrix_x4(cd_base + T::cd_offset(r, c), x::pack_bf16x2(acc[8 * jj + 0], acc[8 * jj + 1]),
                       x::pack_bf16x2(acc[8 * jj + 2], acc[8 * jj + 3]),
                       x::pack_bf16x2(acc[8 * jj + 4], acc[8 * jj + 5]),
                       x::pack_bf16x2(acc[8 * jj + 6], acc[8 * jj + 7]));
      }
      fence_proxy_async_smem();  // this thread's generic-proxy writes -> visible to the TMA (async proxy)
      warpgroup_barrier();
      if (store_leader) {
        const int row0 = ti.m0 + warpgroup * 64;
        if (row0 < p.M) {
#pragma unroll
          for (int q = 0; q < T::kStorePanels; ++q) {
            const int col0 = ti.n0 + q * T::kStorePanelCols;
            if (col0 < p.N) tma_store_2d(&tmap_out, cd + q * T::kStorePanelBytes, col0, row0);
          }
        }
        bulk_commit_group();
      }
    };

    KBlockScales sc0, sc1;
    // kOverlap: K block 0 of a tile is issued at the end of the previous tile (before its epilogue), or
    // here for the first tile.
    if constexpr (kOverlap) {
      if (first_tile < num_tiles) issue(partial0, sc0, 0, tile_info(first_tile));
    }
    for (int t = first_tile; t < num_tiles; t += tile_stride) {
      const TileInfo ti = tile_info(t);

#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;

      if constexpr (kPipelined) {
        // partial0 holds even K blocks, partial1 odd ones; at most two groups in flight. The steady
        // loop has no data-dependent waits, which lets ptxas prove the overlap is safe.
        if constexpr (!kOverlap) {
          issue(partial0, sc0, 0, ti);
        } else {
          // K block 0 was issued before the previous tile's epilogue and has most likely finished by now.
          // Waiting here (rather than with the first wait_group<1> below) keeps the wgmma pipeline state
          // at the tile loop's back edge empty; without it ptxas serializes every wgmma (C7514).
          wgmma_wait_group<0>();
        }
        int kb = 0;
        for (; kb + 2 < num_k_blocks; kb += 2) {
          issue(partial1, sc1, kb + 1, ti);
          wgmma_wait_group<1>();
          retire(partial0, sc0, ti);
          issue(partial0, sc0, kb + 2, ti);
          wgmma_wait_group<1>();
          retire(partial1, sc1, ti);
        }
        if (kb + 1 < num_k_blocks) {
          issue(partial1, sc1, kb + 1, ti);
          wgmma_wait_group<1>();
          retire(partial0, sc0, ti);
          wgmma_wait_group<0>();
          retire(partial1, sc1, ti);
        } else {
          wgmma_wait_group<0>();
          retire(partial0, sc0, ti);
        }
      } else if constexpr (!kOverlap) {
        for (int kb = 0; kb < num_k_blocks; ++kb) {
          issue(partial0, sc0, kb, ti);
          wgmma_wait_group<0>();
          retire(partial0, sc0, ti);
        }
      } else {
        // The same order as above with K block 0 already issued.
        wgmma_wait_group<0>();
        retire(partial0, sc0, ti);
        for (int kb = 1; kb < num_k_blocks; ++kb) {
          issue(partial0, sc0, kb, ti);
          wgmma_wait_group<0>();
          retire(partial0, sc0, ti);
        }
      }

      if constexpr (kOverlap) {
        // No wgmma is in flight and acc is final: start the next tile's tensor-core work, then store.
        if (t + tile_stride < num_tiles) issue(partial0, sc0, 0, tile_info(t + tile_stride));
        if (p.tma_store)
          store_tma(ti);
        else
          store_registers(ti);
      } else {
        store_registers(ti);
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
template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false, int kCluster = 1>
cudaError_t persistent_grid(const Problem& q, int* ctas) {
  using T = Tile<BM, BN, kScaleBPerRow, kOverlap>;
  auto kernel = fp8_gemm_kernel<BM, BN, kScaleBPerRow, kOverlap, kCluster>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int num_tiles = ((q.M + BM - 1) / BM + kCluster - 1) / kCluster * ((q.N + BN - 1) / BN);
  if constexpr (kCluster == 1) {
    *ctas = std::max(1, std::min(q.num_sms, num_tiles));
  } else {
    static std::atomic<int> cache[kMaxDevices];  // this kernel's occupancy per device; 0 = not queried yet
    const int resident =
        resident_clusters(reinterpret_cast<const void*>(kernel), kCluster, T::kThreads, T::kSmemBytes, q, cache);
    *ctas = std::max(1, std::min(resident, num_tiles)) * kCluster;
  }
  return cudaSuccess;
}

template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false, int kCluster = 1>
cudaError_t launch(const Problem& q) {
  using T = Tile<BM, BN, kScaleBPerRow, kOverlap>;
  using namespace hopper;
  // setmaxnreg redistributes the CTA's registers: the launch gives each thread the entry count, at most
  // 65536 / threads rounded down to a multiple of 8 (168 for 384 threads); asking for more hangs.
  static_assert(128 * (producer_regs(kScaleBPerRow) + T::kMathWarpgroups * math_regs(kScaleBPerRow)) <=
                    T::kThreads * (65536 / T::kThreads / 8 * 8),
                "register file after setmaxnreg");
  static_assert(T::kTxBytes < (1u << 20), "mbarrier transaction count range");
  const int num_k_blocks = q.K / kBlockK;

  CUtensorMap tmap_a{}, tmap_b{}, tmap_a_scale{}, tmap_b_scale{}, tmap_out{};
  cudaError_t err = make_tensor_map_2d(&tmap_a, CU_TENSOR_MAP_DATA_TYPE_UINT8, q.a, q.K, q.M, q.K, kBlockK, BM,
                                       CU_TENSOR_MAP_SWIZZLE_128B);
  // With clusters each CTA loads (and multicasts) half of the B tile.
  if (err == cudaSuccess)
    err = make_tensor_map_2d(&tmap_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, q.b, q.K, q.N, q.K, kBlockK, BN / kCluster,
                             CU_TENSOR_MAP_SWIZZLE_128B);
  if (err == cudaSuccess)
    err = make_tensor_map_2d(&tmap_a_scale, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, q.a_scale, q.M, num_k_blocks,
                             static_cast<uint64_t>(q.a_scale_ld) * 4, BM, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
  if (err == cudaSuccess && kScaleBPerRow)
    err = make_tensor_map_2d(&tmap_b_scale, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, q.b_scale, q.N, num_k_blocks,
                             static_cast<uint64_t>(q.b_scale_ld) * 4, BN, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
  // TMA store: bf16 rows whose stride (2N bytes) and base are 16-byte aligned; else register stores.
  const uintptr_t out_addr = reinterpret_cast<uintptr_t>(q.out);
  const bool tma_store = kOverlap && q.tma_store && !q.out_fp32 && q.N % 8 == 0 && out_addr % 16 == 0;
  if (err == cudaSuccess && tma_store)
    err = make_tensor_map_2d(&tmap_out, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, q.out, q.N, q.M,
                             static_cast<uint64_t>(q.N) * 2, T::kStorePanelCols, 64,
                             T::kStoreSwizzle == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_32B);
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

  auto kernel = fp8_gemm_kernel<BM, BN, kScaleBPerRow, kOverlap, kCluster>;
  int grid = 0;
  err = persistent_grid<BM, BN, kScaleBPerRow, kOverlap, kCluster>(q, &grid);
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

// The compiled kernels. 1D2D (the hot path): narrow 64-row tiles spread small-M problems over all
// SMs; 128 x 128 is the large-M workhorse; 128 x 144 fits N = 576 (4 x 144) into one wave at M = 4096.
// (128 x 112 and 128 x 160 were measured slower than 128 x 128 on every DeepSeek-V3 shape: BN > 128
// cannot hold two partial fragments, and a straddling b_scale costs selects.) 1D1D (weight gradients,
// M and N both large) gets two. Then the large-M variants (overlapped / TMA-store epilogue, 2-CTA B
// multicast): only fp8_gemm_pick_config's rule table below selects them.
// `overlap` entries serve both Fp8GemmEpilogue::kOverlap and kTmaStore (a runtime flag).
struct ConfigEntry {
  int block_m, block_n;
  ScaleGranularity gran;
  bool overlap;
  int cluster_m;
  cudaError_t (*launch)(const Problem&);
  cudaError_t (*grid)(const Problem&, int* ctas);  // the persistent grid `launch` uses (fp8_gemm_grid_ctas)
};

// The entry of one compiled kernel (its fields follow from the template arguments).
template <int BM, int BN, bool kScaleBPerRow, bool kOverlap = false, int kCluster = 1>
constexpr ConfigEntry kernel_entry() {
  return {BM,
          BN,
          kScaleBPerRow ? ScaleGranularity::k1D1D : ScaleGranularity::k1D2D,
          kOverlap,
          kCluster,
          launch<BM, BN, kScaleBPerRow, kOverlap, kCluster>,
          persistent_grid<BM, BN, kScaleBPerRow, kOverlap, kCluster>};
}

constexpr ConfigEntry kConfigs[] = {
    // Register-epilogue kernels: the tile-shape heuristic chooses among these.
    kernel_entry<64, 16, false>(),
    kernel_entry<64, 32, false>(),
    kernel_entry<64, 64, false>(),
    kernel_entry<64, 128, false>(),
    kernel_entry<128, 64, false>(),
    kernel_entry<128, 128, false>(),
    kernel_entry<128, 144, false>(),
    kernel_entry<64, 128, true>(),
    kernel_entry<128, 128, true>(),
    // Variants (all pass the self-test on an H100; the rule table below selects among them).
    kernel_entry<128, 64, false, true, 1>(),
    kernel_entry<128, 64, false, true, 2>(),
    kernel_entry<128, 128, false, false, 2>(),
    kernel_entry<128, 128, false, true, 1>(),
    kernel_entry<128, 128, false, true, 2>(),
    kernel_entry<128, 144, false, true, 1>(),
    kernel_entry<128, 144, false, true, 2>(),
    kernel_entry<128, 128, true, true, 1>(),
    kernel_entry<128, 128, true, true, 2>(),
};

bool is_base_kernel(const ConfigEntry& e) { return !e.overlap && e.cluster_m == 1; }

const ConfigEntry* find_config(Fp8GemmConfig c, ScaleGranularity gran) {
  const bool overlap = c.epilogue != Fp8GemmEpilogue::kRegisters;
  if (c.epilogue != Fp8GemmEpilogue::kRegisters && c.epilogue != Fp8GemmEpilogue::kOverlap &&
      c.epilogue != Fp8GemmEpilogue::kTmaStore)
    return nullptr;
  for (const ConfigEntry& e : kConfigs)
    if (e.block_m == c.block_m && e.block_n == c.block_n && e.gran == gran && e.overlap == overlap &&
        e.cluster_m == c.cluster_m)
      return &e;
  return nullptr;
}

// ------------------------------------------------------------------------------------------------
// Variant rules: the single place that turns the large-M variants on. fp8_gemm_pick_config first picks
// the tile shape among the register-epilogue, cluster_m = 1 kernels (cost model below), then applies the first row whose conditions
// hold and whose config is compiled.
// Measured on an H100 (`fp8_gemm_selftest sweep`, 2026-11-23, all 21 DeepSeek-V3 shapes): on every
// shape where the cost model picks a 128-row tile, the TMA-store epilogue of the same tile is faster,
// by 1.08x (4096x4096x7168) to 2.2x (4096x32768x512: the shorter K, the larger the share of a tile's
// time its epilogue takes when the tensor cores wait for it); kOverlap alone gains up to 1.06x. The 2-CTA
// multicast variants measured 3-4x slower than cluster_m = 1: a cluster-scope fence per K block in their
// consumer release, removed since (NOTES.md); no rule uses them until a GPU sweep times the fixed kernels.
// 1D1D (the weight gradient) takes the same TMA-store rule: measured on an H200 (`fp8_gemm_selftest
// sweep-wgrad`, 2026-12-01, NOTES.md), it is the best or within 4 % of it on every weight-gradient shape of
// the FP8Linear benchmark where the cost model picks 128 x 128.
// (kTmaStore falls back to kOverlap's register stores by itself for fp32 / odd N / unaligned out.)
// ------------------------------------------------------------------------------------------------
struct VariantRule {
  ScaleGranularity gran;
  int min_m, max_k;      // applies when M >= min_m and K <= max_k
  int block_m, block_n;  // ... and the heuristic picked this tile shape
  Fp8GemmEpilogue epilogue;
  int cluster_m;
};

constexpr VariantRule kVariantRules[] = {
    {ScaleGranularity::k1D2D, 1, std::numeric_limits<int>::max(), 128, 128, Fp8GemmEpilogue::kTmaStore, 1},
    {ScaleGranularity::k1D2D, 1, std::numeric_limits<int>::max(), 128, 144, Fp8GemmEpilogue::kTmaStore, 1},
    {ScaleGranularity::k1D1D, 1, std::numeric_limits<int>::max(), 128, 128, Fp8GemmEpilogue::kTmaStore, 1},
};

// Estimated cycles of one tile per K block on one SM: the slower of the tensor cores and the loads
// (about 64 bytes per cycle per SM from L2). The tensor cores give about 4096 FP8 MACs per cycle per SM
// to two pipelined math warpgroups (BM = 128, BN <= 128); a single warpgroup or a tile too wide for two
// partial fragments idles them during promotion (measured about 0.75 of that on an H100).
double tile_cycles_per_k_block(int block_m, int block_n) {
  const double macs_per_cycle = (block_m == 128 && block_n <= 128) ? 4096.0 : 3072.0;
  const double mma = double(block_m) * block_n * kBlockK / macs_per_cycle;
  const double load = double(block_m + block_n) * kBlockK / 64.0;
  return std::max(mma, load);
}

bool is_valid_alignment(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace

bool fp8_gemm_config_supported(Fp8GemmConfig config, ScaleGranularity b_gran) {
  return find_config(config, b_gran) != nullptr;
}

int fp8_gemm_list_configs(ScaleGranularity b_gran, Fp8GemmConfig* configs, int capacity) {
  int n = 0;
  auto add = [&](const ConfigEntry& e, Fp8GemmEpilogue epilogue) {
    if (n < capacity && configs != nullptr) configs[n] = Fp8GemmConfig{e.block_m, e.block_n, epilogue, e.cluster_m};
    ++n;
  };
  for (const ConfigEntry& e : kConfigs) {
    if (e.gran != b_gran) continue;
    if (!e.overlap) {
      add(e, Fp8GemmEpilogue::kRegisters);
    } else {
      add(e, Fp8GemmEpilogue::kOverlap);
      add(e, Fp8GemmEpilogue::kTmaStore);
    }
  }
  return n;
}

Fp8GemmConfig fp8_gemm_pick_config(int M, int N, int K, ScaleGranularity b_gran, int num_sms) {
  // Tile shape: every tile walks all of K, so K scales all candidates alike.
  Fp8GemmConfig best{0, 0};
  double best_cost = 0.0;
  for (const ConfigEntry& e : kConfigs) {
    if (e.gran != b_gran || !is_base_kernel(e)) continue;
    const long tiles = long((M + e.block_m - 1) / e.block_m) * ((N + e.block_n - 1) / e.block_n);
    const long waves = (tiles + num_sms - 1) / std::max(1, num_sms);
    const double cost = double(waves) * tile_cycles_per_k_block(e.block_m, e.block_n);
    // Ties go to the larger tile (fewer bytes per FLOP).
    if (best.block_m == 0 || cost < best_cost * 0.999 ||
        (cost <= best_cost * 1.001 && e.block_m * e.block_n > best.block_m * best.block_n)) {
      best = {e.block_m, e.block_n};
      best_cost = cost;
    }
  }
  // Variant: the first applicable rule (see kVariantRules).
  for (const VariantRule& r : kVariantRules) {
    if (r.gran != b_gran || M < r.min_m || K > r.max_k || r.block_m != best.block_m || r.block_n != best.block_n)
      continue;
    const Fp8GemmConfig v{best.block_m, best.block_n, r.epilogue, r.cluster_m};
    if (find_config(v, b_gran) == nullptr) continue;
    return v;
  }
  return best;
}

cudaError_t fp8_gemm(const void* a, const float* a_scale, int a_scale_ld, const void* b, const float* b_scale,
                     int b_scale_ld, ScaleGranularity b_gran, void* out, bool out_fp32, bool accumulate, int M, int N,
                     int K, int num_sms, cudaStream_t stream, const Fp8GemmConfig* config) {
  const bool per_row = b_gran == ScaleGranularity::k1D1D;
  if (M < 1 || N < 1 || K < kBlockK || K % kBlockK != 0 || num_sms < 1) return cudaErrorInvalidValue;
  if (a_scale_ld < M || a_scale_ld % 4 != 0) return cudaErrorInvalidValue;
  if (per_row && (b_scale_ld < N || b_scale_ld % 4 != 0)) return cudaErrorInvalidValue;
  if (accumulate && !out_fp32) return cudaErrorInvalidValue;
  if (!is_valid_alignment(a, 16) || !is_valid_alignment(b, 16) || !is_valid_alignment(a_scale, 16) ||
      !is_valid_alignment(b_scale, per_row ? 16 : 4) || !is_valid_alignment(out, out_fp32 ? 4 : 2))
    return cudaErrorInvalidValue;

  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major != 9) return cudaErrorNotSupported;

  const Fp8GemmConfig chosen = config != nullptr ? *config : fp8_gemm_pick_config(M, N, K, b_gran, num_sms);
  const ConfigEntry* entry = find_config(chosen, b_gran);
  if (entry == nullptr) return cudaErrorInvalidValue;
  const bool tma_store = chosen.epilogue == Fp8GemmEpilogue::kTmaStore;
  const Problem q{a, a_scale, a_scale_ld, b,       b_scale,   b_scale_ld, out,   out_fp32,
                  accumulate, M, N, K, num_sms, stream, tma_store, device};
  return entry->launch(q);
}

namespace fp8_gemm_detail {

// Debug hook for the self-test, deliberately not declared in fp8_gemm.h (fp8_gemm_selftest.cu declares it
// itself): the number of CTAs fp8_gemm launches for an M x N problem with this config on the current
// device (a multiple of config.cluster_m), computed by the same function the launch uses. Like a launch,
// it sets the kernel's dynamic shared-memory attribute (and, for clusters, queries the occupancy once).
cudaError_t fp8_gemm_grid_ctas(int M, int N, ScaleGranularity b_gran, int num_sms, Fp8GemmConfig config, int* ctas) {
  if (M < 1 || N < 1 || num_sms < 1 || ctas == nullptr) return cudaErrorInvalidValue;
  const ConfigEntry* entry = find_config(config, b_gran);
  if (entry == nullptr) return cudaErrorInvalidValue;
  Problem q{};
  q.M = M;
  q.N = N;
  q.K = kBlockK;
  q.num_sms = num_sms;
  const cudaError_t err = cudaGetDevice(&q.device);
  if (err != cudaSuccess) return err;
  return entry->grid(q, ctas);
}

}  // namespace fp8_gemm_detail
}  // namespace dskernels
