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
// plain stores straight from registers. Design notes and measurements: NOTES.md beside this file.

#include "fp8_gemm.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

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

}  // namespace fp8_gemm_detail

namespace {

using fp8_gemm_detail::Params;

constexpr int kBlockK = 128;                 // K elements (= bytes) per stage; also the scale block
constexpr int kMaxDynamicSmem = 232448;      // 227 KB: the H100's per-block opt-in limit
constexpr int kProducerRegs = 40;
constexpr int kMathRegs = 232;
constexpr int kGroupRows = 1024;             // rows of A shared by the tiles of one rasterization group

constexpr int round_up(int x, int to) { return (x + to - 1) / to * to; }
constexpr int gcd(int a, int b) { return b == 0 ? a : gcd(b, a % b); }

// Compile-time geometry of one instantiation.
template <int BM, int BN, bool kScaleBPerRow>
struct Tile {
  static_assert(BM == 64 || BM == 128, "one or two math warpgroups of 64 rows");
  static_assert(BN % 8 == 0 && BN >= 16 && BN <= 256, "wgmma N");
  // A BLOCK_N-wide tile then overlaps at most two 128-row blocks of b_scale (1D2D).
  static_assert(BN <= 128 + gcd(BN, 128), "tile would straddle three b_scale blocks");

