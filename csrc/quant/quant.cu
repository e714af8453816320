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

// Quantize 8 values with a tile's inverse scale and store them as 8 bytes (or byte by byte at a tail).
__device__ __forceinline__ void store8_e4m3(uint8_t* q, const float (&v)[8], float inv, int n,
                                            bool vec) {
  uint16_t p[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) p[i] = to_e4m3x2(v[2 * i] * inv, v[2 * i + 1] * inv);
  if (vec) {
    *reinterpret_cast<uint2*>(q) = make_uint2(p[0] | (uint32_t(p[1]) << 16),
                                              p[2] | (uint32_t(p[3]) << 16));
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
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
  if (n > 0) store8_e4m3(q + r * ld_q + c, v, 1.0f / scale, n, vec);
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
// A CTA owns a 128 (M) x 128 (K) tile. Phase 1: 16 lanes per row group of 128, 16 rows per pass, 8
// passes, with every pass's 16-byte loads issued before the first is used (kAhead; fp32, twice the
// registers per pass, in two halves of 4 passes: the kernel needs many bytes in flight, and phase 2
// issues no loads); each row group is quantized from
// registers (kBoth), and the raw input values are staged in shared memory in the input type (exact).
// (kBlock: the CTA's amax, then the rows quantized from the staged tile.) Phase 2: each warp quantizes
// whole columns; lane l reads rows l, l + 32, l + 64 and l + 96, which the staging's odd number of
// 4-byte words per row puts in 32 different banks (2-byte types read two columns per word), and stores
// their bytes (each store instruction covers 32 consecutive bytes).
template <typename T>
struct Raw8 {
  alignas(16) T e[8];
};

template <typename T>
__device__ __forceinline__ void load_raw8(const T* p, int n, bool vec, Raw8<T>& r) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(r.e)[0] = __ldg(reinterpret_cast<const float4*>(p));
      reinterpret_cast<float4*>(r.e)[1] = __ldg(reinterpret_cast<const float4*>(p) + 1);
    } else {
      *reinterpret_cast<uint4*>(r.e) = __ldg(reinterpret_cast<const uint4*>(p));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) r.e[i] = i < n ? p[i] : static_cast<T>(0.0f);
  }
}

template <typename T>
__host__ __device__ constexpr int stage_stride() {  // elements per staged row: an odd number of 4-byte words
  return sizeof(T) == 2 ? kBlock + 2 : kBlock + 1;
}

template <typename T>
__host__ __device__ constexpr int cols_smem_bytes() { return kBlock * stage_stride<T>() * int(sizeof(T)); }

// One column held as rows lane + 32j (j < 4) of a 128-row group, quantized with `inv` (1 / its scale) into
// dst[m] for row m of the group, m < n (each store instruction covers 32 consecutive bytes).
__device__ __forceinline__ void store_column(const float (&v)[4], int lane, uint8_t* dst, int n, float inv) {
  const uint32_t packed = to_e4m3x2(v[0] * inv, v[1] * inv) | (uint32_t(to_e4m3x2(v[2] * inv, v[3] * inv)) << 16);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (lane + 32 * j < n) dst[lane + 32 * j] = uint8_t(packed >> (8 * j));
}

// The same column quantized as its own 128 x 1 group: its scale from its amax (stored by lane 0).
__device__ __forceinline__ void quant_column(const float (&v)[4], int lane, uint8_t* dst, int n, float* scale_dst,
                                             bool pow2) {
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(v[j]));
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = scale_from_amax(amax, pow2);
  store_column(v, lane, dst, n, 1.0f / scale);
  if (lane == 0) *scale_dst = scale;
}

// What quant_tile_kernel writes besides q_t (see above): nothing (the transposed op), q with 1 x 128
// group scales (both), or q with the tile's single 128 x 128 block scale, which q_t then shares (a weight
// and its transpose, for a Linear layer's forward and input gradient).
enum class TileMode { kColumns, kBoth, kBlock };

