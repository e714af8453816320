// MLA absorbed decode for Hopper: split pass (wgmma + TMA) and combine pass. API and layouts:
// mla_decode.h; design, budgets and measurements: NOTES.md beside this file.
//
// Split pass, one CTA per (work item, 64 query rows), 3 warpgroups:
//   - WG 2 (producer, 24 registers): one thread loads the 64 x 576 Q tile once (nine 64 x 64 TMA boxes,
//     128-byte swizzle); two threads stream the item's 64-token cache blocks (nine boxes each, pages found
//     through the block table; a 3-D tensor map with the page index as the outer coordinate) into two
//     buffers, even blocks into buffer 0 and odd blocks into buffer 1, each filled and released in two
//     groups with their own full/empty mbarriers.
//   - WG 0 and WG 1 (math, 240 registers) "seesaw": WG w computes S = Q K^T of the blocks of parity w as a
//     full 64 x 64 tile and owns O columns 256w .. 256w+255. The running max is chained between them, so
//     while one runs softmax on CUDA cores the other's wgmma keep the tensor cores busy (the FlashMLA
//     design). V is read MN-major from the same cache tile ("transposed B"): the cache is read once for
//     both GEMMs.
//   - Epilogue: a batch whose only item this is gets its bf16 out tile (staged in the Q buffer, stored with
//     TMA) and lse here; the items of split batches write fp32 partials for the combine pass.

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
  const int* item_offsets;
  const int* bad;              // may be null
  const int* made_seqlens;     // what the work list was made from; both null: no match check
  const int* made_table_hash;
  int* error;                  // [2]; null when made_* are
  float* o_partial;
  float* lse_partial;
  float* lse;
  int bt_stride;
  int max_pages;      // block-table columns: blocks at or past it are never read
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
inline constexpr int kMaxDynamicSmem = 232448;

// Shared-memory layout (offsets from the 1024-aligned base). The two cache buffers hold blocks of
// opposite parity; the P tile one math warpgroup hands to the other lives in the chunk-8 (RoPE) slot of
// its buffer once S no longer needs it.
inline constexpr int kQOffset = 0;
inline constexpr int kKVOffset = kQOffset + kTileBytes;              // buffer 0 (even blocks), buffer 1 (odd)
inline constexpr int kStatOffset = kKVOffset + 2 * kTileBytes;       // float [6][64], see kStat*
inline constexpr int kHashOffset = kStatOffset + 6 * 64 * 4;         // uint32 [8]: block-table fingerprint
                                                                     // partials of the 8 math warps
inline constexpr int kBarOffset = kHashOffset + 8 * 4;               // full[4], empty[4], q
inline constexpr int kSmemBytes = kBarOffset + 9 * 8 + 1024;         // +1024: re-alignment slack
static_assert(kSmemBytes <= kMaxDynamicSmem, "shared memory");
static_assert(kTileBytes < (1 << 20), "mbarrier transaction count range");
static_assert(128 * (kProducerRegs + 2 * kMathRegs) <= 65536, "register file after setmaxnreg");
inline constexpr int kStatMaxA = 0, kStatScaleA = 1, kStatMaxB = 2, kStatScaleB = 3, kStatSum = 4;  // Sum: 2 rows

// Named barriers (ids 1..7; 0 is __syncthreads). One-way hand-offs: the writer warpgroup bar.arrive's,
// the reader bar.sync's, 256 threads in all. A writer cannot signal an id twice before the reader has
// waited once: each next signal is causally after the reader's wait (through the other hand-offs or the
// buffer refills).
inline constexpr uint32_t kBarMaxA = 1;    // WG 0 -> 1: running max and rescale after the even block
inline constexpr uint32_t kBarMaxB = 2;    // WG 1 -> 0: running max and rescale after the odd block
inline constexpr uint32_t kBarPA = 3;      // WG 0 -> 1: P of the even block in buffer 0's chunk-8 slot
inline constexpr uint32_t kBarPB = 4;      // WG 1 -> 0: P of the odd block in buffer 1's chunk-8 slot
inline constexpr uint32_t kBarZero = 5;    // + warpgroup (5, 6): one warpgroup's 128 threads (tail zeroing,
                                           // the staged out tile)
inline constexpr uint32_t kBarSum = 7;     // epilogue row sums of both warpgroups

}  // namespace mla_detail

namespace {

using namespace mla_detail;

// Math warpgroup w owns the blocks of parity w (buffer w) and O columns 256w .. 256w+255:
//   - S of its own block is a full 64 x 64 tile (wgmma N = 64: the Q operand is read once per block);
//   - the running max is chained: WG 0 updates it with its block, then WG 1 with its block, so each
//     needs only the other's published value (no per-block exchange of both halves);
//   - P of its own block feeds its own P V from registers; a copy (rescaled to the newest max) goes to
//     the other warpgroup through the P slot of the buffer;
//   - while one warpgroup runs softmax on CUDA cores, the other's wgmma keep the tensor cores busy.
// Each buffer is filled and released in two groups (the owner's V half first, then the other half plus
// the RoPE chunk), so the next block's loads start as soon as each half's last P V completes.
__global__ void __launch_bounds__(kThreads, 1)
    mla_split_kernel(const __grid_constant__ CUtensorMap tmap_q, const __grid_constant__ CUtensorMap tmap_kv,
                     const __grid_constant__ CUtensorMap tmap_out, const SplitParams p) {
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
  float* s_stat = reinterpret_cast<float*>(smem + kStatOffset);
  // full[2 * buf + g] / empty[2 * buf + g]: group 0 = chunks 4buf .. 4buf+3 (the owner's V half),
  // group 1 = chunks 4(1-buf) .. +3 and chunk 8 (the other V half, the RoPE part, later the P tile).
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarOffset);
  uint64_t* empty = full + 4;
  uint64_t* q_bar = empty + 4;

