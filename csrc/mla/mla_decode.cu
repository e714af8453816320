// MLA absorbed decode for Hopper: split pass (wgmma + TMA) and combine pass. API and layouts:
// mla_decode.h; design, budgets and open questions: NOTES.md beside this file.
//
// Split pass, one CTA per (work item, 64 query rows), 3 warpgroups:
//   - WG 2 (producer, 40 registers): one thread loads the 64 x 576 Q tile once (nine 64 x 64 TMA boxes,
//     128-byte swizzle) and then streams the item's 64-token cache blocks (nine boxes each, pages found
//     through the block table; a 3-D tensor map with the page index as the outer coordinate) into a
//     2-stage ring guarded by full/empty mbarriers.
//   - WG 0 and WG 1 (math, 232 registers). Per block: WG w computes S_w = Q K[32w .. 32w+31]^T
//     (36 x wgmma m64n32k16, both operands K-major from smem), the two halves exchange row maxima through
//     smem, each turns its half into P (bf16) in a shared 64 x 64 swizzled smem tile, and then WG w adds
//     P V[:, 256w .. 256w+255] into its 64 x 256 fp32 output (4 x wgmma m64n256k16, A = P from smem,
//     B = V read MN-major from the same cache tile: "transposed B").
//   - Pipelining inside each math WG: S of block n+1 is issued before P V of block n, so the softmax of
//     block n+1 runs on CUDA cores while the tensor cores do P V of block n.

#include "mla_decode.h"

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "../hopper.cuh"

namespace dskernels {
namespace mla_detail {

// Kernel arguments besides the tensor maps (named namespace: see fp8_gemm.cu).
struct SplitParams {
  const int* block_table;
  const int* cache_seqlens;
  const int* items;
  float* o_partial;
  float* lse_partial;
  int bt_stride;
  int rows;           // s_q * H
  int num_m_blocks;   // ceil(rows / 64)
  int H, s_q;
  float scale_log2;   // softmax_scale * log2(e)
  bool causal;
};

// Geometry and barrier ids (inline: device-only ones would draw unused-variable warnings in the
// compute_80 pass with internal linkage).
inline constexpr int kThreads = 384;               // 2 math warpgroups + 1 producer warpgroup
inline constexpr int kMathThreads = 256;
inline constexpr int kProducerRegs = 24;
inline constexpr int kMathRegs = 240;
inline constexpr int kChunkDims = 64;              // one 128-byte swizzle row of bf16
inline constexpr int kNumChunks = kMlaDimQK / kChunkDims;  // 9 (8 of V + 1 RoPE)
inline constexpr int kChunkBytes = 64 * 128;        // 64 rows (query rows or tokens) x 128 bytes
inline constexpr int kTileBytes = kNumChunks * kChunkBytes;  // 73 728: one 64 x 576 bf16 tile
inline constexpr int kStages = 2;
inline constexpr int kMaxDynamicSmem = 232448;

// Shared-memory layout (offsets from the 1024-aligned base).
inline constexpr int kQOffset = 0;
inline constexpr int kKVOffset = kQOffset + kTileBytes;
inline constexpr int kPOffset = kKVOffset + kStages * kTileBytes;   // 64 x 64 bf16 P, swizzled like a chunk
inline constexpr int kMaxOffset = kPOffset + kChunkBytes;           // float [2 buffers][2 WGs][64 rows]
inline constexpr int kSumOffset = kMaxOffset + 2 * 2 * 64 * 4;      // float [2 WGs][64 rows]
inline constexpr int kBarOffset = kSumOffset + 2 * 64 * 4;          // full[kStages], empty[kStages], q
inline constexpr int kSmemBytes = kBarOffset + (2 * kStages + 1) * 8 + 1024;  // +1024: re-alignment slack
static_assert(kSmemBytes <= kMaxDynamicSmem, "shared memory");
static_assert(kTileBytes < (1 << 20), "mbarrier transaction count range");
static_assert(128 * (kProducerRegs + 2 * kMathRegs) <= 65536, "register file after setmaxnreg");

// Named barriers of the two math warpgroups (256 threads); 0 is __syncthreads.
inline constexpr uint32_t kBarMax = 1;    // row maxima of both halves of S are in smem
inline constexpr uint32_t kBarPFull = 2;  // both halves of P are in smem
inline constexpr uint32_t kBarPFree = 3;  // both warpgroups' P V wgmma that read the P tile have completed
inline constexpr uint32_t kBarZero = 4;   // the tail of a partial cache block is zeroed

}  // namespace mla_detail

namespace {

using namespace mla_detail;

__global__ void __launch_bounds__(kThreads, 1)
    mla_split_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv,
                     const SplitParams p) {
#if DSK_HOPPER_DEVICE
  using namespace hopper;

  const int item = blockIdx.x / p.num_m_blocks;
  const int m_block = blockIdx.x % p.num_m_blocks;
  const int b = p.items[3 * item];
  if (b < 0) return;  // unused slot: whole CTA leaves before any barrier exists
  const int seqlen = p.cache_seqlens[b];
  const int seq_blocks = (max(seqlen, 0) + kMlaPageSize - 1) / kMlaPageSize;
  const int blk_begin = p.items[3 * item + 1];
  const int blk_end = min(p.items[3 * item + 2], seq_blocks);
  const int num_blocks = max(0, blk_end - blk_begin);

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint8_t* s_q = smem + kQOffset;
  uint8_t* s_kv = smem + kKVOffset;
  uint8_t* s_p = smem + kPOffset;
  float* s_max = reinterpret_cast<float*>(smem + kMaxOffset);
  float* s_sum = reinterpret_cast<float*>(smem + kSumOffset);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarOffset);
  uint64_t* empty = full + kStages;
  uint64_t* q_bar = empty + kStages;

