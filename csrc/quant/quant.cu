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

// One column of a staged fp32 tile (row stride kStride, column pointer `col`) quantized as a 128 x 1
// group: lane l holds rows 4l .. 4l + 3 and stores them as one 4-byte word at dst + 4l (byte by byte where
// fewer than 4 of the n columns left remain, or without `vec` alignment); lane 0 stores the scale.
template <int kStride>
__device__ __forceinline__ void quant_column(const float* col, int lane, uint8_t* dst, int n, bool vec,
                                             float* scale_dst, bool pow2) {
  float v[4], amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[i] = col[(lane * 4 + i) * kStride];
    amax = fmaxf(amax, fabsf(v[i]));
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = scale_from_amax(amax, pow2), inv = 1.0f / scale;
  const uint32_t packed = to_e4m3x2(v[0] * inv, v[1] * inv) | (uint32_t(to_e4m3x2(v[2] * inv, v[3] * inv)) << 16);
  const int m = lane * 4;
  if (vec && m + 4 <= n) {
    *reinterpret_cast<uint32_t*>(dst + m) = packed;
  } else {
    for (int i = 0; i < 4 && m + i < n; ++i) dst[m + i] = uint8_t(packed >> (8 * i));
  }
  if (lane == 0) *scale_dst = scale;
}

// x [M, K] -> q_t [K, M]. A CTA stages a 128 (M) x 64 (K) tile in shared memory (loads coalesced
// along K), then each warp quantizes whole columns: 128 M-values per column, 4 per lane, stored as
// one 4-byte word per lane (coalesced along M).
constexpr int kTileK = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads) quant_groups_transposed_kernel(
    const T* __restrict__ x, int M, int K, int64_t ld_x, uint8_t* __restrict__ q_t, int64_t ld_q,
    float* __restrict__ s, int64_t s_r, int64_t s_g, bool pow2, bool vec_in, bool vec_out) {
  __shared__ float tile[kBlock][kTileK + 1];  // +1: column reads hit 32 different banks
  const int m0 = blockIdx.y * kBlock, k0 = blockIdx.x * kTileK;
  const int col8 = threadIdx.x % (kTileK / 8), row = threadIdx.x / (kTileK / 8);  // 8 x 32 threads
  for (int rr = row; rr < kBlock; rr += kThreads / (kTileK / 8)) {
    float v[8];
    const int m = m0 + rr, k = k0 + col8 * 8;
    const int n = m < M ? K - k : 0;
    load8(x + int64_t(m < M ? m : 0) * ld_x + k, n, vec_in && n >= 8, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) tile[rr][col8 * 8 + i] = v[i];
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int kk = warp; kk < kTileK; kk += kThreads / 32) {
    const int k = k0 + kk;
    if (k >= K) break;
    quant_column<kTileK + 1>(&tile[0][0] + kk, lane, q_t + int64_t(k) * ld_q + m0, M - m0, vec_out,
                             s + int64_t(k) * s_r + blockIdx.y * s_g, pow2);
  }
}

// Both quantizations of an activation from one read of x [M, K], for a layer's forward and its weight
// gradient: q [M, K_out] as quant_groups_kernel writes it and q_t [K, M_out] as
// quant_groups_transposed_kernel does, byte for byte, each optionally zero-padded along its contiguous
// dim (columns K .. K_out - 1 of q and M .. M_out - 1 of q_t are zero; each pad is below 128, so no
// group's amax changes). A CTA owns a 128 (M) x 128 (K) tile: 16 lanes quantize a row's group from
// registers (16 rows a pass, 8 passes) and stage the values in shared memory; then each warp
// quantizes whole columns from there, as the transposed kernel does.
constexpr int kTileStride = kBlock + 1;  // +1: the column pass's reads spread over the banks
constexpr int kBothSmem = kBlock * kTileStride * int(sizeof(float));

