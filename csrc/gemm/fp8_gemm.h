// Block-scaled FP8 GEMM for Hopper (sm_90a): out[M, N] = a[M, K] @ b[N, K]^T with DeepSeek-V3 scales.
//
//   out[m, n] = sum_kb ( sum_{k in block kb} a[m, k] * b[n, k] ) * a_scale(m, kb) * b_scale(n, kb)
//
// The tensor cores accumulate one 128-wide K block at a time into a fresh fragment; each partial sum is
// then scaled and added into a separate FP32 register accumulator ("promotion"), because the tensor
// cores' own FP8 accumulator keeps only about 14 bits.
//
// Plain C++ host API: no PyTorch, no pybind11. The caller (dskernels/gemm.py) checks every rule below
// and raises before calling; the function re-checks cheaply and returns cudaErrorInvalidValue instead
// of launching when a rule is broken.
#pragma once

#include <cuda_runtime.h>

namespace dskernels {

// How b_scale is laid out (a_scale is always per 1 x 128 tile of a, MN-major).
enum class ScaleGranularity {
  k1D2D,  // one scale per 128 x 128 block of b (weights): forward and input-gradient GEMMs
  k1D1D,  // one scale per 1 x 128 tile of b along K, MN-major like a_scale: weight-gradient GEMM
};

// How a math warpgroup finishes a tile.
enum class Fp8GemmEpilogue : int {
  // Wait for the tile's last K block, then masked stores straight from registers; the tensor cores
  // idle meanwhile. Every tile shape has it; the small-M picks use it.
  kRegisters = 0,
  // The next tile's first K block is issued to the tensor cores before the same register stores.
  kOverlap = 1,
  // kOverlap, and the tile goes out as bf16 through shared memory (stmatrix) and TMA stores issued by
  // one thread per math warpgroup, which complete while the next tile computes. Only for bf16 `out`
  // with N % 8 == 0 and `out` 16-byte aligned; otherwise this silently runs as kOverlap.
  kTmaStore = 2,
};

// Which compiled kernel runs: the CTA's output tile and its variant. block_m is 64 or 128 (one or two
// math warpgroups of 64 rows); block_n is one of the instantiated widths (see fp8_gemm.cu). cluster_m = 2
// launches clusters of 2 CTAs on vertically adjacent tiles (same columns) that share each B tile through
// TMA multicast (each CTA loads half of it), halving B's L2 -> SM traffic (correct; measured 3-4x slower
// on an H100 because of a GPU-wide fence per K block, since removed, not yet re-measured: not picked). Aggregate initialization with two values ({128, 128}) gives the
// register-epilogue kernel of that tile.
struct Fp8GemmConfig {
  int block_m;
  int block_n;
  Fp8GemmEpilogue epilogue = Fp8GemmEpilogue::kRegisters;
  int cluster_m = 1;
};

// Launches the GEMM on `stream`. Never throws, never synchronizes. Returns cudaSuccess, the launch or
// attribute error, cudaErrorInvalidValue when an argument breaks a rule below, or cudaErrorNotSupported
// when the current device is not compute capability 9.x (or the driver lacks cuTensorMapEncodeTiled).
//
// Arguments (all pointers are device pointers on the current device):
//   a          [M, K] float8_e4m3fn, row-major (row stride K bytes). 16-byte aligned.
//   a_scale    fp32, MN-major: scale of a[m, 128*kb : 128*kb + 128] is a_scale[kb * a_scale_ld + m],
//              kb in [0, K/128). 16-byte aligned.
//   a_scale_ld leading dimension of a_scale: a_scale_ld >= M and a_scale_ld % 4 == 0.
//   b          [N, K] float8_e4m3fn, row-major (row stride K bytes). 16-byte aligned.
//   b_scale    fp32; its layout depends on b_gran:
//                k1D2D: [ceil(N/128), K/128] row-major, scale of b[n, 128*kb ...] is
//                       b_scale[(n / 128) * (K / 128) + kb]. b_scale_ld is ignored. 4-byte aligned.
//                k1D1D: MN-major like a_scale: b_scale[kb * b_scale_ld + n], with b_scale_ld >= N and
//                       b_scale_ld % 4 == 0. 16-byte aligned.
//   out        [M, N] row-major (row stride N elements), bf16 (out_fp32 = false) or fp32 (out_fp32 =
//              true). Any alignment of the element type; N even and 8-byte alignment enable paired stores.
//   accumulate out += result instead of out = result. Requires out_fp32.
//   M, N       >= 1, arbitrary (tails are masked).
//   K          > 0 and K % 128 == 0.
//   num_sms    multiprocessor count of the device (cudaDeviceProp::multiProcessorCount, cached by the
//              caller): the persistent grid has min(num_sms, tiles) CTAs.
//   config     nullptr: use fp8_gemm_pick_config. Otherwise use this one (for tuning and tests); it
//              must be accepted by fp8_gemm_config_supported.
cudaError_t fp8_gemm(const void* a, const float* a_scale, int a_scale_ld, const void* b, const float* b_scale,
                     int b_scale_ld, ScaleGranularity b_gran, void* out, bool out_fp32, bool accumulate, int M, int N,
                     int K, int num_sms, cudaStream_t stream, const Fp8GemmConfig* config = nullptr);

// The config fp8_gemm uses for this problem when config is nullptr: gemm_pick_config (gemm_heuristics.h)
// for the dense layout: the candidate tile shape with the least estimated time (waves of tiles times the
// slower of a tile's tensor-core and load time), then the variant from the rule table in
// gemm_heuristics.cu (1D2D with a 128-row tile: kTmaStore, measured faster on every DeepSeek-V3 shape).
Fp8GemmConfig fp8_gemm_pick_config(int M, int N, int K, ScaleGranularity b_gran, int num_sms);

// Whether this exact config (tile shape, epilogue, cluster_m) is compiled for this granularity.
bool fp8_gemm_config_supported(Fp8GemmConfig config, ScaleGranularity b_gran);

// Writes up to `capacity` supported configs of this granularity into `configs` (may be nullptr when
// capacity is 0) and returns how many exist, the register-epilogue kernels first. For tests and tuning sweeps.
int fp8_gemm_list_configs(ScaleGranularity b_gran, Fp8GemmConfig* configs, int capacity);

}  // namespace dskernels