  static constexpr int kMathWarpgroups = BM / 64;
  static constexpr int kThreads = 128 * (kMathWarpgroups + 1);
  static constexpr int kABytes = BM * kBlockK;  // multiple of 1024: swizzle atoms stay aligned
  static constexpr int kBBytes = BN * kBlockK;
  static constexpr int kAScaleBytes = round_up(BM * 4, 128);
  static constexpr int kBScaleBytes = kScaleBPerRow ? round_up(BN * 4, 128) : 0;
  static constexpr int kStageBytes = kABytes + kBBytes + kAScaleBytes + kBScaleBytes;
  static constexpr int kStages = std::min(32, (kMaxDynamicSmem - 1024 - 32 * 16) / kStageBytes);
  // Layout: [A x stages][B x stages][a_scale x stages][b_scale x stages][full x stages][empty x stages].
  static constexpr int kBOffset = kStages * kABytes;
  static constexpr int kAScaleOffset = kBOffset + kStages * kBBytes;
  static constexpr int kBScaleOffset = kAScaleOffset + kStages * kAScaleBytes;
  static constexpr int kBarrierOffset = kBScaleOffset + kStages * kBScaleBytes;
  // +1024: the dynamic shared-memory base is re-aligned to 1024 bytes for the 128-byte swizzle.
  static constexpr int kSmemBytes = kBarrierOffset + kStages * 16 + 1024;
  // TMA completes whole boxes, out-of-bounds parts included.
  static constexpr uint32_t kTxBytes = kABytes + kBBytes + BM * 4 + (kScaleBPerRow ? BN * 4 : 0);
  static_assert(kStages >= 2 && kSmemBytes <= kMaxDynamicSmem, "shared memory");
};

// What a math thread keeps of one K block between issuing its wgmma and promoting the result.
template <int BN, bool kScaleBPerRow>
struct KBlockScales {
  float a_lo, a_hi;                             // a_scale of rows `row` and `row + 8`
  float b_lo, b_hi;                             // 1D2D: b_scale of the tile's first and second 128-row block
  float2 b_cols[kScaleBPerRow ? BN / 8 : 1];    // 1D1D: b_scale of this thread's column pairs
  int stage;
};

template <int BM, int BN, bool kScaleBPerRow>
__global__ void __launch_bounds__(Tile<BM, BN, kScaleBPerRow>::kThreads, 1)
    fp8_gemm_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                    const __grid_constant__ CUtensorMap tmap_a_scale,
                    const __grid_constant__ CUtensorMap tmap_b_scale, const Params p) {
#if DSK_HOPPER_DEVICE
  using T = Tile<BM, BN, kScaleBPerRow>;
  using namespace hopper;
  constexpr int S = T::kStages;

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + T::kBarrierOffset);
  uint64_t* empty = full + S;

  const int warpgroup = threadIdx.x / 128;
  const int num_k_blocks = p.K / kBlockK;
  const int num_tiles = p.num_m_blocks * p.num_n_blocks;

  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbarrier_init(&full[s], 1);                           // the producer's arrive.expect_tx
      mbarrier_init(&empty[s], 4 * T::kMathWarpgroups);     // one arrival per math warp
    }
    fence_mbarrier_init();
    fence_proxy_async_smem();
  }
  __syncthreads();

  if (warpgroup == T::kMathWarpgroups) {
    // ---------------- producer ----------------
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x % 128 == 0) {
      tma_prefetch_descriptor(&tmap_a);
      tma_prefetch_descriptor(&tmap_b);
      tma_prefetch_descriptor(&tmap_a_scale);
      if constexpr (kScaleBPerRow) tma_prefetch_descriptor(&tmap_b_scale);
      int s = 0;
      uint32_t phase = 0;
      for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
        int m_block, n_block;
        p.tile_coords(t, m_block, n_block);
        const int m0 = m_block * BM, n0 = n_block * BN;
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
      }
    }
  } else {
    // ---------------- math warpgroups ----------------
    setmaxnreg_inc<kMathRegs>();
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int row = warpgroup * 64 + warp * 16 + lane / 4;  // tile row of acc[4j + 0/1]; +8 for 4j + 2/3
    const int col = 2 * (lane % 4);                          // tile column of acc[4j + 0] minus 8j
    const int num_n_scale_blocks = (p.N + 127) / 128;

    // Two partial fragments when registers allow (1D2D, BN <= 128): K block kb + 1 is issued before
    // kb is promoted, so this warpgroup's FFMAs overlap its own next wgmma, not only the other one's.
    constexpr bool kPipelined = !kScaleBPerRow && BN <= 128;
    float partial0[BN / 2], partial1[kPipelined ? BN / 2 : 1];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) partial0[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < (kPipelined ? BN / 2 : 1); ++i) partial1[i] = 0.0f;

    int s = 0;
    uint32_t phase = 0;
    for (int t = blockIdx.x; t < num_tiles; t += gridDim.x) {
      int m_block, n_block;
      p.tile_coords(t, m_block, n_block);
      const int m0 = m_block * BM, n0 = n_block * BN;

      // 1D2D: columns [n0, n0 + 8 * first_groups) use b_scale row n0 / 128, the rest the next row.
      const int scale_row = n0 / 128;
      const float* b_scale_lo = p.b_scale + static_cast<size_t>(scale_row) * num_k_blocks;
      const float* b_scale_hi =
          p.b_scale + static_cast<size_t>(min(scale_row + 1, num_n_scale_blocks - 1)) * num_k_blocks;
      const int first_groups = (128 - n0 % 128) / 8;

      float acc[BN / 2];
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;

      // Waits for K block kb's stage, reads its scales and issues its 4 wgmma into d (one commit group).
      auto issue = [&](float(&d)[BN / 2], KBlockScales<BN, kScaleBPerRow>& sc, int kb) {
        if constexpr (!kScaleBPerRow) {
          // Issued before the wait so the global latency hides behind the barrier.
          sc.b_lo = __ldg(b_scale_lo + kb);
          sc.b_hi = (128 % BN != 0) ? __ldg(b_scale_hi + kb) : 0.0f;
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
        if constexpr (kScaleBPerRow) {
          const float* b_scale = reinterpret_cast<const float*>(smem + T::kBScaleOffset + s * T::kBScaleBytes);
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) sc.b_cols[j] = *reinterpret_cast<const float2*>(b_scale + 8 * j + col);
        }
        sc.stage = s;
        if (++s == S) { s = 0; phase ^= 1; }
      };

      // After the wait that completed d's group: frees its stage and adds d * scales into acc.
      auto retire = [&](float(&d)[BN / 2], const KBlockScales<BN, kScaleBPerRow>& sc) {
        fence_registers(d);
        __syncwarp();
        if (lane == 0) mbarrier_arrive(&empty[sc.stage]);
        if constexpr (kScaleBPerRow) {
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
            acc[4 * j + 0] = fmaf(d[4 * j + 0], sc.a_lo * sc.b_cols[j].x, acc[4 * j + 0]);
            acc[4 * j + 1] = fmaf(d[4 * j + 1], sc.a_lo * sc.b_cols[j].y, acc[4 * j + 1]);
            acc[4 * j + 2] = fmaf(d[4 * j + 2], sc.a_hi * sc.b_cols[j].x, acc[4 * j + 2]);
            acc[4 * j + 3] = fmaf(d[4 * j + 3], sc.a_hi * sc.b_cols[j].y, acc[4 * j + 3]);
          }
        } else {
          const float lo0 = sc.a_lo * sc.b_lo, hi0 = sc.a_hi * sc.b_lo;
          const float lo1 = sc.a_lo * sc.b_hi, hi1 = sc.a_hi * sc.b_hi;
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
            const bool second = (128 % BN != 0) && j >= first_groups;
            const float lo = second ? lo1 : lo0, hi = second ? hi1 : hi0;
            acc[4 * j + 0] = fmaf(d[4 * j + 0], lo, acc[4 * j + 0]);
            acc[4 * j + 1] = fmaf(d[4 * j + 1], lo, acc[4 * j + 1]);
            acc[4 * j + 2] = fmaf(d[4 * j + 2], hi, acc[4 * j + 2]);
            acc[4 * j + 3] = fmaf(d[4 * j + 3], hi, acc[4 * j + 3]);
          }
        }
      };

      KBlockScales<BN, kScaleBPerRow> sc0, sc1;
      if constexpr (kPipelined) {
        // partial0 holds even K blocks, partial1 odd ones; at most two groups in flight. The steady
        // loop has no data-dependent waits, which lets ptxas prove the overlap is safe.
        issue(partial0, sc0, 0);
        int kb = 0;
        for (; kb + 2 < num_k_blocks; kb += 2) {
          issue(partial1, sc1, kb + 1);
          wgmma_wait_group<1>();
          retire(partial0, sc0);
          issue(partial0, sc0, kb + 2);
          wgmma_wait_group<1>();
          retire(partial1, sc1);
        }
        if (kb + 1 < num_k_blocks) {
          issue(partial1, sc1, kb + 1);
          wgmma_wait_group<1>();
          retire(partial0, sc0);
          wgmma_wait_group<0>();
          retire(partial1, sc1);
        } else {
          wgmma_wait_group<0>();
          retire(partial0, sc0);
        }
      } else {
        for (int kb = 0; kb < num_k_blocks; ++kb) {
          issue(partial0, sc0, kb);
          wgmma_wait_group<0>();
          retire(partial0, sc0);
        }
      }