template <typename T>
__global__ void __launch_bounds__(kThreads) quant_groups_both_kernel(
    const T* __restrict__ x, int M, int K, int64_t ld_x, uint8_t* __restrict__ q, int64_t ld_q, int K_out,
    float* __restrict__ s, int64_t s_r, int64_t s_g, uint8_t* __restrict__ q_t, int64_t ld_qt, int M_out,
    float* __restrict__ st, int64_t st_r, int64_t st_g, bool pow2, bool vec_in, bool vec_q, bool vec_qt) {
  extern __shared__ float tile[];  // [kBlock][kTileStride]
  const int m0 = blockIdx.y * kBlock, k0 = blockIdx.x * kBlock;
  const int lane16 = threadIdx.x % kLanesPerGroup, row0 = threadIdx.x / kLanesPerGroup;
  const int cl = lane16 * 8, c = k0 + cl;
  const int n_in = K - c, n_out = K_out - c;  // elements of x / of q's row from c on (may be <= 0)
#pragma unroll 4
  for (int p = 0; p < kBlock / kGroupsPerCta; ++p) {
    const int rr = row0 + p * kGroupsPerCta, m = m0 + rr;
    const bool row = m < M;
    float v[8];
    load8(x + int64_t(row ? m : 0) * ld_x + c, row ? n_in : 0, vec_in && row && n_in >= 8, v);
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int off = kLanesPerGroup / 2; off > 0; off /= 2)
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    const float scale = scale_from_amax(amax, pow2);
    if (row && n_out > 0) store8_e4m3(q + int64_t(m) * ld_q + c, v, 1.0f / scale, n_out, vec_q && n_out >= 8);
    if (row && lane16 == 0) s[int64_t(m) * s_r + blockIdx.x * s_g] = scale;
#pragma unroll
    for (int i = 0; i < 8; ++i) tile[rr * kTileStride + cl + i] = v[i];  // zeros past M and K
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int kk = warp; kk < kBlock; kk += kThreads / 32) {
    const int k = k0 + kk;
    if (k >= K) break;
    quant_column<kTileStride>(tile + kk, lane, q_t + int64_t(k) * ld_qt + m0, M_out - m0, vec_qt,
                              st + int64_t(k) * st_r + blockIdx.y * st_g, pow2);
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

void quant_groups_transposed(const void* x, DType x_dtype, int M, int K, int64_t ld_x, void* q_t,
                             int64_t ld_q, float* s, int64_t s_r, int64_t s_g, bool pow2,
                             cudaStream_t stream) {
  require_sm90("quant_groups_transposed");
  const dim3 grid(cdiv(K, kTileK), cdiv(M, kBlock));
  const bool vec_out = reinterpret_cast<uintptr_t>(q_t) % 4 == 0 && ld_q % 4 == 0;
  dispatch_input(x_dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    quant_groups_transposed_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(x), M, K, ld_x, static_cast<uint8_t*>(q_t), ld_q, s, s_r, s_g, pow2,
        aligned16<T>(x, ld_x), vec_out);
  });
  check_launch("quant_groups_transposed_kernel");
}

void quant_groups_both(const void* x, DType x_dtype, int M, int K, int64_t ld_x, void* q, int64_t ld_q,
                       int K_out, float* s, int64_t s_r, int64_t s_g, void* q_t, int64_t ld_qt, int M_out,
                       float* st, int64_t st_r, int64_t st_g, bool pow2, cudaStream_t stream) {
  require_sm90("quant_groups_both");
  if (M < 1 || K < 1 || K_out < K || K_out > cdiv(K, kBlock) * kBlock || M_out < M ||
      M_out > cdiv(M, kBlock) * kBlock || ld_q < K_out || ld_qt < M_out)
    throw std::invalid_argument("quant_groups_both: K <= K_out <= K rounded up to 128, M <= M_out <= M rounded "
                                "up to 128, ld_q >= K_out and ld_qt >= M_out");
  if (cdiv(M, kBlock) > 65535) throw std::invalid_argument("quant_groups_both: more than 65535 * 128 rows");
  int device = 0;
  check_cuda(cudaGetDevice(&device), "quant_groups_both");
  const dim3 grid(cdiv(K, kBlock), cdiv(M, kBlock));
  const bool vec_q = reinterpret_cast<uintptr_t>(q) % 8 == 0 && ld_q % 8 == 0;
  const bool vec_qt = reinterpret_cast<uintptr_t>(q_t) % 4 == 0 && ld_qt % 4 == 0;
  dispatch_input(x_dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    // 66 KB of shared memory: above the default 48 KB, so opted into once per device and element type.
    static std::atomic<uint64_t> opted{0};
    const uint64_t bit = uint64_t(1) << (device % 64);
    if (!(opted.load() & bit)) {
      check_cuda(cudaFuncSetAttribute(quant_groups_both_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      kBothSmem), "quant_groups_both");
      opted |= bit;
    }
    quant_groups_both_kernel<T><<<grid, kThreads, kBothSmem, stream>>>(
        static_cast<const T*>(x), M, K, ld_x, static_cast<uint8_t*>(q), ld_q, K_out, s, s_r, s_g,
        static_cast<uint8_t*>(q_t), ld_qt, M_out, st, st_r, st_g, pow2, aligned16<T>(x, ld_x), vec_q, vec_qt);
  });
  check_launch("quant_groups_both_kernel");
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