  const int warpgroup = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    for (int i = 0; i < 4; ++i) {
      mbarrier_init(&full[i], 1);   // the producer's arrive.expect_tx
      mbarrier_init(&empty[i], 4);  // one arrival per warp of the releasing warpgroup
    }
    mbarrier_init(q_bar, 1);
    fence_mbarrier_init();
    fence_proxy_async_smem();
  }
  __syncthreads();

  if (warpgroup == 2) {
    // ---------------- producer: warp 8 lane 0 fills buffer 0 (and Q), warp 9 lane 0 buffer 1 ----------------
    setmaxnreg_dec<kProducerRegs>();
    const int buf = (threadIdx.x - 256) / 32;
    if (threadIdx.x % 32 == 0 && buf < 2 && num_blocks > buf) {
      tma_prefetch_descriptor(&tmap_kv);
      if (buf == 0) {
        tma_prefetch_descriptor(&tmap_q);
        mbarrier_arrive_expect_tx(q_bar, kTileBytes);
        for (int c = 0; c < kNumChunks; ++c)
          tma_load_3d(s_q + c * kChunkBytes, &tmap_q, q_bar, c * kChunkDims, m_block * kMlaRowsPerCta, b);
      }
      const int* bt = p.block_table + static_cast<size_t>(b) * p.bt_stride + blk_begin;
      uint8_t* dst = s_kv + buf * kTileBytes;
      // At the start every CTA of the wave loads at once and DRAM is the bottleneck: block 1 waits until Q
      // and block 0 have landed, so the first S (which needs only those) starts a third earlier.
      if (buf == 1) mbarrier_wait(&full[1], 0);
      for (int n = buf, j = 0; n < num_blocks; n += 2, ++j) {
        const int page = __ldg(bt + n);
        const uint32_t phase = j & 1;
        mbarrier_wait(&empty[2 * buf], phase ^ 1);
        mbarrier_arrive_expect_tx(&full[2 * buf], 4 * kChunkBytes);
        for (int i = 0; i < 4; ++i) {
          const int c = 4 * buf + i;
          tma_load_3d(dst + c * kChunkBytes, &tmap_kv, &full[2 * buf], c * kChunkDims, 0, page);
        }
        mbarrier_wait(&empty[2 * buf + 1], phase ^ 1);
        mbarrier_arrive_expect_tx(&full[2 * buf + 1], 5 * kChunkBytes);
        for (int i = 0; i < 5; ++i) {
          const int c = i < 4 ? 4 * (1 - buf) + i : 8;
          tma_load_3d(dst + c * kChunkBytes, &tmap_kv, &full[2 * buf + 1], c * kChunkDims, 0, page);
        }
      }
    }
  } else {
    // ---------------- math warpgroups ----------------
    setmaxnreg_inc<kMathRegs>();
    // Broadcast so the compiler knows wg is warp-uniform: descriptors and branches on it then stay in
    // uniform registers instead of being recomputed per thread for every wgmma.
    const int wg = __shfl_sync(0xffffffffu, warpgroup, 0);  // owns buffer wg (blocks of parity wg), O dims 256wg ..
    const int wtid = threadIdx.x % 128;
    const int warp = wtid / 32, lane = wtid % 32;
    const int r_lo = warp * 16 + lane / 4;         // tile row of fragment entries 4j + 0/1; +8 for 4j + 2/3
    uint32_t* s_hash = reinterpret_cast<uint32_t*>(smem + kHashOffset);

    // The batch's block-table fingerprint (mla_table_hash_term summed over its blocks), to compare with the
    // work list's record in the epilogue: 256 threads, a few loads each, before the first S is ready.
    if (p.made_table_hash != nullptr) {
      const int* row = p.block_table + static_cast<size_t>(b) * p.bt_stride;
      uint32_t h = 0;
      for (int k = wg * 128 + wtid; k < min(seq_blocks, p.max_pages); k += kMathThreads)
        h += mla_table_hash_term(__ldg(row + k), k);
#pragma unroll
      for (int off = 16; off > 0; off /= 2) h += __shfl_xor_sync(0xffffffffu, h, off);
      if (lane == 0) s_hash[4 * wg + warp] = h;
    }
    const int quad_col = 2 * (lane % 4);           // fragment column of entry 4j + 0, minus 8j

    // Visible tokens are t < lim[h] for the rows r_lo + 8h (padded rows see the whole sequence).
    int lim[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m_block * kMlaRowsPerCta + r_lo + 8 * h;
      lim[h] = (p.causal && r < p.rows) ? seqlen - p.s_q + r / p.H + 1 : seqlen;
    }
    const int lim_min = min(lim[0], lim[1]);

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.0f;
    float row_max[2] = {-INFINITY, -INFINITY};  // running max of scaled scores (log2 units), shared value
    float row_sum[2] = {0.0f, 0.0f};           // thread-partial sum of this warpgroup's own P, same scale as o
    float s[32];                                // S / P of the own block: 64 rows x 64 tokens (the
                                                // first wgmma of each S has scale-d 0: no initial value)
    uint32_t pk[16];                            // P as bf16 pairs: pk[2j + h] = (s[4j + 2h], s[4j + 2h + 1])
#pragma unroll
    for (int i = 0; i < 16; ++i) pk[i] = 0u;  // read (as fence operands) before the first write

    float* s_max_a = s_stat + kStatMaxA * 64;
    float* s_scale_a = s_stat + kStatScaleA * 64;
    float* s_max_b = s_stat + kStatMaxB * 64;
    float* s_scale_b = s_stat + kStatScaleB * 64;
    float* s_sum = s_stat + kStatSum * 64;

    const uint64_t desc_q = smem_desc_sw128(s_q, 0, 1024);
    uint8_t* own_buf = s_kv + wg * kTileBytes;
    uint8_t* other_buf = s_kv + (1 - wg) * kTileBytes;

    // S = Q K^T of the own buffer's block, in two commit groups: first the owner's V half (chunks 4wg ..
    // 4wg+3, released and refilled first), then the other half and the RoPE chunk. K-major operands,
    // +512 per chunk and +2 per 16-dim k-step; each group waits for its own TMA group.
    auto issue_s_first = [&](uint32_t phase) {
      const uint64_t desc_k = smem_desc_sw128(own_buf, 0, 1024);
      mbarrier_wait(&full[2 * wg], phase);
      fence_registers(s);
      wgmma_fence();
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint64_t off = static_cast<uint64_t>((4 * wg + i) * (kChunkBytes >> 4));
#pragma unroll
        for (int k = 0; k < 4; ++k) wgmma_m64k16_bf16_kk<64>(s, desc_q + off + 2 * k, desc_k + off + 2 * k, (i | k) != 0);
      }
      wgmma_commit_group();
    };
    auto issue_s_second = [&](uint32_t phase) {
      const uint64_t desc_k = smem_desc_sw128(own_buf, 0, 1024);
      mbarrier_wait(&full[2 * wg + 1], phase);
      wgmma_fence();
#pragma unroll
      for (int i = 0; i < 5; ++i) {
        const int c = i < 4 ? 4 * (1 - wg) + i : 8;
        const uint64_t off = static_cast<uint64_t>(c * (kChunkBytes >> 4));
#pragma unroll
        for (int k = 0; k < 4; ++k) wgmma_m64k16_bf16_kk<64>(s, desc_q + off + 2 * k, desc_k + off + 2 * k, 1);
      }
      wgmma_commit_group();
    };
    auto issue_s = [&](uint32_t phase) {
      issue_s_first(phase);
      issue_s_second(phase);
    };

    // O += P V[:, own dims] for the own block, P from registers (pk). V chunk 4wg + d is an MN-major atom
    // column: LBO 8192 (next 64 dims), SBO 1024 (next 8 tokens), +128 (16 tokens) per k-step.
    auto issue_pv_own = [&]() {
      const uint64_t desc_v = smem_desc_sw128(own_buf + 4 * wg * kChunkBytes, kChunkBytes, 1024);
#pragma unroll
      for (int k = 0; k < 4; ++k)
        wgmma_m64n256k16_bf16_rs_tnspb(o, pk[4 * k], pk[4 * k + 1], pk[4 * k + 2], pk[4 * k + 3], desc_v + 128 * k, 1);
      wgmma_commit_group();
    };

    // O += P V[:, own dims] for the other block, P from the other buffer's chunk-8 slot (K-major, +2 per k-step).
    auto issue_pv_other = [&]() {
      const uint64_t desc_v = smem_desc_sw128(other_buf + 4 * wg * kChunkBytes, kChunkBytes, 1024);
      const uint64_t desc_p = smem_desc_sw128(other_buf + 8 * kChunkBytes, 0, 1024);
#pragma unroll
      for (int k = 0; k < 4; ++k) wgmma_m64k16_bf16_kmn<256>(o, desc_p + 2 * k, desc_v + 128 * k, 1);
      wgmma_commit_group();
    };

    // Masks block n's raw scores (tokens at or past the row's limit -> -inf; the cache tail may be NaN)
    // and returns their row maxima (reduced over the quad that shares a row).
    auto mask_row_max = [&](int n, float (&mx)[2]) {
      const int tok0 = (blk_begin + n) * kMlaPageSize;
      if (tok0 + kMlaPageSize > lim_min) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float& v = s[4 * j + 2 * h + c];
              v = (tok0 + quad_col + 8 * j + c < lim[h]) ? v : -INFINITY;
            }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j) mx[h] = fmaxf(mx[h], fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      }
    };

    // New running max from the old one (raw, may be -inf) and a block's raw row maxima; returns the
    // rescale factor of everything accumulated so far and the offset the block's exponentials use.
    auto update_max = [&](const float (&m_old)[2], const float (&mx)[2], float (&m_new)[2], float (&m_use)[2],
                          float (&alpha)[2]) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        m_new[h] = fmaxf(m_old[h], mx[h] * p.scale_log2);  // -inf stays -inf
        m_use[h] = (m_new[h] == -INFINITY) ? 0.0f : m_new[h];  // a row with nothing visible yet: no NaN
        alpha[h] = ex2_approx(m_old[h] - m_use[h]);             // -inf - x -> 0
      }
    };

    // Keeps the new running max and hands it and the rescale factor to the other warpgroup (one-way:
    // it bar.sync's on `bar` before reading them).
    auto publish_max = [&](const float (&m_new)[2], const float (&alpha)[2], float* s_max, float* s_scale,
                           uint32_t bar) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_max[h] = m_new[h];
        if (lane % 4 == 0) {
          s_max[r_lo + 8 * h] = m_new[h];  // racecheck FP (NOTES.md)
          s_scale[r_lo + 8 * h] = alpha[h];  // racecheck FP (NOTES.md)
        }
      }
      named_barrier_arrive(bar, kMathThreads);
    };

    // P = exp2(S * scale_log2 - m_use) in place (masked entries -> 0), packed to bf16 pairs in pk;
    // returns the thread-partial row sums of the fp32 P.
    auto exponentiate = [&](const float (&m_use)[2], float (&sum)[2]) {
      sum[0] = sum[1] = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float p0 = ex2_approx(fmaf(s[4 * j + 2 * h], p.scale_log2, -m_use[h]));
          const float p1 = ex2_approx(fmaf(s[4 * j + 2 * h + 1], p.scale_log2, -m_use[h]));
          s[4 * j + 2 * h] = p0;
          s[4 * j + 2 * h + 1] = p1;
          sum[h] += p0 + p1;
          const __nv_bfloat162 pair = __floats2bfloat162_rn(p0, p1);
          pk[2 * j + h] = *reinterpret_cast<const uint32_t*>(&pair);
        }
    };

    // This thread's 4-byte slot for fragment columns 8 * unit + quad_col, +1 of row r in a 64 x 64 bf16 tile
    // with the TMA 128-byte swizzle (16-byte unit `unit` of the row lands at unit ^ (r % 8)).
    auto swizzled_slot = [&](uint8_t* tile, int r, int unit) {
      return reinterpret_cast<uint32_t*>(tile + r * 128 + ((unit ^ (r & 7)) * 16) + 4 * (lane % 4));
    };

    // Writes P (times `scale` per row when given) into the own buffer's chunk-8 slot as a 64 x 64 bf16
    // K-major tile with the TMA 128-byte swizzle (conflict-free: a warp's 8 rows hit 8 different chunks).
    auto store_p = [&](const float* scale) {
      uint8_t* tile = own_buf + 8 * kChunkBytes;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = r_lo + 8 * h;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          uint32_t bits = pk[2 * j + h];
          if (scale != nullptr) {
            const __nv_bfloat162 pair = __floats2bfloat162_rn(s[4 * j + 2 * h] * scale[h], s[4 * j + 2 * h + 1] * scale[h]);
            bits = *reinterpret_cast<const uint32_t*>(&pair);
          }
          *swizzled_slot(tile, r, j) = bits;
        }
      }
      fence_proxy_async_smem();  // generic-proxy stores -> visible to the other warpgroup's wgmma
    };

    // O *= f per row; skipped when no row of the warp changes (the usual case once the maxima settle).
    auto rescale_o = [&](const float (&f)[2]) {
      if (__any_sync(0xffffffffu, f[0] != 1.0f || f[1] != 1.0f)) {
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          o[4 * j + 0] *= f[0];
          o[4 * j + 1] *= f[0];
          o[4 * j + 2] *= f[1];
          o[4 * j + 3] *= f[1];
        }
      }
    };

    // Zeroes tokens >= seqlen of block n in this warpgroup's V half of `buf` before its P V reads them
    // (0 * NaN = NaN inside the wgmma). Only this warpgroup reads that half from now on.
    auto zero_v_tail = [&](int n, uint8_t* buf) {
      const int valid = seqlen - (blk_begin + n) * kMlaPageSize;
      if (valid < kMlaPageSize) {  // uniform across the warpgroup
        const int per_chunk = (kMlaPageSize - valid) * 8;  // 16-byte pieces per chunk
        uint8_t* base = buf + 4 * wg * kChunkBytes;
        for (int idx = wtid; idx < 4 * per_chunk; idx += 128) {
          const int c = idx / per_chunk, rem = idx % per_chunk;
          *reinterpret_cast<uint4*>(base + c * kChunkBytes + (valid + rem / 8) * 128 + (rem % 8) * 16) =
              make_uint4(0, 0, 0, 0);
        }
        fence_proxy_async_smem();
        if (wg == 0)
          named_barrier_sync(kBarZero, 128);
        else
          named_barrier_sync(kBarZero + 1, 128);
      }
    };

    auto release = [&](uint64_t* bar) {
      __syncwarp();
      if (lane == 0) mbarrier_arrive(bar);
    };

    // wgmma.fence with the registers a P V reads pinned before it (otherwise the compiler may schedule
    // their last writes after the fence, and ptxas then serializes the wgmma).
    auto fence_for_pv = [&]() {
      fence_registers(o);
      fence_registers_b32(pk);
      wgmma_fence();
    };

    if (num_blocks > 0) {
      mbarrier_wait(q_bar, 0);
      if (wg == 0 || num_blocks > 1) issue_s(0);
      // Pair k: block a = 2k in buffer 0 (WG 0), block a + 1 in buffer 1 (WG 1) when it exists.
      for (int k = 0;; ++k) {
        const int a = 2 * k;
        const bool has_b = a + 1 < num_blocks;
        const uint32_t phase = k & 1;
        if (wg == 0) {
          wgmma_wait_group<0>();  // this block's S (and, from the second pair on, the last P V)
          fence_registers(s);
          fence_registers(o);
          float mx[2], m_new[2], m_use[2], alpha[2], sum[2];
          mask_row_max(a, mx);
          update_max(row_max, mx, m_new, m_use, alpha);
          publish_max(m_new, alpha, s_max_a, s_scale_a, kBarMaxA);
          exponentiate(m_use, sum);
#pragma unroll
          for (int h = 0; h < 2; ++h) row_sum[h] = row_sum[h] * alpha[h] + sum[h];
          rescale_o(alpha);
          zero_v_tail(a, own_buf);
          fence_for_pv();
          issue_pv_own();
          // The copy for WG 1 is rescaled to the max after the odd block (WG 1 adds it to O rescaled so).
          float alpha_b[2] = {1.0f, 1.0f};
          if (has_b) {
            named_barrier_sync(kBarMaxB, kMathThreads);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              alpha_b[h] = s_scale_b[r_lo + 8 * h];  // racecheck FP (NOTES.md)
              row_max[h] = s_max_b[r_lo + 8 * h];  // racecheck FP (NOTES.md)
            }
          }
          // The P slot's previous reader (WG 1's P V of block a - 2) completed before buffer 0 was
          // refilled for this block's S, so it is free: no hand-off needed.
          store_p(alpha_b);
          named_barrier_arrive(kBarPA, kMathThreads);
          wgmma_wait_group<0>();
          fence_registers(o);
          fence_registers_b32(pk);
          release(&empty[0]);  // buffer 0, chunks 0-3: WG 0's S and P V were their last readers
          if (has_b) {
            rescale_o(alpha_b);
#pragma unroll
            for (int h = 0; h < 2; ++h) row_sum[h] *= alpha_b[h];
            named_barrier_sync(kBarPB, kMathThreads);
            zero_v_tail(a + 1, other_buf);
            fence_for_pv();
            issue_pv_other();
            if (a + 2 < num_blocks) {
              // Queue the next S's first half (its chunks were released after this pair's first P V)
              // behind this P V, so the tensor cores go on without a gap; then free buffer 1.
              issue_s_first(phase ^ 1);
              wgmma_wait_group<1>();
              release(&empty[3]);  // buffer 1, chunks 0-3 and 8 (the P tile WG 1 wrote)
              issue_s_second(phase ^ 1);
              continue;
            }
            wgmma_wait_group<0>();
            fence_registers(o);
            release(&empty[3]);
          }
          if (a + 2 >= num_blocks) break;
          issue_s(phase ^ 1);
        } else {
          float mx[2] = {-INFINITY, -INFINITY}, m_new[2], m_use[2], alpha_b[2], sum[2];
          // Unconditional wait (a no-op without an S in flight): under `if (has_b)` ptxas sees a path
          // on which the S of WG 0's branch is still in flight here and serializes every wgmma.
          wgmma_wait_group<0>();
          fence_registers(s);
          if (has_b) mask_row_max(a + 1, mx);
          named_barrier_sync(kBarMaxA, kMathThreads);
          float m_a[2], alpha_ab[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            m_a[h] = s_max_a[r_lo + 8 * h];
            alpha_ab[h] = s_scale_a[r_lo + 8 * h];
          }
          if (has_b) {
            update_max(m_a, mx, m_new, m_use, alpha_b);
            publish_max(m_new, alpha_b, s_max_b, s_scale_b, kBarMaxB);
            exponentiate(m_use, sum);
            store_p(nullptr);  // slot free: as for WG 0's store_p
            named_barrier_arrive(kBarPB, kMathThreads);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              alpha_ab[h] *= alpha_b[h];
              row_sum[h] = row_sum[h] * alpha_ab[h] + sum[h];
            }
          } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              row_max[h] = m_a[h];
              row_sum[h] *= alpha_ab[h];
            }
          }
          rescale_o(alpha_ab);
          zero_v_tail(a, other_buf);
          if (has_b) zero_v_tail(a + 1, own_buf);
          named_barrier_sync(kBarPA, kMathThreads);
          // The even block's P V first: its completion frees buffer 0's second group, which the next S
          // of WG 0 waits for; then the odd block's from registers.
          if (has_b) {
            fence_for_pv();
            issue_pv_other();
            issue_pv_own();
            wgmma_wait_group<1>();
            release(&empty[1]);  // buffer 0, chunks 4-8 (the P tile WG 0 wrote)
            wgmma_wait_group<0>();
            fence_registers(o);
            fence_registers_b32(pk);
            release(&empty[2]);  // buffer 1, chunks 4-7
          } else {
            fence_for_pv();
            issue_pv_other();
            wgmma_wait_group<0>();
            fence_registers(o);
            release(&empty[1]);
          }
          if (a + 2 >= num_blocks) break;
          if (a + 3 < num_blocks) issue_s(phase ^ 1);
        }
      }
    }

    // ---------------- epilogue ----------------
    // Both warpgroups end with the same running max; the row sums of their own blocks add up.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
      if (lane % 4 == 0) s_sum[wg * 64 + r_lo + 8 * h] = row_sum[h];  // racecheck FP (NOTES.md)
    }
    named_barrier_sync(kBarSum, kMathThreads);
    // Inputs other than those the work list was made from: the batch's rows become NaN and the error is
    // recorded (every CTA of the batch sees the same mismatch; the atomics make the record order-free).
    bool mismatch = false;
    if (p.made_table_hash != nullptr) {
      uint32_t h = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) h += s_hash[i];
      mismatch = seqlen != p.made_seqlens[b] || h != static_cast<uint32_t>(p.made_table_hash[b]);
      if (mismatch && wg == 0 && wtid == 0) {
        atomicOr(&p.error[0], kMlaErrorMismatch);
        atomicMin(&p.error[1], b);
      }
    }
    // A batch with this item alone is finished here: out and lse directly (NaN for a batch the scheduler
    // flagged or a mismatch), and the combine pass skips it. Otherwise the item's partial result for the
    // combine, with lse NaN to mark a mismatch.
    const bool whole = p.item_offsets[b + 1] - p.item_offsets[b] == 1;
    const bool poisoned = (p.bad != nullptr && p.bad[b] != 0) || mismatch;
    float inv[2], row_lse[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r_lo + 8 * h;
      const float total = s_sum[r] + s_sum[64 + r];  // racecheck FP (NOTES.md)
      inv[h] = total > 0.0f ? 1.0f / total : 0.0f;
      row_lse[h] = total > 0.0f ? (row_max[h] + log2f(total)) * 0.69314718055994531f : -INFINITY;
    }
    if (whole) {
      // bf16 out through the Q buffer (every S has completed: both warpgroups passed kBarSum): each
      // warpgroup stages its 256 dims as four 64 x 64 chunks with the 128-byte swizzle (conflict-free, as
      // store_p) and one thread stores them with TMA, which clips the rows past s_q * H. Whole 128-byte
      // lines instead of 16-byte pieces of eight rows per store instruction.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = r_lo + 8 * h;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          const __nv_bfloat162 pair =
              poisoned ? __floats2bfloat162_rn(NAN, NAN)
                       : __floats2bfloat162_rn(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
          *reinterpret_cast<__nv_bfloat162*>(swizzled_slot(s_q + (4 * wg + j / 8) * kChunkBytes, r, j % 8)) = pair;
        }
        const int row = m_block * kMlaRowsPerCta + r;
        if (wg == 0 && lane % 4 == 0 && row < p.rows)
          p.lse[(static_cast<size_t>(b) * p.H + row % p.H) * p.s_q + row / p.H] = poisoned ? NAN : row_lse[h];
      }
      fence_proxy_async_smem();  // generic-proxy stores -> visible to the TMA store
      if (wg == 0)
        named_barrier_sync(kBarZero, 128);
      else
        named_barrier_sync(kBarZero + 1, 128);
      if (wtid == 0) {
        for (int c = 4 * wg; c < 4 * wg + 4; ++c)
          tma_store_3d(&tmap_out, s_q + c * kChunkBytes, c * kChunkDims, m_block * kMlaRowsPerCta, b);
        bulk_commit_group();
        bulk_wait_group_read<0>();  // the shared-memory source must outlive the reads
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m_block * kMlaRowsPerCta + r_lo + 8 * h;
        if (row >= p.rows) continue;
        const size_t out_row = static_cast<size_t>(item) * p.rows + row;
        float* dst = p.o_partial + out_row * kMlaDimV + wg * 256 + quad_col;
#pragma unroll
        for (int j = 0; j < 32; ++j)
          *reinterpret_cast<float2*>(dst + 8 * j) =
              make_float2(o[4 * j + 2 * h] * inv[h], o[4 * j + 2 * h + 1] * inv[h]);
        if (wg == 0 && lane % 4 == 0) p.lse_partial[out_row] = mismatch ? NAN : row_lse[h];
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for a target without wgmma/TMA; the host launcher refuses such devices
#endif
}

