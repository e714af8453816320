// FP8 quantization kernels. All are memory-bound: each element is read once and written once as
// one byte, with 16-byte accesses along the contiguous dim. The scale of a tile is computed with
// the same fp32 operations as the reference (scale_from_amax, to_e4m3x2), so the bytes match it.
#include "quant.h"

#include <atomic>

namespace dskernels {
namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerGroup = kBlock / 8;                  // 16 lanes x 8 elements = one group
constexpr int kGroupsPerCta = kThreads / kLanesPerGroup;    // 16

template <typename T>
bool aligned16(const void* p, int64_t ld) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (ld * sizeof(T)) % 16 == 0;
}

// Quantize kN values with a tile's inverse scale and store them as kN bytes (or byte by byte at a tail).
template <int kN>
__device__ __forceinline__ void store_e4m3(uint8_t* q, const float (&v)[kN], float inv, int n, bool vec) {
  uint16_t p[kN / 2];
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) p[i] = to_e4m3x2(v[2 * i] * inv, v[2 * i + 1] * inv);
  if (vec) {
    uint32_t w[kN / 4];
#pragma unroll
    for (int i = 0; i < kN / 4; ++i) w[i] = p[2 * i] | (uint32_t(p[2 * i + 1]) << 16);
    if constexpr (kN == 8)
      *reinterpret_cast<uint2*>(q) = make_uint2(w[0], w[1]);
    else
      *reinterpret_cast<uint32_t*>(q) = w[0];
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i)
      if (i < n) q[i] = uint8_t(p[i / 2] >> (8 * (i % 2)));
  }
}

// One group of 128 elements per 16 lanes; each lane loads 8 elements. A CTA covers kGroupsPerCta
// consecutive groups of the flattened [rows, groups_per_row] grid (32-bit indices: the host checks
// that rows * groups_per_row fits).
template <typename T>
__global__ void __launch_bounds__(kThreads) quant_groups_kernel(
    const T* __restrict__ x, int rows, int cols, int64_t ld_x, uint8_t* __restrict__ q, int64_t ld_q,
    float* __restrict__ s, int64_t s_r, int64_t s_g, bool pow2, bool vec_ok) {
  const unsigned groups_per_row = cdiv(cols, kBlock);
  unsigned group = blockIdx.x * kGroupsPerCta + threadIdx.x / kLanesPerGroup;
  // Lanes past the last group stay for the warp shuffles but touch no memory.
  const bool valid = group < unsigned(rows) * groups_per_row;
  if (!valid) group = 0;
  const unsigned r = group / groups_per_row, g = group - r * groups_per_row;
  const int lane = threadIdx.x % kLanesPerGroup;
  const int c = int(g) * kBlock + lane * 8;
  const int n = valid ? cols - c : 0;  // elements left in this row from c on (may be <= 0)
  const bool vec = vec_ok && n >= 8;

  float v[8];
  load8(x + r * ld_x + c, n, vec, v);
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));  // fmaxf skips NaN, as specified
#pragma unroll
  for (int off = kLanesPerGroup / 2; off > 0; off /= 2)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = scale_from_amax(amax, pow2);
  if (n > 0) store_e4m3<8>(q + r * ld_q + c, v, 1.0f / scale, n, vec);
  if (valid && lane == 0) s[r * s_r + g * s_g] = scale;
}