  const int warpgroup = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);   // the producer's arrive.expect_tx
      mbarrier_init(&empty[s], 8);  // one arrival per math warp
    }
    mbarrier_init(q_bar, 1);
    fence_mbarrier_init();
    fence_proxy_async_smem();
  }
  __syncthreads();

  if (warpgroup == 2) {
    // ---------------- producer ----------------
    setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == 256 && num_blocks > 0) {
      tma_prefetch_descriptor(&tmap_q);
      tma_prefetch_descriptor(&tmap_kv);
      mbarrier_arrive_expect_tx(q_bar, kTileBytes);
      for (int c = 0; c < kNumChunks; ++c)
        tma_load_3d(s_q + c * kChunkBytes, &tmap_q, q_bar, c * kChunkDims, m_block * kMlaRowsPerCta, b);
      const int* bt = p.block_table + static_cast<size_t>(b) * p.bt_stride + blk_begin;
      int s = 0;
      uint32_t phase = 0;
      for (int n = 0; n < num_blocks; ++n) {
        const int page = __ldg(bt + n);
        mbarrier_wait(&empty[s], phase ^ 1);
        mbarrier_arrive_expect_tx(&full[s], kTileBytes);
        uint8_t* dst = s_kv + s * kTileBytes;
        for (int c = 0; c < kNumChunks; ++c)
          tma_load_3d(dst + c * kChunkBytes, &tmap_kv, &full[s], c * kChunkDims, 0, page);
        if (++s == kStages) { s = 0; phase ^= 1; }
      }
    }
  } else {
    // ---------------- math warpgroups ----------------
    setmaxnreg_inc<kMathRegs>();
    const int wg = warpgroup;                      // S token half and O dim half of this warpgroup
    const int tid = threadIdx.x;                   // 0 .. 255
    const int warp = (tid / 32) % 4, lane = tid % 32;
    const int r_lo = warp * 16 + lane / 4;         // tile row of fragment entries 4j + 0/1; +8 for 4j + 2/3
    const int quad_col = 2 * (lane % 4);           // fragment column of entry 4j + 0, minus 8j

    // Visible tokens are t < lim[h] for the rows r_lo + 8h. Padded rows (>= rows) see the whole
    // sequence: they read zero Q (TMA out-of-bounds fill) and are never stored.
    int lim[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m_block * kMlaRowsPerCta + r_lo + 8 * h;
      lim[h] = (p.causal && r < p.rows) ? seqlen - p.s_q + r / p.H + 1 : seqlen;
    }

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY};  // running max of scaled scores (log2 units)
    float row_sum[2] = {0.0f, 0.0f};           // this thread's partial sum of P over its columns
    float s[16];                                // S fragment: 64 rows x 32 tokens of this warpgroup
    uint32_t pk[8];                             // P as bf16 pairs: pk[2j + h] = columns 8j + quad_col + 0/1
    float alpha[2];

    // K-major descriptors: Q chunk c at +c*8192 bytes, K rows of this warpgroup's token half at +32*128.
    const uint64_t desc_q = smem_desc_sw128(s_q, 0, 1024);
    const uint64_t desc_p = smem_desc_sw128(s_p, 0, 1024);

    // Zeroes tokens >= seqlen of block n (stage st) so that 0-weighted garbage (NaN) cannot reach O.
    auto zero_tail = [&](int n, int st) {
      const int valid = seqlen - (blk_begin + n) * kMlaPageSize;
      if (valid < kMlaPageSize) {  // uniform across both math warpgroups
        const int bad_rows = kMlaPageSize - valid;
        const int per_chunk = bad_rows * 8;  // 16-byte pieces per chunk
        uint8_t* base = s_kv + st * kTileBytes;
        for (int idx = tid; idx < kNumChunks * per_chunk; idx += kMathThreads) {
          const int c = idx / per_chunk, rem = idx % per_chunk;
          *reinterpret_cast<uint4*>(base + c * kChunkBytes + (valid + rem / 8) * 128 + (rem % 8) * 16) =
              make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async_smem();
        named_barrier_sync(kBarZero, kMathThreads);
      }
    };

    // S = Q K_half^T for the block in stage st: 9 chunks x 4 k-steps of 16 (32 bytes: +2 in the descriptor).
    auto issue_s = [&](int st) {
      const uint64_t desc_k = smem_desc_sw128(s_kv + st * kTileBytes + wg * 32 * 128, 0, 1024);
      wgmma_fence();
#pragma unroll
      for (int c = 0; c < kNumChunks; ++c) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const uint64_t off = static_cast<uint64_t>(c * (kChunkBytes >> 4) + 2 * k);
          wgmma_m64k16_bf16_kk<32>(s, desc_q + off, desc_k + off, (c | k) != 0);
        }
      }
      wgmma_commit_group();
    };

    // O_half += P V_half for the block in stage st. V chunk 4*wg + d (64 dims) is an MN-major 64-token
    // x 64-dim atom column: LBO 8192 (next 64 dims = next chunk), SBO 1024 (next 8 tokens); k-step of
    // 16 tokens = 2048 bytes (+128). P (A operand) steps 16 tokens = 32 bytes (+2).
    auto issue_pv = [&](int st) {
      const uint64_t desc_v = smem_desc_sw128(s_kv + st * kTileBytes + wg * 4 * kChunkBytes, kChunkBytes, 1024);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k) wgmma_m64k16_bf16_kmn<256>(o, desc_p + 2 * k, desc_v + 128 * k, 1);
      wgmma_commit_group();
    };

    // Online softmax of block n's S (after its wgmma completed): masks, exchanges row maxima with the
    // other warpgroup, computes alpha (rescale of older blocks), P (packed bf16) and the row sums.
    auto softmax = [&](int n) {
      const int tok0 = (blk_begin + n) * kMlaPageSize + wg * 32 + quad_col;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            float& v = s[4 * j + 2 * h + c];
            v = (tok0 + 8 * j + c < lim[h]) ? v : -INFINITY;
            mx[h] = fmaxf(mx[h], v);
          }
        }
      }
      float* red = s_max + (n & 1) * 128;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        if (lane % 4 == 0) red[wg * 64 + r_lo + 8 * h] = mx[h];
      }
      named_barrier_sync(kBarMax, kMathThreads);
      float m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = r_lo + 8 * h;
        const float block_max = fmaxf(red[r], red[64 + r]) * p.scale_log2;  // -inf stays -inf
        const float m_new = fmaxf(row_max[h], block_max);
        m_use[h] = (m_new == -INFINITY) ? 0.0f : m_new;  // a row with nothing visible yet: no NaN
        alpha[h] = ex2_approx(row_max[h] - m_use[h]);    // -inf - x -> 0
        row_max[h] = m_new;
        row_sum[h] *= alpha[h];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float p0 = ex2_approx(fmaf(s[4 * j + 2 * h], p.scale_log2, -m_use[h]));
          const float p1 = ex2_approx(fmaf(s[4 * j + 2 * h + 1], p.scale_log2, -m_use[h]));
          row_sum[h] += p0 + p1;
          const __nv_bfloat162 pair = __floats2bfloat162_rn(p0, p1);
          pk[2 * j + h] = *reinterpret_cast<const uint32_t*>(&pair);
        }
      }
    };

    // Writes this warpgroup's 32 columns of P into the swizzled 64 x 64 tile (conflict-free: the 8 rows
    // of a warp's store land in 8 different 16-byte chunks).
    auto store_p = [&]() {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = r_lo + 8 * h;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int chunk = (4 * wg + j) ^ (r & 7);
          *reinterpret_cast<uint32_t*>(s_p + r * 128 + chunk * 16 + 4 * (lane % 4)) = pk[2 * j + h];
        }
      }
      fence_proxy_async_smem();  // generic-proxy stores -> visible to the wgmma (async proxy)
    };

    auto release = [&](int st) {
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&empty[st]);
    };

    if (num_blocks > 0) {
      mbarrier_wait(q_bar, 0);
      int st = 0;
      uint32_t phase = 0;
      // Block 0: S, softmax, P.
      mbarrier_wait(&full[st], phase);
      zero_tail(0, st);
      issue_s(st);
      wgmma_wait_group<0>();
      fence_registers(s);
      softmax(0);
      store_p();
      named_barrier_sync(kBarPFull, kMathThreads);

      // Steady state: block n's P V overlaps block n+1's softmax. No data-dependent wgmma waits inside.
      for (int n = 0; n + 1 < num_blocks; ++n) {
        const int next = st + 1 == kStages ? 0 : st + 1;
        const uint32_t next_phase = next == 0 ? phase ^ 1 : phase;
        mbarrier_wait(&full[next], next_phase);
        zero_tail(n + 1, next);
        issue_s(next);
        issue_pv(st);
        wgmma_wait_group<1>();  // S(n+1) done; P V(n) may still run
        fence_registers(s);
        softmax(n + 1);
        wgmma_wait_group<0>();  // P V(n) done: the stage and the P tile are free on this side
        fence_registers(o);
        release(st);
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          o[4 * j + 0] *= alpha[0];
          o[4 * j + 1] *= alpha[0];
          o[4 * j + 2] *= alpha[1];
          o[4 * j + 3] *= alpha[1];
        }
        named_barrier_sync(kBarPFree, kMathThreads);
        store_p();
        named_barrier_sync(kBarPFull, kMathThreads);
        st = next;
        phase = next_phase;
      }
      issue_pv(st);
      wgmma_wait_group<0>();
      fence_registers(o);
      release(st);
    }

    // ---------------- epilogue ----------------
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
      if (lane % 4 == 0) s_sum[wg * 64 + r_lo + 8 * h] = row_sum[h];
    }
    named_barrier_sync(kBarMax, kMathThreads);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_lo + 8 * h;
      const int row = m_block * kMlaRowsPerCta + r;
      const float total = s_sum[r] + s_sum[64 + r];
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;
      if (row < p.rows) {
        const size_t out_row = static_cast<size_t>(item) * p.rows + row;
        float* dst = p.o_partial + out_row * kMlaDimV + wg * 256 + quad_col;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
        if (wg == 0 && lane % 4 == 0)
          p.lse_partial[out_row] = total > 0.0f ? (row_max[h] + log2f(total)) * 0.69314718055994531f : -INFINITY;
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a target without wgmma/TMA; the host launcher refuses such devices
#endif
}

