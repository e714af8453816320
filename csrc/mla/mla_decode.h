// MLA absorbed decode for Hopper (sm_90a), FlashMLA-compatible layouts, bf16 paged cache.
//
// For batch b, query token i (0 .. s_q-1) and head h, with row = i * H + h ("rows" = s_q * H per batch):
//   score(t)   = softmax_scale * dot(q[b, i, h, 0:576], cache[token t of b, 0:576])      (fp32)
//   out[b,i,h] = sum_t softmax(score)(t) * cache[token t of b, 0:512]                    (V = first 512 dims)
//   lse[b,h,i] = ln sum_t exp(score(t))
// over the visible tokens t: t < cache_seqlens[b] - s_q + i + 1 when causal, else t < cache_seqlens[b].
//
// Two passes. The split pass runs one CTA per (work item, 64 query rows); a work item is a range of
// 64-token cache blocks of one batch, made by mla_decode_schedule (or its torch twin in Python). A batch
// with a single item is finished by the split pass (out and lse written directly); the items of the other
// batches write partial results, which the combine pass merges.
//
// Plain C++ host API: no PyTorch, no pybind11. The caller (Python) checks every rule below and raises
// before calling; these functions re-check the cheap ones and return cudaErrorInvalidValue instead of
// launching. Neither function synchronizes or allocates.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dskernels {

constexpr int kMlaDimQK = 576;      // 512 absorbed-latent dims + 64 RoPE dims
constexpr int kMlaDimV = 512;       // V = the first 512 dims of each cache token
constexpr int kMlaPageSize = 64;    // tokens per cache page (= the kernel's KV block)
constexpr int kMlaRowsPerCta = 64;  // query rows (i, h) per CTA: the wgmma M dimension

// Split pass. Returns cudaSuccess, a launch/attribute error, cudaErrorInvalidValue when an argument
// breaks a rule below, or cudaErrorNotSupported when the current device is not compute capability 9.x
// (or the driver lacks cuTensorMapEncodeTiled). All pointers are device pointers on the current device.
//
//   q             bf16 [B, s_q, H, 576], contiguous. 16-byte aligned.
//   cache         bf16 pages [num_pages, 64, 576]: token j of page p starts at element
//                 p * page_stride + j * 576. 16-byte aligned.
//   num_pages     pages in `cache` (>= 1). Block-table entries outside [0, num_pages) read zeros.
//   page_stride   elements between pages: >= 64 * 576 and a multiple of 8 (16-byte aligned pages).
//   block_table   int32 [B, max_pages], row stride bt_stride (>= max_pages): page of cache block k (tokens
//                 64k .. 64k+63) of batch b = block_table[b * bt_stride + k]; blocks at or past max_pages are
//                 never read.
//   cache_seqlens int32 [B], >= 1: tokens in the cache of batch b, including the s_q new query tokens.
//   items         int32 [max_items, 3] = (b, first block, end block (exclusive)); b = -1 marks an unused
//                 slot (its CTAs exit, its outputs are left untouched). Blocks at or past
//                 ceil(cache_seqlens[b] / 64) are ignored; an item with no block left yields lse = -inf, o = 0.
//   item_offsets  int32 [B + 1]: batch b owns items item_offsets[b] .. item_offsets[b+1]-1 (at least one).
//   bad           int32 [B] or nullptr: see mla_decode_combine (applied here to single-item batches).
//   made_seqlens, made_table_hash   int32 [B] each, or both nullptr (no check): what mla_decode_schedule
//                 recorded for the work list. A batch whose cache_seqlens[b] differs from made_seqlens[b],
//                 or whose block-table fingerprint (mla_table_hash over its blocks) differs from
//                 made_table_hash[b], is a mismatch: its rows come out NaN (out and lse here for a single-item
//                 batch; lse_partial = NaN for the others, which the combine turns into NaN rows), and
//                 error[0] |= kMlaErrorMismatch, error[1] = min(error[1], b).
//   error         int32 [2] or nullptr (then made_* must be nullptr too): see above.
//   max_items     rows of `items`, >= 1.
//   B, s_q, H     >= 1 each; s_q * H any value (the last CTA of a batch masks its padded rows).
//   softmax_scale finite and > 0 (scores are scaled by softmax_scale * log2(e) and use exp2).
//   causal        see the visibility rule at the top.
//   o_partial     fp32 [max_items, s_q * H, 512]: per item and row, the softmax-normalized (within the
//                 item's token range) weighted sum of V; 0 where the row sees no token in the range.
//                 16-byte aligned.
//   lse_partial   fp32 [max_items, s_q * H]: natural-log sum-exp of the scaled scores over the item's
//                 range; -inf where the row sees no token in the range. 4-byte aligned.
//                 Partials are written for the items of multi-item batches only.
//   out, lse      as for mla_decode_combine: written here for the batches of one item, untouched for the
//                 others (the combine pass writes those). out 16-byte aligned.
// Tokens of the last page past cache_seqlens[b] may hold anything (NaN included): they are zeroed in
// shared memory before use.
cudaError_t mla_decode_split(const void* q, const void* cache, int num_pages, int64_t page_stride,
                             const int* block_table, int bt_stride, int max_pages, const int* cache_seqlens,
                             const int* items, const int* item_offsets, const int* bad, const int* made_seqlens,
                             const int* made_table_hash, int* error, int max_items, int B, int s_q, int H,
                             float softmax_scale, bool causal, float* o_partial, float* lse_partial, void* out,
                             float* lse, cudaStream_t stream);