// The tile kernels (quant_tile_kernel): the column-wise (128 x 1 along M) quantization of x [M, K] into
// q_t [K, M_out], and with it, from the same read of x, the row-wise (1 x 128 along K) one into q [M,
// K_out] (a Linear layer's input needs both, for the forward and the weight gradient, and so does its
// output gradient), or the 128 x 128 block one (a weight W and its transpose W^T sharing the blocks'
// scales, for the forward and the input gradient). q is written as quant_groups_kernel or
// quant_blocks_kernel writes it and q_t as the column-wise (or block) reference does, byte for byte, each
// optionally zero-padded along its contiguous dim (columns K .. K_out - 1 of q and M .. M_out - 1 of q_t
// are zero; each pad is below 128, so no scale changes).
//
// A CTA owns a 128 (M) x 128 (K) tile; each element costs few instructions, so that the kernel is bound
// by its loads in flight rather than by issue (the kernel it replaces, 16 lanes per row group and one
// byte per store, ran at 77 % of the SM's issue rate and 44 % of DRAM on 16384 x 7168).
// Phase 1: a lane owns 4 of a row's 16-byte chunks (4 lanes per row for 2-byte types, 8 for fp32), every
// chunk of the tile loaded before the first is used; a row group's amax is a max over packed pairs
// (__hmax2: exact, NaN skipped as fmaxf does) and 1 or 2 shuffles; q is quantized from registers
// (kBoth, or kBlock after the CTA's amax), and the raw chunks are staged in shared memory (exact; rows
// padded so that each 8-lane phase of a 16-byte store hits 32 distinct banks).
// Phase 2: a lane owns one 4-byte word column (2 columns of a 2-byte type) over 32 or 64 consecutive
// rows, read without conflicts (a warp reads 32 consecutive words of a row); the column amax is
// combined over the warps that split the rows through shared memory, and the column's bytes leave as
// 16-byte stores along q_t's rows.
template <typename T>
struct TileWork {
  static constexpr int kElems = 16 / int(sizeof(T));                      // elements per 16-byte chunk
  static constexpr int kLanesPerRow = kBlock / kElems / 4;                // each lane loads 4 chunks
  static constexpr int kRowsPerPass = kThreads / kLanesPerRow;
  static constexpr int kPasses = kBlock / kRowsPerPass;
  static constexpr int kRowBytes = kBlock * int(sizeof(T)) + (16 * kLanesPerRow) % 128;  // staged row
  static constexpr int kWords = kBlock * int(sizeof(T)) / 4;              // 4-byte words per row
  static constexpr int kColGroups = kWords / 32;                          // warps across the words
  static constexpr int kParts = kThreads / 32 / kColGroups;               // warps down the rows
  static constexpr int kRowsPerLane = kBlock / kParts;
  static constexpr int kCols = 4 / int(sizeof(T));                        // columns per word
  static constexpr int kSmem = kBlock * kRowBytes;
};

template <typename T>
struct RawChunk {
  alignas(16) T e[16 / sizeof(T)];
};

// One 16-byte chunk of T from p: one load, or element by element (n of them, zeros after).
template <typename T>
__device__ __forceinline__ uint4 load_chunk(const T* p, int n, bool vec) {
  if (vec) return __ldg(reinterpret_cast<const uint4*>(p));
  RawChunk<T> r;
#pragma unroll
  for (int i = 0; i < 16 / int(sizeof(T)); ++i) r.e[i] = i < n ? p[i] : static_cast<T>(0.0f);
  return *reinterpret_cast<const uint4*>(r.e);
}

__device__ __forceinline__ uint32_t word_of(const uint4& c, int i) { return i == 0 ? c.x : i == 1 ? c.y : i == 2 ? c.z : c.w; }

// Element cc of a 4-byte word of T, as fp32 (exact).
template <typename T>
__device__ __forceinline__ float word_elem(uint32_t w, int cc) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(w);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(cc == 0 ? w << 16 : w & 0xFFFF0000u);
  } else {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> (16 * cc))));
  }
}

// acc = max(acc, |w|) per element of the word (acc holds magnitudes, starting at +0).
template <typename T>
__device__ __forceinline__ uint32_t absmax_word(uint32_t acc, uint32_t w) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(fmaxf(__uint_as_float(acc), fabsf(__uint_as_float(w))));
  } else {
    using T2 = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
    const T2 m = __hmax2(*reinterpret_cast<const T2*>(&acc), __habs2(*reinterpret_cast<const T2*>(&w)));
    return *reinterpret_cast<const uint32_t*>(&m);
  }
}