// One warp per (batch, row): merges the batch's items. Lane l owns dims 4(l + 32k) .. +3, k = 0..3.
__global__ void __launch_bounds__(128)
    mla_combine_kernel(const float* __restrict__ o_partial, const float* __restrict__ lse_partial,
                       const int* __restrict__ item_offsets, int B, int rows, int H, int s_q,
                       __nv_bfloat16* __restrict__ out, float* __restrict__ lse) {
  const int task = blockIdx.x * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (task >= B * rows) return;
  const int b = task / rows, row = task % rows;
  const int i0 = item_offsets[b], i1 = item_offsets[b + 1];

  float m = -INFINITY;
  for (int it = i0 + lane; it < i1; it += 32) m = fmaxf(m, lse_partial[static_cast<size_t>(it) * rows + row]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));

  float4 acc[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  float sum = 0.0f;
  if (m != -INFINITY) {
    for (int it = i0 + lane; it < i1; it += 32) sum += expf(lse_partial[static_cast<size_t>(it) * rows + row] - m);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float inv = 1.0f / sum;  // sum >= 1: the maximal item contributes exp(0)
    for (int it = i0; it < i1; ++it) {
      const size_t prow = static_cast<size_t>(it) * rows + row;
      const float l = lse_partial[prow];
      if (l == -INFINITY) continue;  // uniform across the warp
      const float w = expf(l - m) * inv;
      const float4* src = reinterpret_cast<const float4*>(o_partial + prow * kMlaDimV);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float4 v = __ldg(src + lane + 32 * k);
        acc[k].x = fmaf(w, v.x, acc[k].x);
        acc[k].y = fmaf(w, v.y, acc[k].y);
        acc[k].z = fmaf(w, v.z, acc[k].z);
        acc[k].w = fmaf(w, v.w, acc[k].w);
      }
    }
  }
  __nv_bfloat16* dst = out + (static_cast<size_t>(b) * rows + row) * kMlaDimV;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(acc[k].x, acc[k].y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(acc[k].z, acc[k].w);
    uint2 packed;
    packed.x = *reinterpret_cast<const uint32_t*>(&lo);
    packed.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(dst + 4 * (lane + 32 * k)) = packed;
  }
  if (lane == 0) {
    const int i = row / H, h = row % H;
    lse[(static_cast<size_t>(b) * H + h) * s_q + i] = m == -INFINITY ? -INFINITY : m + logf(sum);
  }
}