#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int c = n0 + 8 * j + col;
        p.store_pair(m0 + row, c, acc[4 * j + 0], acc[4 * j + 1]);
        p.store_pair(m0 + row + 8, c, acc[4 * j + 2], acc[4 * j + 3]);
      }
    }
  }
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
};

template <int BM, int BN, bool kScaleBPerRow>
cudaError_t launch(const Problem& q) {
  using T = Tile<BM, BN, kScaleBPerRow>;
  using namespace hopper;
  static_assert(128 * (kProducerRegs + T::kMathWarpgroups * kMathRegs) <= 65536, "register file after setmaxnreg");
  static_assert(T::kTxBytes < (1u << 20), "mbarrier transaction count range");
  const int num_k_blocks = q.K / kBlockK;

  CUtensorMap tmap_a{}, tmap_b{}, tmap_a_scale{}, tmap_b_scale{};
  cudaError_t err = make_tensor_map_2d(&tmap_a, CU_TENSOR_MAP_DATA_TYPE_UINT8, q.a, q.K, q.M, q.K, kBlockK, BM,
                                       CU_TENSOR_MAP_SWIZZLE_128B);
  if (err == cudaSuccess)
    err = make_tensor_map_2d(&tmap_b, CU_TENSOR_MAP_DATA_TYPE_UINT8, q.b, q.K, q.N, q.K, kBlockK, BN,
                             CU_TENSOR_MAP_SWIZZLE_128B);
  if (err == cudaSuccess)
    err = make_tensor_map_2d(&tmap_a_scale, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, q.a_scale, q.M, num_k_blocks,
                             static_cast<uint64_t>(q.a_scale_ld) * 4, BM, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
  if (err == cudaSuccess && kScaleBPerRow)
    err = make_tensor_map_2d(&tmap_b_scale, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, q.b_scale, q.N, num_k_blocks,
                             static_cast<uint64_t>(q.b_scale_ld) * 4, BN, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
  if (err != cudaSuccess) return err;

  Params p{};
  p.b_scale = q.b_scale;
  p.out = q.out;
  p.M = q.M;
  p.N = q.N;
  p.K = q.K;
  p.num_m_blocks = (q.M + BM - 1) / BM;
  p.num_n_blocks = (q.N + BN - 1) / BN;
  p.group_m_blocks = kGroupRows / BM;
  p.out_fp32 = q.out_fp32;
  p.accumulate = q.accumulate;
  const uintptr_t out_addr = reinterpret_cast<uintptr_t>(q.out);
  p.paired_stores = q.N % 2 == 0 && out_addr % (q.out_fp32 ? 8 : 4) == 0;

  auto kernel = fp8_gemm_kernel<BM, BN, kScaleBPerRow>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int num_tiles = p.num_m_blocks * p.num_n_blocks;
  const int grid = std::max(1, std::min(q.num_sms, num_tiles));
  kernel<<<grid, T::kThreads, T::kSmemBytes, q.stream>>>(tmap_a, tmap_b, tmap_a_scale, tmap_b_scale, p);
  return cudaGetLastError();
}

// The compiled tile shapes. 1D2D (the hot path): narrow 64-row tiles spread small-M problems over all
// SMs; 128 x 128 is the large-M workhorse; 128 x 144 fits N = 576 (4 x 144) into one wave at M = 4096.
// (128 x 112 and 128 x 160 were measured slower than 128 x 128 on every DeepSeek-V3 shape: BN > 128
// cannot hold two partial fragments, and a straddling b_scale costs selects.) 1D1D (weight gradients,
// M and N both large) gets two.
struct ConfigEntry {
  int block_m, block_n;
  ScaleGranularity gran;
  cudaError_t (*launch)(const Problem&);
};

constexpr ConfigEntry kConfigs[] = {
    {64, 16, ScaleGranularity::k1D2D, launch<64, 16, false>},
    {64, 32, ScaleGranularity::k1D2D, launch<64, 32, false>},
    {64, 64, ScaleGranularity::k1D2D, launch<64, 64, false>},
    {64, 128, ScaleGranularity::k1D2D, launch<64, 128, false>},
    {128, 64, ScaleGranularity::k1D2D, launch<128, 64, false>},
    {128, 128, ScaleGranularity::k1D2D, launch<128, 128, false>},
    {128, 144, ScaleGranularity::k1D2D, launch<128, 144, false>},
    {64, 128, ScaleGranularity::k1D1D, launch<64, 128, true>},
    {128, 128, ScaleGranularity::k1D1D, launch<128, 128, true>},
};

const ConfigEntry* find_config(Fp8GemmConfig c, ScaleGranularity gran) {
  for (const ConfigEntry& e : kConfigs)
    if (e.block_m == c.block_m && e.block_n == c.block_n && e.gran == gran) return &e;
  return nullptr;
}

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

Fp8GemmConfig fp8_gemm_pick_config(int M, int N, int K, ScaleGranularity b_gran, int num_sms) {
  (void)K;  // every tile walks all of K: K scales all candidates alike
  Fp8GemmConfig best{0, 0};
  double best_cost = 0.0;
  for (const ConfigEntry& e : kConfigs) {
    if (e.gran != b_gran) continue;
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
  const Problem q{a, a_scale, a_scale_ld, b, b_scale, b_scale_ld, out, out_fp32, accumulate, M, N, K, num_sms, stream};
  return entry->launch(q);
}

}  // namespace dskernels