// The max over the elements of an absmax_word accumulator (cc < 0), or of element cc alone.
template <typename T>
__device__ __forceinline__ float absmax_of(uint32_t acc, int cc = -1) {
  if constexpr (sizeof(T) == 4) return __uint_as_float(acc);
  if (cc >= 0) return word_elem<T>(acc, cc);
  return fmaxf(word_elem<T>(acc, 0), word_elem<T>(acc, 1));
}

// A chunk quantized with `inv` into dst: 8 or 4 bytes, one store when `vec`, else the first n bytes.
template <typename T>
__device__ __forceinline__ void quant_chunk(const uint4& c, float inv, uint8_t* dst, int n, bool vec) {
  constexpr int kE = 16 / int(sizeof(T));
  float v[kE];
#pragma unroll
  for (int i = 0; i < kE; ++i) v[i] = word_elem<T>(word_of(c, i * int(sizeof(T)) / 4), i % (4 / int(sizeof(T))));
  store_e4m3<kE>(dst, v, inv, n, vec);
}

// kN bytes (packed 4 to a word) to dst: whole-word stores as wide as `align` (the alignment of dst's every
// row) allows when all n >= kN of them fit, else the first n bytes one by one.
template <int kN>
__device__ __forceinline__ void store_bytes(uint8_t* dst, const uint32_t (&w)[kN / 4], int n, int align) {
  if (n >= kN && align >= 16) {
#pragma unroll
    for (int i = 0; i < kN / 16; ++i)
      reinterpret_cast<uint4*>(dst)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
  } else if (n >= kN && align >= 8) {
#pragma unroll
    for (int i = 0; i < kN / 8; ++i) reinterpret_cast<uint2*>(dst)[i] = make_uint2(w[2 * i], w[2 * i + 1]);
  } else if (n >= kN && align >= 4) {
#pragma unroll
    for (int i = 0; i < kN / 4; ++i) reinterpret_cast<uint32_t*>(dst)[i] = w[i];
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i)
      if (i < n) dst[i] = uint8_t(w[i / 4] >> (8 * (i % 4)));
  }
}

// What quant_tile_kernel writes besides q_t (see above): nothing (the transposed op), q with 1 x 128
// group scales (both), or q with the tile's single 128 x 128 block scale, which q_t then shares (a weight
// and its transpose, for a Linear layer's forward and input gradient).
enum class TileMode { kColumns, kBoth, kBlock };

template <typename T, TileMode kMode>
__global__ void __launch_bounds__(kThreads) quant_tile_kernel(
    const T* __restrict__ x, int M, int K, int64_t ld_x, uint8_t* __restrict__ q, int64_t ld_q, int K_out,
    float* __restrict__ s, int64_t s_r, int64_t s_g, uint8_t* __restrict__ q_t, int64_t ld_qt, int M_out,
    float* __restrict__ st, int64_t st_r, int64_t st_g, bool pow2, bool vec_in, bool vec_q, int qt_align) {
  using W = TileWork<T>;
  constexpr int kL = W::kLanesPerRow, kE = W::kElems;
  extern __shared__ __align__(16) uint8_t tile_smem[];  // [kBlock][kRowBytes]: the raw tile
  __shared__ uint32_t part_amax[W::kParts][W::kWords];  // phase 2: each row part's column amax
  __shared__ float warp_amax[kThreads / 32];            // kBlock: the block's amax, per warp
  const int m0 = blockIdx.y * kBlock, k0 = blockIdx.x * kBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Phase 1. Rows past M and columns past K load as zeros.
  const int lane_r = threadIdx.x % kL, row = threadIdx.x / kL;
  uint4 raw[W::kPasses][4];
#pragma unroll
  for (int p = 0; p < W::kPasses; ++p) {
    const int m = m0 + row + p * W::kRowsPerPass;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = k0 + (lane_r + kL * j) * kE, n = m < M ? K - c : 0;
      raw[p][j] = load_chunk(x + int64_t(m < M ? m : 0) * ld_x + c, n, vec_in && n >= kE);
    }
  }
  uint32_t block_acc = 0;
