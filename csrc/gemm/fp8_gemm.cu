// The dense FP8 GEMM (fp8_gemm.h): the instantiations of the shared mainloop (fp8_gemm_kernel.cuh) for
// the dense layout, every config gemm_heuristics.cu chooses among plus the variants the tuning sweeps time,
// and the host entry points. Design notes and measurements: NOTES.md beside this file.
#include "fp8_gemm.h"

#include "fp8_gemm_kernel.cuh"

namespace dskernels {
namespace {

// The compiled dense kernels: every tile shape gemm_heuristics.cu's cost model chooses among (register
// epilogue), then the large-M variants (overlapped / TMA-store epilogue, 2-CTA B multicast), which only
// its rule table selects and the tuning sweeps (fp8_gemm_selftest) time.
constexpr ConfigEntry kConfigs[] = {
    // Register-epilogue kernels: the tile-shape heuristic chooses among these.
    kernel_entry<64, 16, false>(),
    kernel_entry<64, 32, false>(),
    kernel_entry<64, 64, false>(),
    kernel_entry<64, 128, false>(),
    kernel_entry<128, 64, false>(),
    kernel_entry<128, 128, false>(),
    kernel_entry<128, 144, false>(),
    kernel_entry<64, 128, true>(),
    kernel_entry<128, 128, true>(),
    // Variants (all pass the self-test on an H100; the rule table below selects among them).
    kernel_entry<128, 64, false, true, 1>(),
    kernel_entry<128, 64, false, true, 2>(),
    kernel_entry<128, 128, false, false, 2>(),
    kernel_entry<128, 128, false, true, 1>(),
    kernel_entry<128, 128, false, true, 2>(),
    kernel_entry<128, 144, false, true, 1>(),
    kernel_entry<128, 144, false, true, 2>(),
    kernel_entry<128, 128, true, true, 1>(),
    kernel_entry<128, 128, true, true, 2>(),
};

const ConfigEntry* find_dense(Fp8GemmConfig c, ScaleGranularity gran) {
  return find_config(kConfigs, c, gran, GemmLayout::kDense);
}

}  // namespace

bool fp8_gemm_config_supported(Fp8GemmConfig config, ScaleGranularity b_gran) {
  return find_dense(config, b_gran) != nullptr;
}

int fp8_gemm_list_configs(ScaleGranularity b_gran, Fp8GemmConfig* configs, int capacity) {
  int n = 0;
  auto add = [&](const ConfigEntry& e, Fp8GemmEpilogue epilogue) {
    if (n < capacity && configs != nullptr) configs[n] = Fp8GemmConfig{e.block_m, e.block_n, epilogue, e.cluster_m};
    ++n;
  };
  for (const ConfigEntry& e : kConfigs) {
    if (e.gran != b_gran) continue;
    if (!e.overlap) {
      add(e, Fp8GemmEpilogue::kRegisters);
    } else {
      add(e, Fp8GemmEpilogue::kOverlap);
      add(e, Fp8GemmEpilogue::kTmaStore);
    }
  }
  return n;
}

cudaError_t fp8_gemm(const void* a, const float* a_scale, int a_scale_ld, const void* b, const float* b_scale,
                     int b_scale_ld, ScaleGranularity b_gran, void* out, bool out_fp32, bool accumulate, int M, int N,
                     int K, int num_sms, cudaStream_t stream, const Fp8GemmConfig* config) {
  const bool per_row = b_gran == ScaleGranularity::k1D1D;
  if (M < 1 || N < 1 || K < kBlockK || K % kBlockK != 0 || num_sms < 1) return cudaErrorInvalidValue;
  if (a_scale_ld < M || a_scale_ld % 4 != 0) return cudaErrorInvalidValue;
  if (per_row && (b_scale_ld < N || b_scale_ld % 4 != 0)) return cudaErrorInvalidValue;
  if (accumulate && !out_fp32) return cudaErrorInvalidValue;
  if (!is_valid_alignment(a, 16) || !is_valid_alignment(b, 16) || !is_valid_alignment(a_scale, 16) ||
      !is_valid_alignment(b_scale, per_row ? 16 : 4) || !is_valid_alignment(out, out_fp32 ? 4 : 2))
    return cudaErrorInvalidValue;

  int device = 0;
  const cudaError_t err = current_sm90_device(&device);
  if (err != cudaSuccess) return err;

  const Fp8GemmConfig chosen = config != nullptr ? *config : fp8_gemm_pick_config(M, N, K, b_gran, num_sms);
  const ConfigEntry* entry = find_dense(chosen, b_gran);
  if (entry == nullptr) return cudaErrorInvalidValue;
  const bool tma_store = chosen.epilogue == Fp8GemmEpilogue::kTmaStore;
  const Problem q{a, a_scale, a_scale_ld, b,       b_scale,   b_scale_ld, out,   out_fp32,
                  accumulate, M, N, K, num_sms, stream, tma_store, device};
  return entry->launch(q);
}

namespace fp8_gemm_detail {

// Debug hook for the self-test, deliberately not declared in fp8_gemm.h (fp8_gemm_selftest.cu declares it
// itself): the number of CTAs fp8_gemm launches for an M x N problem with this config on the current
// device (a multiple of config.cluster_m), computed by the same function the launch uses. Like a launch,
// it sets the kernel's dynamic shared-memory attribute (and, for clusters, queries the occupancy once).
cudaError_t fp8_gemm_grid_ctas(int M, int N, ScaleGranularity b_gran, int num_sms, Fp8GemmConfig config, int* ctas) {
  if (M < 1 || N < 1 || num_sms < 1 || ctas == nullptr) return cudaErrorInvalidValue;
  const ConfigEntry* entry = find_dense(config, b_gran);
  if (entry == nullptr) return cudaErrorInvalidValue;
  Problem q{};
  q.M = M;
  q.N = N;
  q.K = kBlockK;
  q.num_sms = num_sms;
  const cudaError_t err = cudaGetDevice(&q.device);
  if (err != cudaSuccess) return err;
  return entry->grid(q, ctas);
}

}  // namespace fp8_gemm_detail
}  // namespace dskernels
