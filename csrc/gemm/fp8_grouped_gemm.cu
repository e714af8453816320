// Grouped FP8 GEMMs (fp8_grouped_gemm.h): the instantiations of the shared mainloop
// (fp8_gemm_kernel.cuh) for the contiguous, masked and k-grouped layouts, exactly the configs
// gemm_heuristics.cu can choose for them, and the host entry points.
#include "fp8_grouped_gemm.h"

#include "fp8_gemm_kernel.cuh"

namespace dskernels {
namespace {

constexpr GemmLayout kContig = GemmLayout::kContiguous;
constexpr GemmLayout kMask = GemmLayout::kMasked;
constexpr GemmLayout kKGroup = GemmLayout::kKGrouped;

// 64-row tiles with the register epilogue, 128-row ones with the TMA-store epilogue (gemm_heuristics.cu;
// the k-grouped 128 x 128 also with registers, for the tests' forced configs and the tuning).
constexpr ConfigEntry kConfigs[] = {
    kernel_entry<64, 64, false, false, 1, kContig>(),
    kernel_entry<64, 128, false, false, 1, kContig>(),
    kernel_entry<128, 64, false, true, 1, kContig>(),
    kernel_entry<128, 128, false, true, 1, kContig>(),
    kernel_entry<64, 64, false, false, 1, kMask>(),
    kernel_entry<64, 128, false, false, 1, kMask>(),
    kernel_entry<128, 64, false, true, 1, kMask>(),
    kernel_entry<128, 128, false, true, 1, kMask>(),
    kernel_entry<64, 128, true, false, 1, kKGroup>(),
    kernel_entry<128, 128, true, false, 1, kKGroup>(),
    kernel_entry<128, 128, true, true, 1, kKGroup>(),
};

const GemmLayout kLayouts[] = {kContig, kMask, kKGroup};

// Picks (or checks) the config and launches it.
cudaError_t run(Problem& q, const GemmShape& shape, const Fp8GemmConfig* config) {
  const cudaError_t err = current_sm90_device(&q.device);
  if (err != cudaSuccess) return err;
  const Fp8GemmConfig chosen = config != nullptr ? *config : gemm_pick_config(shape, q.num_sms);
  const ConfigEntry* entry = find_config(kConfigs, chosen, shape.gran, shape.layout);
  if (entry == nullptr) return cudaErrorInvalidValue;
  q.tma_store = chosen.epilogue == Fp8GemmEpilogue::kTmaStore;
  return entry->launch(q);
}

bool valid_common(const void* a, const float* a_scale, const void* b, const float* b_scale, const void* rows,
                  const void* out, int N, int K, int G, int num_sms) {
  return N >= 1 && K >= kBlockK && K % kBlockK == 0 && G >= 1 && num_sms >= 1 && rows != nullptr &&
         is_valid_alignment(a, 16) && is_valid_alignment(b, 16) && is_valid_alignment(a_scale, 16) &&
         is_valid_alignment(b_scale, 4) && is_valid_alignment(out, 2);
}

}  // namespace

cudaError_t fp8_m_grouped_gemm_contiguous(const void* a, const float* a_scale, int a_scale_ld, const void* b,
                                          const float* b_scale, const int* m_indices, void* out, int M, int N, int K,
                                          int G, int num_sms, cudaStream_t stream, const Fp8GemmConfig* config) {
  if (M < 1 || !valid_common(a, a_scale, b, b_scale, m_indices, out, N, K, G, num_sms)) return cudaErrorInvalidValue;
  if (a_scale_ld < M || a_scale_ld % 4 != 0) return cudaErrorInvalidValue;
  Problem q{a, a_scale, a_scale_ld, b, b_scale, 0, out, false, false, M, N, K, num_sms, stream, false, 0};
  q.layout = kContig;
  q.rows = m_indices;
  q.G = G;
  return run(q, GemmShape{kContig, ScaleGranularity::k1D2D, M, N, K, G}, config);
}

cudaError_t fp8_m_grouped_gemm_masked(const void* a, const float* a_scale, int a_scale_ld, long long a_scale_gs,
                                      const void* b, const float* b_scale, const int* masked_m, void* out, int M_max,
                                      int N, int K, int G, int expected_m, int num_sms, cudaStream_t stream,
                                      const Fp8GemmConfig* config) {
  if (M_max < 1 || expected_m < 0 || !valid_common(a, a_scale, b, b_scale, masked_m, out, N, K, G, num_sms))
    return cudaErrorInvalidValue;
  const bool flat = a_scale_gs == M_max;
  if (a_scale_ld % 4 != 0 || a_scale_gs % 4 != 0 && !flat) return cudaErrorInvalidValue;
  if (flat ? static_cast<long long>(a_scale_ld) < static_cast<long long>(G) * M_max
           : a_scale_ld < M_max || a_scale_gs < static_cast<long long>(a_scale_ld) * (K / kBlockK))
    return cudaErrorInvalidValue;
  constexpr long long kIntMax = std::numeric_limits<int>::max();
  if (static_cast<long long>(G) * M_max > kIntMax || a_scale_gs > kIntMax)
    return cudaErrorInvalidValue;
  Problem q{a, a_scale, a_scale_ld, b, b_scale, 0, out, false, false, M_max, N, K, num_sms, stream, false, 0};
  q.layout = kMask;
  q.rows = masked_m;
  q.G = G;
  q.a_scale_gs = static_cast<int>(a_scale_gs);
  return run(q, GemmShape{kMask, ScaleGranularity::k1D2D, std::min(std::max(expected_m, 1), M_max), N, K, G}, config);
}

cudaError_t fp8_k_grouped_gemm(const void* a, const float* a_scale, int a_scale_ld, const void* b,
                               const float* b_scale, int b_scale_ld, const int* k_offsets, float* out, bool accumulate,
                               int M, int N, int K_total, int G, int num_sms, cudaStream_t stream,
                               const Fp8GemmConfig* config) {
  if (M < 1 || !valid_common(a, a_scale, b, b_scale, k_offsets, out, N, K_total, G, num_sms) ||
      !is_valid_alignment(b_scale, 16) || !is_valid_alignment(out, 4))
    return cudaErrorInvalidValue;
  if (a_scale_ld < M || a_scale_ld % 4 != 0 || b_scale_ld < N || b_scale_ld % 4 != 0) return cudaErrorInvalidValue;
  Problem q{a, a_scale, a_scale_ld, b, b_scale, b_scale_ld, out, true, accumulate, M, N, K_total, num_sms, stream,
            false, 0};
  q.layout = kKGroup;
  q.rows = k_offsets;
  q.G = G;
  // (the cost model's K: an average group's; it scales every candidate alike)
  return run(q, GemmShape{kKGroup, ScaleGranularity::k1D1D, M, N, K_total / G, G}, config);
}

bool fp8_grouped_gemm_config_supported(int layout, Fp8GemmConfig config) {
  if (layout < 0 || layout > 2) return false;
  const GemmLayout l = kLayouts[layout];
  return find_config(kConfigs, config, l == kKGroup ? ScaleGranularity::k1D1D : ScaleGranularity::k1D2D, l) != nullptr;
}

}  // namespace dskernels