#pragma unroll
  for (int p = 0; p < W::kPasses; ++p) {
    const int rr = row + p * W::kRowsPerPass, m = m0 + rr;
    uint32_t acc = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc = absmax_word<T>(acc, word_of(raw[p][j], i));
      *reinterpret_cast<uint4*>(tile_smem + rr * W::kRowBytes + (lane_r + kL * j) * 16) = raw[p][j];
    }
    block_acc = absmax_word<T>(block_acc, acc);
    if constexpr (kMode == TileMode::kBoth) {
      float amax = absmax_of<T>(acc);
#pragma unroll
      for (int off = kL / 2; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      const float scale = scale_from_amax(amax, pow2), inv = 1.0f / scale;
      if (m < M) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = k0 + (lane_r + kL * j) * kE, n = K_out - c;
          if (n > 0) quant_chunk<T>(raw[p][j], inv, q + int64_t(m) * ld_q + c, n, vec_q && n >= kE);
        }
        if (lane_r == 0) s[int64_t(m) * s_r + blockIdx.x * s_g] = scale;
      }
    }
  }
  float block_inv = 0.0f;
  if constexpr (kMode == TileMode::kBlock) {
    float amax = absmax_of<T>(block_acc);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (lane == 0) warp_amax[warp] = amax;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kThreads / 32; ++i) amax = fmaxf(amax, warp_amax[i]);
    const float scale = scale_from_amax(amax, pow2);
    block_inv = 1.0f / scale;
    if (threadIdx.x == 0) {
      s[blockIdx.y * s_r + blockIdx.x * s_g] = scale;
      st[blockIdx.x * st_r + blockIdx.y * st_g] = scale;
    }
#pragma unroll
    for (int p = 0; p < W::kPasses; ++p) {
      const int m = m0 + row + p * W::kRowsPerPass;
      if (m >= M) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = k0 + (lane_r + kL * j) * kE, n = K_out - c;
        if (n > 0) quant_chunk<T>(raw[p][j], block_inv, q + int64_t(m) * ld_q + c, n, vec_q && n >= kE);
      }
    }
  } else {
    __syncthreads();
  }

  // Phase 2: word column wc, rows r0 .. r0 + kRowsPerLane - 1.
  constexpr int kR = W::kRowsPerLane;
  const int wc = (warp % W::kColGroups) * 32 + lane, part = warp / W::kColGroups, r0 = part * kR;
  uint32_t col[kR];
#pragma unroll
  for (int i = 0; i < kR; ++i) col[i] = *reinterpret_cast<const uint32_t*>(tile_smem + (r0 + i) * W::kRowBytes + wc * 4);
  uint32_t acc = 0;
  if constexpr (kMode != TileMode::kBlock) {
#pragma unroll
    for (int i = 0; i < kR; ++i) acc = absmax_word<T>(acc, col[i]);
    part_amax[part][wc] = acc;
    __syncthreads();
#pragma unroll
    for (int i = 0; i < W::kParts; ++i) acc = absmax_word<T>(acc, part_amax[i][wc]);
  }
#pragma unroll
  for (int cc = 0; cc < W::kCols; ++cc) {
    const int k = k0 + wc * W::kCols + cc;
    if (k >= K) continue;
    float inv = block_inv;
    if constexpr (kMode != TileMode::kBlock) {
      const float scale = scale_from_amax(absmax_of<T>(acc, cc), pow2);
      inv = 1.0f / scale;
      if (part == 0) st[int64_t(k) * st_r + blockIdx.y * st_g] = scale;
    }
    uint32_t out[kR / 4];
#pragma unroll
    for (int i = 0; i < kR / 4; ++i)
      out[i] = to_e4m3x2(word_elem<T>(col[4 * i], cc) * inv, word_elem<T>(col[4 * i + 1], cc) * inv) |
               uint32_t(to_e4m3x2(word_elem<T>(col[4 * i + 2], cc) * inv, word_elem<T>(col[4 * i + 3], cc) * inv)) << 16;
    store_bytes<kR>(q_t + int64_t(k) * ld_qt + m0 + r0, out, M_out - m0 - r0, qt_align);
  }
}

