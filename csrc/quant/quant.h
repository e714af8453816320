// FP8 (E4M3) quantization kernels: per 1x128 group, transposed per 128x1 group, per 128x128 block,
// and dequantization. Layouts are row-major with explicit leading dimensions (in elements); scale
// tensors take two strides so both the row-major and the MN-major ("TMA-aligned") layouts work.
#pragma once
#include "../common.cuh"

namespace dskernels {

// x [rows, cols] -> q [rows, cols] e4m3 (leading dim ld_q), scale(r, g) at s[r*s_r + g*s_g].
void quant_groups(const void* x, DType x_dtype, int rows, int cols, int64_t ld_x, void* q,
                  int64_t ld_q, float* s, int64_t s_r, int64_t s_g, bool pow2, cudaStream_t stream);

// x [M, K] -> q_t [K, M] e4m3 = quantized x.T, scale(k, g) at s[k*s_r + g*s_g], groups along M.
void quant_groups_transposed(const void* x, DType x_dtype, int M, int K, int64_t ld_x, void* q_t,
                             int64_t ld_q, float* s, int64_t s_r, int64_t s_g, bool pow2,
                             cudaStream_t stream);

// Both of the above from one read of x [M, K]: q [M, K_out] and q_t [K, M_out], byte for byte as
// quant_groups and quant_groups_transposed write them, with zero columns K .. K_out - 1 of q and
// M .. M_out - 1 of q_t (K_out, M_out: up to K, M rounded up to 128; for GEMMs that reduce over them).
void quant_groups_both(const void* x, DType x_dtype, int M, int K, int64_t ld_x, void* q, int64_t ld_q,
                       int K_out, float* s, int64_t s_r, int64_t s_g, void* q_t, int64_t ld_qt, int M_out,
                       float* st, int64_t st_r, int64_t st_g, bool pow2, cudaStream_t stream);

// w [N, K] -> q [N, K] e4m3, scale(nb, kb) at s[nb*s_r + kb*s_g] for 128x128 blocks.
void quant_blocks(const void* w, DType w_dtype, int N, int K, int64_t ld_w, void* q, int64_t ld_q,
                  float* s, int64_t s_r, int64_t s_g, bool pow2, cudaStream_t stream);

// Both of the above for a weight and its transpose from one read of w [N, K]: q [N, K] as quant_blocks
// writes it, q_t [K, N_out] = q^T (the same blocks and scales) with zero columns N .. N_out - 1 (N_out: up
// to N rounded up to 128), and the scales transposed: scale(kb, nb) at st[kb*st_r + nb*st_g].
void quant_blocks_both(const void* w, DType w_dtype, int N, int K, int64_t ld_w, void* q, int64_t ld_q, float* s,
                       int64_t s_r, int64_t s_g, void* q_t, int64_t ld_qt, int N_out, float* st, int64_t st_r,
                       int64_t st_g, bool pow2, cudaStream_t stream);

// q [rows, cols] e4m3 -> out = q * scale(r / block_rows, c / 128) in out_dtype (fp32 or bf16).
void dequant(const void* q, int rows, int cols, int64_t ld_q, const float* s, int64_t s_r,
             int64_t s_g, int block_rows, void* out, DType out_dtype, int64_t ld_out,
             cudaStream_t stream);

}  // namespace dskernels