// Combine pass, after the split pass: for every batch b of two or more items, merges items
// item_offsets[b] .. item_offsets[b+1]-1 (contiguous); batches of one item are skipped (finished by the
// split pass): m = max lse_i, w_i = exp(lse_i - m), out = sum w_i o_i / sum w_i, lse = m + ln(sum w_i).
// Runs on any CUDA device (no Hopper-only code).
//   o_partial, lse_partial   as written by mla_decode_split (o_partial 16-byte aligned).
//   item_offsets             int32 [B + 1], non-decreasing.
//   out                      bf16 [B, s_q, H, 512], contiguous, 8-byte aligned.
//   lse                      fp32 [B, H, s_q], contiguous.
//   bad                      int32 [B] or nullptr: where bad[b] != 0 (the scheduler found the batch's block
//                            table or length invalid), every out and lse of batch b is NaN.
// A row any of whose items has a NaN lse_partial (the split pass's mark of a mismatched batch) comes out NaN.
// A row that sees no token at all (possible only when cache_seqlens[b] < s_q under causal) gets out = 0
// and lse = -inf.
cudaError_t mla_decode_combine(const float* o_partial, const float* lse_partial, const int* item_offsets,
                               const int* bad, int B, int s_q, int H, void* out, float* lse, cudaStream_t stream);

// The work list both passes read, computed on the device in one launch (no host sync, CUDA-graph safe);
// the same integers as dskernels.mla.schedule (its torch-op specification):
//   blocks[b] = clamp(ceil(cache_seqlens[b] / 64), 0, max_pages)
//   quota     = max(1, ceil(sum(blocks) / num_parts));  n[b] = max(1, round(blocks[b] / quota)) items
//             (halves rounded up, i.e. floor((blocks[b] + floor(quota / 2)) / quota))
//   items     int32 [num_parts + B, 3]: batch b's items at item_offsets[b] + j, j < n[b], cover blocks
//             [j * c, min((j + 1) * c, blocks[b])) with c = ceil(blocks[b] / n[b]); the rest are (-1, 0, 0)
//   item_offsets int32 [B + 1] = exclusive prefix sum of n
//   bad       int32 [B]: 1 where a needed block_table entry is outside [0, num_pages),
//             cache_seqlens[b] > max_pages * 64 or cache_seqlens[b] < s_q; else 0
//   made_seqlens    int32 [B]: a copy of cache_seqlens (what the list was made from)
//   made_table_hash int32 [B]: sum over k < blocks[b] of mla_table_hash_term(block_table[b, k], k), mod 2^32
//   error     int32 [2] = (kMlaErrorInvalid if any batch is bad else 0, the first bad batch or INT32_MAX)
// block_table int32 [B, max_pages] with row stride bt_stride. B, max_pages, num_pages, s_q, num_parts >= 1.
cudaError_t mla_decode_schedule(const int* cache_seqlens, const int* block_table, int bt_stride, int B,
                                int max_pages, int num_pages, int s_q, int num_parts, int* items,
                                int* item_offsets, int* bad, int* made_seqlens, int* made_table_hash, int* error,
                                cudaStream_t stream);

// error[0] bits: a batch's block table or length was invalid when the work list was made; a decode call's
// cache_seqlens or block table differed from those the work list was made from.
constexpr int kMlaErrorInvalid = 1;
constexpr int kMlaErrorMismatch = 2;

// The block-table fingerprint's term for page `page` at block k: murmur3's 32-bit finalizer of
// page * 0x9E3779B1 + k. For a fixed k it is a bijection of the page, so a fingerprint (the sum of a
// batch's terms mod 2^32) changes whenever exactly one entry does; any other change escapes it with
// probability about 2^-32. dskernels.reference.mla.table_hash is its specification.
__host__ __device__ inline uint32_t mla_table_hash_term(int page, int k) {
  uint32_t h = static_cast<uint32_t>(page) * 0x9E3779B1u + static_cast<uint32_t>(k);
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

}  // namespace dskernels