// One CTA per 128 x 128 block: 16 lanes cover a row's 128 columns, 16 rows at a time, 8 passes;
// the values stay in registers between the amax reduction and the quantization.
template <typename T>
__global__ void __launch_bounds__(kThreads) quant_blocks_kernel(
    const T* __restrict__ w, int N, int K, int64_t ld_w, uint8_t* __restrict__ q, int64_t ld_q,
    float* __restrict__ s, int64_t s_r, int64_t s_g, bool pow2, bool vec_ok) {
  constexpr int kPasses = kBlock / kGroupsPerCta;  // 8
  __shared__ float warp_amax[kThreads / 32];
  const int lane16 = threadIdx.x % kLanesPerGroup, row0 = threadIdx.x / kLanesPerGroup;
  const int c = blockIdx.x * kBlock + lane16 * 8;
  const int n = K - c;
  const bool vec = vec_ok && n >= 8;
  float v[kPasses][8], amax = 0.0f;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int r = blockIdx.y * kBlock + row0 + p * kGroupsPerCta;
    load8(w + int64_t(r < N ? r : 0) * ld_w + c, r < N ? n : 0, vec && r < N, v[p]);
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[p][i]));
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kThreads / 32; ++i) amax = fmaxf(amax, warp_amax[i]);
  const float scale = scale_from_amax(amax, pow2), inv = 1.0f / scale;
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int r = blockIdx.y * kBlock + row0 + p * kGroupsPerCta;
    if (r < N && n > 0) store_e4m3<8>(q + int64_t(r) * ld_q + c, v[p], inv, n, vec);
  }
  if (threadIdx.x == 0) s[blockIdx.y * s_r + blockIdx.x * s_g] = scale;
}

template <typename OutT>
__device__ __forceinline__ OutT from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Each thread turns 8 bytes into 8 outputs; one scale per thread (8 never straddle a 128 tile).
template <typename OutT>
__global__ void __launch_bounds__(kThreads) dequant_kernel(
    const uint8_t* __restrict__ q, int rows, int cols, int64_t ld_q, const float* __restrict__ s,
    int64_t s_r, int64_t s_g, int block_rows, OutT* __restrict__ out, int64_t ld_out, bool vec_ok) {
  const int per_row = cdiv(cols, 8);
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= int64_t(rows) * per_row) return;
  const int r = int(i / per_row), c = int(i % per_row) * 8;
  const int n = cols - c;
  const float scale = s[int64_t(r / block_rows) * s_r + (c / kBlock) * s_g];
  const uint8_t* src = q + r * ld_q + c;
  OutT* dst = out + r * ld_out + c;
  if (vec_ok && n >= 8) {
    uint2 raw = *reinterpret_cast<const uint2*>(src);
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
    OutT o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = from_float<OutT>(e4m3_to_float(b[j]) * scale);
    if constexpr (sizeof(OutT) == 4) {
      reinterpret_cast<float4*>(dst)[0] = reinterpret_cast<float4*>(o)[0];
      reinterpret_cast<float4*>(dst)[1] = reinterpret_cast<float4*>(o)[1];
    } else {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4*>(o);
    }
  } else {
    for (int j = 0; j < n && j < 8; ++j) dst[j] = from_float<OutT>(e4m3_to_float(src[j]) * scale);
  }
}

// Calls f with a typed null pointer of the element type named by `dtype`.
template <typename F>
void dispatch_input(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(static_cast<const float*>(nullptr)); break;
    case DType::kBFloat16: f(static_cast<const __nv_bfloat16*>(nullptr)); break;
    case DType::kFloat16: f(static_cast<const __half*>(nullptr)); break;
    default: throw std::invalid_argument("unsupported input dtype code");
  }
}

}  // namespace