bool is_aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace

cudaError_t mla_decode_split(const void* q, const void* cache, int num_pages, int64_t page_stride,
                             const int* block_table, int bt_stride, const int* cache_seqlens, const int* items,
                             int max_items, int B, int s_q, int H, float softmax_scale, bool causal,
                             float* o_partial, float* lse_partial, cudaStream_t stream) {
  using namespace hopper;
  if (B < 1 || s_q < 1 || H < 1 || max_items < 1 || num_pages < 1 || bt_stride < 1) return cudaErrorInvalidValue;
  if (page_stride < int64_t(kMlaPageSize) * kMlaDimQK || page_stride % 8 != 0) return cudaErrorInvalidValue;
  if (!(softmax_scale > 0.0f) || !std::isfinite(softmax_scale)) return cudaErrorInvalidValue;
  if (q == nullptr || cache == nullptr || block_table == nullptr || cache_seqlens == nullptr || items == nullptr ||
      o_partial == nullptr || lse_partial == nullptr)
    return cudaErrorInvalidValue;
  if (!is_aligned(q, 16) || !is_aligned(cache, 16) || !is_aligned(o_partial, 16) || !is_aligned(lse_partial, 4))
    return cudaErrorInvalidValue;
  const int64_t rows = int64_t(s_q) * H;
  const int64_t num_m_blocks = (rows + kMlaRowsPerCta - 1) / kMlaRowsPerCta;
  if (rows > (int64_t(1) << 30) || num_m_blocks * max_items > int64_t(0x7FFFFFFF)) return cudaErrorInvalidValue;

  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major != 9) return cudaErrorNotSupported;

  // Q as [B][rows][576]: rows past s_q * H of a batch read as zeros (the box is always 64 rows).
  CUtensorMap tmap_q{}, tmap_kv{};
  err = make_tensor_map_3d(&tmap_q, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, q,
                           {uint64_t(kMlaDimQK), uint64_t(rows), uint64_t(B)},
                           {uint64_t(kMlaDimQK) * 2, uint64_t(rows) * kMlaDimQK * 2},
                           {uint32_t(kChunkDims), uint32_t(kMlaRowsPerCta), 1u}, CU_TENSOR_MAP_SWIZZLE_128B);
  if (err != cudaSuccess) return err;
  // Cache as [num_pages][64][576] with the page stride: one box = 64 dims of one whole page.
  err = make_tensor_map_3d(&tmap_kv, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, cache,
                           {uint64_t(kMlaDimQK), uint64_t(kMlaPageSize), uint64_t(num_pages)},
                           {uint64_t(kMlaDimQK) * 2, uint64_t(page_stride) * 2},
                           {uint32_t(kChunkDims), uint32_t(kMlaPageSize), 1u}, CU_TENSOR_MAP_SWIZZLE_128B);
  if (err != cudaSuccess) return err;

  SplitParams p{};
  p.block_table = block_table;
  p.cache_seqlens = cache_seqlens;
  p.items = items;
  p.o_partial = o_partial;
  p.lse_partial = lse_partial;
  p.bt_stride = bt_stride;
  p.rows = int(rows);
  p.num_m_blocks = int(num_m_blocks);
  p.H = H;
  p.s_q = s_q;
  p.scale_log2 = softmax_scale * 1.4426950408889634f;
  p.causal = causal;

  err = cudaFuncSetAttribute(mla_split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  // m-blocks of one item are adjacent in launch order: they read the same cache blocks close in time (L2).
  const unsigned grid = unsigned(num_m_blocks * max_items);
  mla_split_kernel<<<grid, kThreads, kSmemBytes, stream>>>(tmap_q, tmap_kv, p);
  return cudaGetLastError();
}

cudaError_t mla_decode_combine(const float* o_partial, const float* lse_partial, const int* item_offsets, int B,
                               int s_q, int H, void* out, float* lse, cudaStream_t stream) {
  if (B < 1 || s_q < 1 || H < 1) return cudaErrorInvalidValue;
  if (o_partial == nullptr || lse_partial == nullptr || item_offsets == nullptr || out == nullptr || lse == nullptr)
    return cudaErrorInvalidValue;
  if (!is_aligned(o_partial, 16) || !is_aligned(out, 8) || !is_aligned(lse_partial, 4) || !is_aligned(lse, 4))
    return cudaErrorInvalidValue;
  const int64_t tasks = int64_t(B) * s_q * H;
  if (tasks > int64_t(0x7FFFFFFF)) return cudaErrorInvalidValue;
  const unsigned grid = unsigned((tasks + 3) / 4);
  mla_combine_kernel<<<grid, 128, 0, stream>>>(o_partial, lse_partial, item_offsets, B, s_q * H, H, s_q,
                                               static_cast<__nv_bfloat16*>(out), lse);
  return cudaGetLastError();
}

}  // namespace dskernels