// One warp per (batch, row): merges the batch's items (batches of one item were finished by the split
// pass). Lane l owns dims 4(l + 32k) .. +3, k = 0..3.
__global__ void __launch_bounds__(128)
    mla_combine_kernel(const float* __restrict__ o_partial, const float* __restrict__ lse_partial,
                       const int* __restrict__ item_offsets, const int* __restrict__ bad, int B, int rows, int H,
                       int s_q, __nv_bfloat16* __restrict__ out, float* __restrict__ lse) {
  const int task = blockIdx.x * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (task >= B * rows) return;
  const int b = task / rows, row = task % rows;
  const int i0 = item_offsets[b], i1 = item_offsets[b + 1];
  if (i1 - i0 == 1) return;  // the split pass wrote this batch's out and lse
  float m = -INFINITY;
  bool nan_partial = false;  // the split pass's mark of a mismatched batch (fmaxf would skip it)
  for (int it = i0 + lane; it < i1; it += 32) {
    const float l = lse_partial[static_cast<size_t>(it) * rows + row];
    nan_partial |= isnan(l);
    m = fmaxf(m, l);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  const bool poisoned = (bad != nullptr && bad[b] != 0) || __any_sync(0xffffffffu, nan_partial);

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
    if (poisoned) acc[k] = make_float4(NAN, NAN, NAN, NAN);
    const __nv_bfloat162 lo = __floats2bfloat162_rn(acc[k].x, acc[k].y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(acc[k].z, acc[k].w);
    uint2 packed;
    packed.x = *reinterpret_cast<const uint32_t*>(&lo);
    packed.y = *reinterpret_cast<const uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(dst + 4 * (lane + 32 * k)) = packed;
  }
  if (lane == 0) {
    const int i = row / H, h = row % H;
    lse[(static_cast<size_t>(b) * H + h) * s_q + i] = poisoned ? NAN : m == -INFINITY ? -INFINITY : m + logf(sum);
  }
}

constexpr int kScheduleThreads = 512;
constexpr int kScheduleWarps = kScheduleThreads / 32;

// Exclusive prefix sum over the threads of a kScheduleThreads CTA: the thread's offset and the total.
struct ScanResult {
  int64_t before, total;
};
__device__ ScanResult cta_exclusive_scan(int64_t v) {
  __shared__ int64_t warp_sums[kScheduleWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t x = v;  // inclusive scan within the warp
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int64_t y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < kScheduleWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int64_t y = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += y;
    }
    if (lane < kScheduleWarps) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const ScanResult r{(warp > 0 ? warp_sums[warp - 1] : 0) + x - v, warp_sums[kScheduleWarps - 1]};
  __syncthreads();  // warp_sums is reused by the next call
  return r;
}

// The work list in one CTA (see mla_decode_schedule in the header): thread t owns the contiguous batches
// [t * per, (t + 1) * per), so two CTA-wide scans (blocks, then items) give every batch its offsets; one
// warp per batch checks its block-table entries.
__global__ void __launch_bounds__(kScheduleThreads)
    mla_schedule_kernel(const int* __restrict__ cache_seqlens, const int* __restrict__ block_table, int bt_stride,
                        int B, int max_pages, int num_pages, int s_q, int num_parts, int* __restrict__ items,
                        int* __restrict__ item_offsets, int* __restrict__ bad, int* __restrict__ made_seqlens,
                        int* __restrict__ made_table_hash, int* __restrict__ error) {
  __shared__ int first_bad;
  if (threadIdx.x == 0) first_bad = INT32_MAX;  // ordered before the atomics below by the scans' barriers
  const int per = (B + kScheduleThreads - 1) / kScheduleThreads;
  const int b0 = min(B, int(threadIdx.x) * per), b1 = min(B, b0 + per);
  auto blocks_of = [&](int b) {
    const int64_t blocks = (int64_t(cache_seqlens[b]) + kMlaPageSize - 1) / kMlaPageSize;
    return blocks < 0 ? 0 : blocks > max_pages ? max_pages : int(blocks);
  };
  int64_t my_blocks = 0;
  for (int b = b0; b < b1; ++b) my_blocks += blocks_of(b);
  const int64_t total_blocks = cta_exclusive_scan(my_blocks).total;
  const int64_t quota = total_blocks > num_parts ? (total_blocks + num_parts - 1) / num_parts : 1;
  auto items_of = [&](int blocks) {
    const int64_t n = (blocks + quota / 2) / quota;
    return n > 1 ? int(n) : 1;
  };
  int64_t my_items = 0;
  for (int b = b0; b < b1; ++b) my_items += items_of(blocks_of(b));
  const ScanResult item_scan = cta_exclusive_scan(my_items);
  const int64_t total_items = item_scan.total;
  int slot = int(item_scan.before);
  for (int b = b0; b < b1; ++b) {
    const int blocks = blocks_of(b), n = items_of(blocks), chunk = (blocks + n - 1) / n;
    item_offsets[b] = slot;
    for (int j = 0; j < n; ++j, ++slot) {
      items[3 * slot] = b;
      items[3 * slot + 1] = min(j * chunk, blocks);
      items[3 * slot + 2] = min((j + 1) * chunk, blocks);
    }
  }
  if (threadIdx.x == 0) item_offsets[B] = int(total_items);
  for (int s = int(total_items) + threadIdx.x; s < num_parts + B; s += kScheduleThreads) {
    items[3 * s] = -1;
    items[3 * s + 1] = 0;
    items[3 * s + 2] = 0;
  }
  const int lane = threadIdx.x % 32;
  for (int b = threadIdx.x / 32; b < B; b += kScheduleWarps) {
    const int64_t L = cache_seqlens[b];
    const int blocks = blocks_of(b);
    bool out_of_range = false;
    uint32_t hash = 0;
    for (int k = lane; k < blocks; k += 32) {
      const int page = block_table[int64_t(b) * bt_stride + k];
      out_of_range |= page < 0 || page >= num_pages;
      hash += mla_table_hash_term(page, k);
    }
    out_of_range = __any_sync(0xffffffffu, out_of_range);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) hash += __shfl_xor_sync(0xffffffffu, hash, off);
    if (lane == 0) {
      const bool is_bad = out_of_range || L > int64_t(max_pages) * kMlaPageSize || L < s_q;
      bad[b] = is_bad;
      made_seqlens[b] = int(L);
      made_table_hash[b] = static_cast<int>(hash);
      if (is_bad) atomicMin(&first_bad, b);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    error[0] = first_bad != INT32_MAX ? kMlaErrorInvalid : 0;
    error[1] = first_bad;
  }
}

bool is_aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace

cudaError_t mla_decode_split(const void* q, const void* cache, int num_pages, int64_t page_stride,
                             const int* block_table, int bt_stride, int max_pages, const int* cache_seqlens,
                             const int* items, const int* item_offsets, const int* bad, const int* made_seqlens,
                             const int* made_table_hash, int* error, int max_items, int B, int s_q, int H,
                             float softmax_scale, bool causal, float* o_partial, float* lse_partial, void* out,
                             float* lse, cudaStream_t stream) {
  using namespace hopper;
  if (B < 1 || s_q < 1 || H < 1 || max_items < 1 || num_pages < 1 || max_pages < 1 || bt_stride < max_pages)
    return cudaErrorInvalidValue;
  if ((made_seqlens == nullptr) != (made_table_hash == nullptr) || (made_seqlens != nullptr && error == nullptr))
    return cudaErrorInvalidValue;
  if (page_stride < int64_t(kMlaPageSize) * kMlaDimQK || page_stride % 8 != 0) return cudaErrorInvalidValue;
  if (!(softmax_scale > 0.0f) || !std::isfinite(softmax_scale)) return cudaErrorInvalidValue;
  if (q == nullptr || cache == nullptr || block_table == nullptr || cache_seqlens == nullptr || items == nullptr ||
      item_offsets == nullptr || o_partial == nullptr || lse_partial == nullptr || out == nullptr || lse == nullptr)
    return cudaErrorInvalidValue;
  if (!is_aligned(q, 16) || !is_aligned(cache, 16) || !is_aligned(o_partial, 16) || !is_aligned(lse_partial, 4) ||
      !is_aligned(out, 16) || !is_aligned(lse, 4))
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
  CUtensorMap tmap_q{}, tmap_kv{}, tmap_out{};
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
  // out as [B][rows][512]: the single-item batches' 64-row blocks, stored in 64-dim boxes (rows past
  // s_q * H clipped).
  err = make_tensor_map_3d(&tmap_out, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, out,
                           {uint64_t(kMlaDimV), uint64_t(rows), uint64_t(B)},
                           {uint64_t(kMlaDimV) * 2, uint64_t(rows) * kMlaDimV * 2},
                           {uint32_t(kChunkDims), uint32_t(kMlaRowsPerCta), 1u}, CU_TENSOR_MAP_SWIZZLE_128B);
  if (err != cudaSuccess) return err;

  SplitParams p{};
  p.block_table = block_table;
  p.cache_seqlens = cache_seqlens;
  p.items = items;
  p.item_offsets = item_offsets;
  p.bad = bad;
  p.made_seqlens = made_seqlens;
  p.made_table_hash = made_table_hash;
  p.error = error;
  p.o_partial = o_partial;
  p.lse_partial = lse_partial;
  p.lse = lse;
  p.bt_stride = bt_stride;
  p.max_pages = max_pages;
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
  mla_split_kernel<<<grid, kThreads, kSmemBytes, stream>>>(tmap_q, tmap_kv, tmap_out, p);
  return cudaGetLastError();
}

cudaError_t mla_decode_combine(const float* o_partial, const float* lse_partial, const int* item_offsets,
                               const int* bad, int B, int s_q, int H, void* out, float* lse, cudaStream_t stream) {
  if (B < 1 || s_q < 1 || H < 1) return cudaErrorInvalidValue;
  if (o_partial == nullptr || lse_partial == nullptr || item_offsets == nullptr || out == nullptr || lse == nullptr)
    return cudaErrorInvalidValue;
  if (!is_aligned(o_partial, 16) || !is_aligned(out, 8) || !is_aligned(lse_partial, 4) || !is_aligned(lse, 4))
    return cudaErrorInvalidValue;
  const int64_t tasks = int64_t(B) * s_q * H;
  if (tasks > int64_t(0x7FFFFFFF)) return cudaErrorInvalidValue;
  const unsigned grid = unsigned((tasks + 3) / 4);
  mla_combine_kernel<<<grid, 128, 0, stream>>>(o_partial, lse_partial, item_offsets, bad, B, s_q * H, H, s_q,
                                               static_cast<__nv_bfloat16*>(out), lse);
  return cudaGetLastError();
}

cudaError_t mla_decode_schedule(const int* cache_seqlens, const int* block_table, int bt_stride, int B,
                                int max_pages, int num_pages, int s_q, int num_parts, int* items,
                                int* item_offsets, int* bad, int* made_seqlens, int* made_table_hash, int* error,
                                cudaStream_t stream) {
  if (B < 1 || max_pages < 1 || num_pages < 1 || s_q < 1 || num_parts < 1 || bt_stride < max_pages)
    return cudaErrorInvalidValue;
  if (cache_seqlens == nullptr || block_table == nullptr || items == nullptr || item_offsets == nullptr ||
      bad == nullptr || made_seqlens == nullptr || made_table_hash == nullptr || error == nullptr)
    return cudaErrorInvalidValue;
  if (int64_t(num_parts) + B > int64_t(0x7FFFFFFF) / 3) return cudaErrorInvalidValue;
  mla_schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(cache_seqlens, block_table, bt_stride, B, max_pages,
                                                          num_pages, s_q, num_parts, items, item_offsets, bad,
                                                          made_seqlens, made_table_hash, error);
  return cudaGetLastError();
}

}  // namespace dskernels