void quant_groups(const void* x, DType x_dtype, int rows, int cols, int64_t ld_x, void* q,
                  int64_t ld_q, float* s, int64_t s_r, int64_t s_g, bool pow2, cudaStream_t stream) {
  require_sm90("quant_groups");
  const int64_t groups = int64_t(rows) * cdiv(cols, kBlock);
  if (groups >= (int64_t(1) << 32) - kGroupsPerCta)
    throw std::invalid_argument("quant_groups: more than 2^32 groups");
  const unsigned grid = unsigned((groups + kGroupsPerCta - 1) / kGroupsPerCta);
  dispatch_input(x_dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const bool vec = aligned16<T>(x, ld_x) && reinterpret_cast<uintptr_t>(q) % 8 == 0 && ld_q % 8 == 0;
    quant_groups_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), rows, cols, ld_x,
                                                          static_cast<uint8_t*>(q), ld_q, s, s_r, s_g,
                                                          pow2, vec);
  });
  check_launch("quant_groups_kernel");
}

namespace {

// quant_tile_kernel<T, kMode> over x [M, K]: grid (K / 128, M / 128) rounded up.
template <TileMode kMode>
void launch_tiles(const char* what, const void* x, DType x_dtype, int M, int K, int64_t ld_x, void* q, int64_t ld_q,
                 int K_out, float* s, int64_t s_r, int64_t s_g, void* q_t, int64_t ld_qt, int M_out, float* st,
                 int64_t st_r, int64_t st_g, bool pow2, cudaStream_t stream) {
  if (cdiv(M, kBlock) > 65535) throw std::invalid_argument(std::string(what) + ": more than 65535 * 128 rows");
  int device = 0;
  check_cuda(cudaGetDevice(&device), what);
  const dim3 grid(cdiv(K, kBlock), cdiv(M, kBlock));
  // The widest store (16, 8, 4 bytes, else 1) that every row of q_t takes at a multiple of 16 bytes.
  int qt_align = 16;
  while (qt_align > 1 && (reinterpret_cast<uintptr_t>(q_t) % qt_align != 0 || ld_qt % qt_align != 0)) qt_align /= 2;
  dispatch_input(x_dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    constexpr int smem = TileWork<T>::kSmem, chunk_bytes = TileWork<T>::kElems;
    const bool vec_q = reinterpret_cast<uintptr_t>(q) % chunk_bytes == 0 && ld_q % chunk_bytes == 0;
    auto kernel = quant_tile_kernel<T, kMode>;
    if constexpr (smem > 48 * 1024) {  // above the default limit: opted into once per device
      static std::atomic<uint64_t> opted{0};
      const uint64_t bit = uint64_t(1) << (device % 64);
      if (!(opted.load() & bit)) {
        check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), what);
        opted |= bit;
      }
    }
    kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(x), M, K, ld_x, static_cast<uint8_t*>(q), ld_q,
                                             K_out, s, s_r, s_g, static_cast<uint8_t*>(q_t), ld_qt, M_out, st, st_r,
                                             st_g, pow2, aligned16<T>(x, ld_x), vec_q, qt_align);
  });
  check_launch(what);
}

}  // namespace

void quant_groups_transposed(const void* x, DType x_dtype, int M, int K, int64_t ld_x, void* q_t,
                             int64_t ld_q, float* s, int64_t s_r, int64_t s_g, bool pow2,
                             cudaStream_t stream) {
  require_sm90("quant_groups_transposed");
  launch_tiles<TileMode::kColumns>("quant_groups_transposed", x, x_dtype, M, K, ld_x, nullptr, 0, K, nullptr, 0, 0,
                                   q_t, ld_q, M, s, s_r, s_g, pow2, stream);
}