template <typename T, TileMode kMode>
__global__ void __launch_bounds__(kThreads) quant_tile_kernel(
    const T* __restrict__ x, int M, int K, int64_t ld_x, uint8_t* __restrict__ q, int64_t ld_q, int K_out,
    float* __restrict__ s, int64_t s_r, int64_t s_g, uint8_t* __restrict__ q_t, int64_t ld_qt, int M_out,
    float* __restrict__ st, int64_t st_r, int64_t st_g, bool pow2, bool vec_in, bool vec_q) {
  constexpr int S = stage_stride<T>();
  constexpr int kPasses = kBlock / kGroupsPerCta;
  constexpr int kAhead = sizeof(T) == 2 ? kPasses : kPasses / 2;  // 16-byte loads in flight per thread
  extern __shared__ __align__(16) uint8_t tile_smem[];
  T* tile = reinterpret_cast<T*>(tile_smem);  // [kBlock][S]
  __shared__ float warp_amax[kThreads / 32];  // kBlock: the block's amax, per warp
  const int m0 = blockIdx.y * kBlock, k0 = blockIdx.x * kBlock;
  const int lane16 = threadIdx.x % kLanesPerGroup, row0 = threadIdx.x / kLanesPerGroup;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int cl = lane16 * 8, c = k0 + cl;
  const int n_in = K - c, n_out = K_out - c;  // elements of x / of q's row from c on (may be <= 0)
  float block_amax = 0.0f;
#pragma unroll
  for (int p0 = 0; p0 < kPasses; p0 += kAhead) {
    Raw8<T> raw[kAhead];
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {  // rows past M (and columns past K) load as zeros
      const int m = m0 + row0 + (p0 + i) * kGroupsPerCta;
      const bool row = m < M;
      load_raw8(x + int64_t(row ? m : 0) * ld_x + c, row ? n_in : 0, vec_in && row && n_in >= 8, raw[i]);
    }
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int rr = row0 + (p0 + i) * kGroupsPerCta, m = m0 + rr;
      float v[8], amax = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[e] = to_float(raw[i].e[e]);
        amax = fmaxf(amax, fabsf(v[e]));  // fmaxf skips NaN, as specified
      }
      if constexpr (kMode == TileMode::kBoth) {
#pragma unroll
        for (int off = kLanesPerGroup / 2; off > 0; off /= 2)
          amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        const float scale = scale_from_amax(amax, pow2);
        if (m < M && n_out > 0) store8_e4m3(q + int64_t(m) * ld_q + c, v, 1.0f / scale, n_out, vec_q && n_out >= 8);
        if (m < M && lane16 == 0) s[int64_t(m) * s_r + blockIdx.x * s_g] = scale;
      }
      block_amax = fmaxf(block_amax, amax);
      // Row rr starts 4-byte aligned (S * sizeof(T) is a multiple of 4), not 16-byte aligned.
      uint32_t* dst = reinterpret_cast<uint32_t*>(tile + rr * S + cl);
#pragma unroll
      for (int w = 0; w < int(8 * sizeof(T) / 4); ++w) dst[w] = reinterpret_cast<const uint32_t*>(raw[i].e)[w];
    }
  }
  float block_inv = 0.0f;
  if constexpr (kMode == TileMode::kBlock) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) block_amax = fmaxf(block_amax, __shfl_xor_sync(0xffffffffu, block_amax, off));
    if (lane == 0) warp_amax[warp] = block_amax;
  }
  __syncthreads();
  if constexpr (kMode == TileMode::kBlock) {
#pragma unroll
    for (int i = 0; i < kThreads / 32; ++i) block_amax = fmaxf(block_amax, warp_amax[i]);
    const float scale = scale_from_amax(block_amax, pow2);
    block_inv = 1.0f / scale;
    if (threadIdx.x == 0) {
      s[blockIdx.y * s_r + blockIdx.x * s_g] = scale;
      st[blockIdx.x * st_r + blockIdx.y * st_g] = scale;
    }
    // The rows, from the staged tile, with the block's scale.
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int rr = row0 + p * kGroupsPerCta, m = m0 + rr;
      if (m >= M || n_out <= 0) continue;
      Raw8<T> raw;
#pragma unroll
      for (int w = 0; w < int(8 * sizeof(T) / 4); ++w)
        reinterpret_cast<uint32_t*>(raw.e)[w] = reinterpret_cast<const uint32_t*>(tile + rr * S + cl)[w];
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = to_float(raw.e[e]);
      store8_e4m3(q + int64_t(m) * ld_q + c, v, block_inv, n_out, vec_q && n_out >= 8);
    }
  }

  constexpr int kCols = sizeof(T) == 2 ? 2 : 1;  // columns per 4-byte word
  for (int kk = kCols * warp; kk < kBlock; kk += kCols * (kThreads / 32)) {
    const int k = k0 + kk;
    if (k >= K) break;
    float v[kCols][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (kCols == 2) {  // one 4-byte word: columns kk and kk + 1 (kk even)
        const uint32_t w = *reinterpret_cast<const uint32_t*>(tile + (lane + 32 * j) * S + kk);
        const T* pair = reinterpret_cast<const T*>(&w);
        v[0][j] = to_float(pair[0]);
        v[1][j] = to_float(pair[1]);
      } else {
        v[0][j] = tile[(lane + 32 * j) * S + kk];
      }
    }
#pragma unroll
    for (int cc = 0; cc < kCols; ++cc) {
      if (k + cc >= K) continue;
      uint8_t* dst = q_t + int64_t(k + cc) * ld_qt + m0;
      if constexpr (kMode == TileMode::kBlock)
        store_column(v[cc], lane, dst, M_out - m0, block_inv);
      else
        quant_column(v[cc], lane, dst, M_out - m0, st + int64_t(k + cc) * st_r + blockIdx.y * st_g, pow2);
    }
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
    if (r < N && n > 0) store8_e4m3(q + int64_t(r) * ld_q + c, v[p], inv, n, vec);
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
  const bool vec_q = reinterpret_cast<uintptr_t>(q) % 8 == 0 && ld_q % 8 == 0;
  dispatch_input(x_dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    constexpr int smem = cols_smem_bytes<T>();
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
                                             st_g, pow2, aligned16<T>(x, ld_x), vec_q);
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
