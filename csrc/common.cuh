// Shared host/device helpers for every dskernels kernel: dtype codes, error checks, FP8 casts.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace dskernels {

// Element types crossing the Python boundary, as small integer codes (the Python side maps
// torch dtypes to these; the extension never sees a torch type).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr float kFp8Max = 448.0f;
constexpr float kAmaxFloor = 1e-12f;  // keeps an all-zero tile's scale finite and nonzero
constexpr int kBlock = 128;           // the quantization tile along the reduction dim

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Raise a kernel's launch error (bad config, missing image) as a Python RuntimeError.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

// The extension is compiled for sm_90a alone (dskernels.backend.SUPPORT says the same): refuse any other
// device by name instead of failing at launch.
inline void require_sm90(const char* what) {
  int device = 0, major = 0;
  check_cuda(cudaGetDevice(&device), what);
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), what);
  if (major != 9)
    throw std::runtime_error(std::string(what) + ": dskernels' CUDA kernels are built for sm_90a (compute "
                             "capability 9.x) only; this GPU has " + std::to_string(major) + ".x");
}

__host__ __device__ inline int cdiv(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// scale = amax / 448 (optionally rounded up to a power of two), as single IEEE fp32 operations so
// that every backend computes the same bits. Non-finite amax stays non-finite.
__device__ __forceinline__ float scale_from_amax(float amax, bool pow2) {
  float scale = fmaxf(amax, kAmaxFloor) / kFp8Max;
  if (pow2) {
    // Adding a full mantissa of ones carries into the exponent unless the mantissa is already 0.
    uint32_t bits = (__float_as_uint(scale) + 0x7FFFFFu) & 0x7F800000u;
    scale = __uint_as_float(bits);
  }
  return scale;
}

// Round to nearest even, two values at a time, packed in the low 16 bits. cvt's .satfinite is the
// reference's clamp to +-448 (an infinity included) and keeps a NaN a NaN, so no clamp precedes it.
__device__ __forceinline__ uint16_t to_e4m3x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float e4m3_to_float(uint8_t byte) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(byte, __NV_E4M3);
  return __half2float(__half(h));
}

// Load 8 consecutive elements as fp32; `vec` selects one 16/32-byte access (caller guarantees
// alignment and bounds), otherwise each element is bounds-checked against `n` and read alone.
template <typename T>
__device__ __forceinline__ void load8(const T* p, int n, bool vec, float (&v)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 4) {
      float4 lo = __ldg(reinterpret_cast<const float4*>(p));
      float4 hi = __ldg(reinterpret_cast<const float4*>(p) + 1);
      v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
      v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
    } else {
      uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = i < n ? to_float(p[i]) : 0.0f;
  }
}

}  // namespace dskernels
