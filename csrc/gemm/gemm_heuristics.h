// Heuristics of the FP8 GEMMs, kept apart from the kernels: which compiled config (tile shape, epilogue,
// cluster) runs a problem of each layout. gemm_heuristics.cu holds the cost model, the candidate tiles of
// every layout and the variant rules; the kernel files (fp8_gemm.cu, fp8_grouped_gemm.cu) compile exactly
// the configs these can choose (and the dense sweep's extra variants).
#pragma once

#include "fp8_gemm.h"

namespace dskernels {

// How the rows of a GEMM are organised (the tile scheduler of fp8_gemm_kernel.cuh).
enum class GemmLayout : int {
  kDense = 0,       // out[M, N] = a[M, K] @ b[N, K]^T
  kContiguous = 1,  // rows of experts in 128-aligned segments, each row's expert in m_indices
  kMasked = 2,      // a [G, M_max, K]: expert g's first masked_m[g] rows
  kKGrouped = 3,    // out[g] [M, N] (+)= a[:, seg_g] @ b[:, seg_g]^T over ragged K segments
};

// What the heuristics see of a problem: rows is the dense M, the contiguous M_total, the masked
// expected rows per expert (a hint) or the k-grouped M; groups is G (1 dense).
struct GemmShape {
  GemmLayout layout;
  ScaleGranularity gran;
  int rows, N, K, groups;
};

// The config for this problem: the candidate tile with the least estimated time (waves of tiles times
// the slower of a tile's tensor-core and load time per K block), then the first variant rule that
// applies. A .cu file that launches a layout compiles every config this can return for it.
Fp8GemmConfig gemm_pick_config(const GemmShape& shape, int num_sms);

// The tile shapes the cost model chooses among for this layout and granularity (register-epilogue,
// cluster 1 configs): writes up to capacity of them, returns how many exist.
int gemm_candidate_tiles(GemmLayout layout, ScaleGranularity gran, Fp8GemmConfig* tiles, int capacity);

}  // namespace dskernels
