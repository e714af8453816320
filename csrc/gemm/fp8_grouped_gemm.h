// Grouped FP8 GEMMs for mixture-of-experts layers on Hopper (sm_90a), as DeepGEMM's: the dense kernel's
// mainloop (FP32 promotion every 128 K, fp8_gemm.h) with a tile scheduler per layout
// (fp8_gemm_kernel.cuh). The numerics are the dense GEMM's per expert.
//
// Plain C++ host API, like fp8_gemm.h: the caller (dskernels/grouped_gemm.py) checks every rule and
// raises first; these return cudaErrorInvalidValue instead of launching when a rule is broken,
// cudaErrorNotSupported off compute capability 9.x. Never throw, never synchronize: the per-row and
// per-group arrays are read on the device, so every form is CUDA-graph capturable with their contents
// changing between replays.
//
// Common arguments: b [G, N, K] e4m3 row-major (16-byte aligned), b_scale [G, ceil(N/128), K/128] fp32
// row-major (per 128 x 128 block of each expert); K % 128 == 0; N >= 1 (tails masked); out bf16
// row-major, 2-byte aligned (TMA stores when N % 8 == 0 and out is 16-byte aligned, else register
// stores); a, a_scale 16-byte aligned, b_scale 4; num_sms as in fp8_gemm.h; config nullptr
// (gemm_pick_config) or one that fp8_grouped_gemm_config_supported accepts.
#pragma once

#include <cuda_runtime.h>

#include "fp8_gemm.h"

namespace dskernels {

// The row multiple each expert's segment of a contiguous layout starts at.
constexpr int kContiguousAlignment = 128;

// Contiguous layout (prefill, training): a [M, K] e4m3, a_scale MN-major (a_scale[kb * a_scale_ld + m],
// a_scale_ld >= M, % 4 == 0), m_indices [M] int32: row m's expert, -1 for padding; expert e's rows form
// one segment starting at a multiple of kContiguousAlignment. out [M, N]: row m = a[m] @ b[m_indices[m]]^T.
// A segment's expert is the largest valid id among its 128 rows; rows of padding are never written, rows
// whose id is neither -1 nor the segment's expert are written NaN.
cudaError_t fp8_m_grouped_gemm_contiguous(const void* a, const float* a_scale, int a_scale_ld, const void* b,
                                          const float* b_scale, const int* m_indices, void* out, int M, int N, int K,
                                          int G, int num_sms, cudaStream_t stream,
                                          const Fp8GemmConfig* config = nullptr);

// Masked layout (decode): a [G, M_max, K] e4m3, masked_m [G] int32: expert g's valid rows (clamped to
// [0, M_max]); out [G, M_max, N], rows at or past masked_m[g] never written. a_scale: scale of
// a[g, m, 128 kb ...] at a_scale[g * a_scale_gs + kb * a_scale_ld + m]: a_scale_gs == M_max with
// a_scale_ld >= G * M_max (one MN-major array over the G * M_max rows), or a_scale_ld >= M_max and
// a_scale_gs >= a_scale_ld * K / 128 (MN-major per expert); a_scale_ld and a_scale_gs % 4 == 0.
// expected_m: about how many rows an expert has (a tuning hint, never a bound).
cudaError_t fp8_m_grouped_gemm_masked(const void* a, const float* a_scale, int a_scale_ld, long long a_scale_gs,
                                      const void* b, const float* b_scale, const int* masked_m, void* out, int M_max,
                                      int N, int K, int G, int expected_m, int num_sms, cudaStream_t stream,
                                      const Fp8GemmConfig* config = nullptr);

// K-grouped weight gradient: out[g] [M, N] fp32 (+)= a[:, seg_g] @ b[:, seg_g]^T, seg_g = [k_offsets[g],
// k_offsets[g + 1]) (k_offsets [G + 1] int32; every segment a multiple of 128 inside [0, K_total], zero
// allowed). a [M, K_total], b [N, K_total] e4m3 row-major; a_scale and b_scale 1 x 128 along K, MN-major
// (a_scale[kb * a_scale_ld + m], b_scale[kb * b_scale_ld + n], ld >= rows, % 4 == 0). A group whose
// segment breaks the rule is written NaN; with accumulate, a group with no tokens is left as it was.
// M, N >= 1, any (tails masked); out 4-byte aligned.
cudaError_t fp8_k_grouped_gemm(const void* a, const float* a_scale, int a_scale_ld, const void* b,
                               const float* b_scale, int b_scale_ld, const int* k_offsets, float* out, bool accumulate,
                               int M, int N, int K_total, int G, int num_sms, cudaStream_t stream,
                               const Fp8GemmConfig* config = nullptr);

// Which grouped layout a config is compiled for: 0 contiguous, 1 masked, 2 k-grouped (for tests).
bool fp8_grouped_gemm_config_supported(int layout, Fp8GemmConfig config);

}  // namespace dskernels