void quant_groups_both(const void* x, DType x_dtype, int M, int K, int64_t ld_x, void* q, int64_t ld_q,
                       int K_out, float* s, int64_t s_r, int64_t s_g, void* q_t, int64_t ld_qt, int M_out,
                       float* st, int64_t st_r, int64_t st_g, bool pow2, cudaStream_t stream) {
  require_sm90("quant_groups_both");
  if (M < 1 || K < 1 || K_out < K || K_out > cdiv(K, kBlock) * kBlock || M_out < M ||
      M_out > cdiv(M, kBlock) * kBlock || ld_q < K_out || ld_qt < M_out)
    throw std::invalid_argument("quant_groups_both: K <= K_out <= K rounded up to 128, M <= M_out <= M rounded "
                                "up to 128, ld_q >= K_out and ld_qt >= M_out");
  launch_tiles<TileMode::kBoth>("quant_groups_both", x, x_dtype, M, K, ld_x, q, ld_q, K_out, s, s_r, s_g, q_t, ld_qt,
                                M_out, st, st_r, st_g, pow2, stream);
}

void quant_blocks_both(const void* w, DType w_dtype, int N, int K, int64_t ld_w, void* q, int64_t ld_q, float* s,
                       int64_t s_r, int64_t s_g, void* q_t, int64_t ld_qt, int N_out, float* st, int64_t st_r,
                       int64_t st_g, bool pow2, cudaStream_t stream) {
  require_sm90("quant_blocks_both");
  if (N < 1 || K < 1 || N_out < N || N_out > cdiv(N, kBlock) * kBlock || ld_q < K || ld_qt < N_out)
    throw std::invalid_argument("quant_blocks_both: N <= N_out <= N rounded up to 128, ld_q >= K and ld_qt >= N_out");
  launch_tiles<TileMode::kBlock>("quant_blocks_both", w, w_dtype, N, K, ld_w, q, ld_q, K, s, s_r, s_g, q_t, ld_qt,
                                 N_out, st, st_r, st_g, pow2, stream);
}

void quant_blocks(const void* w, DType w_dtype, int N, int K, int64_t ld_w, void* q, int64_t ld_q,
                  float* s, int64_t s_r, int64_t s_g, bool pow2, cudaStream_t stream) {
  require_sm90("quant_blocks");
  const dim3 grid(cdiv(K, kBlock), cdiv(N, kBlock));
  dispatch_input(w_dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const bool vec = aligned16<T>(w, ld_w) && reinterpret_cast<uintptr_t>(q) % 8 == 0 && ld_q % 8 == 0;
    quant_blocks_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(w), N, K, ld_w,
                                                          static_cast<uint8_t*>(q), ld_q, s, s_r, s_g,
                                                          pow2, vec);
  });
  check_launch("quant_blocks_kernel");
}

void dequant(const void* q, int rows, int cols, int64_t ld_q, const float* s, int64_t s_r,
             int64_t s_g, int block_rows, void* out, DType out_dtype, int64_t ld_out,
             cudaStream_t stream) {
  require_sm90("dequant");
  const int64_t threads = int64_t(rows) * cdiv(cols, 8);
  const unsigned grid = unsigned((threads + kThreads - 1) / kThreads);
  const bool vec_in = reinterpret_cast<uintptr_t>(q) % 8 == 0 && ld_q % 8 == 0;
  const auto* qb = static_cast<const uint8_t*>(q);
  if (out_dtype == DType::kFloat32) {
    const bool vec = vec_in && aligned16<float>(out, ld_out);
    dequant_kernel<float><<<grid, kThreads, 0, stream>>>(qb, rows, cols, ld_q, s, s_r, s_g,
                                                         block_rows, static_cast<float*>(out),
                                                         ld_out, vec);
  } else if (out_dtype == DType::kBFloat16) {
    const bool vec = vec_in && aligned16<__nv_bfloat16>(out, ld_out);
    dequant_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
        qb, rows, cols, ld_q, s, s_r, s_g, block_rows, static_cast<__nv_bfloat16*>(out), ld_out, vec);
  } else {
    throw std::invalid_argument("dequant: out dtype must be float32 or bfloat16");
  }
  check_launch("dequant_kernel");
}

}  // namespace dskernels
