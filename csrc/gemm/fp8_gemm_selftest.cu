// Standalone check of fp8_gemm against a naive reference kernel (one thread per output, same math:
// FP32 partial sum per 128-wide K block, scaled by both scales, accumulated in FP64).
//
// Build and run on an H100 (no PyTorch needed):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a \
//        csrc/gemm/fp8_gemm.cu csrc/gemm/fp8_grouped_gemm.cu csrc/gemm/gemm_heuristics.cu \
//        csrc/gemm/fp8_gemm_selftest.cu -o fp8_gemm_selftest
//   ./fp8_gemm_selftest          # correctness: one line per case, exit 1 on any mismatch
//   ./fp8_gemm_selftest bench    # DeepSeek-V3 shapes with the heuristic's tile shape
//   ./fp8_gemm_selftest sweep    # the same shapes with every compiled tile shape (to tune the heuristic)
//   ./fp8_gemm_selftest sweep-wgrad  # every 1D1D config on FP8Linear's weight-gradient shapes
//   ./fp8_gemm_selftest sanitize # small tail shapes, every compiled config once (for compute-sanitizer)
// Each bench line ends with grid=CTAS, the persistent grid launched (cluster configs: clusters x 2).
//
// A case fails when max|out - ref| / max|ref| > 1e-2, when any output is NaN/Inf, or when the guard
// bytes after the output changed. Outputs start poisoned (NaN) unless the case accumulates.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "fp8_gemm.h"
#include "../selftest.cuh"

// Defined in fp8_gemm.cu, deliberately outside the public header: the CTAs fp8_gemm launches for this
// problem and config (the persistent grid; a multiple of cluster_m).
namespace dskernels {
namespace fp8_gemm_detail {
cudaError_t fp8_gemm_grid_ctas(int M, int N, ScaleGranularity b_gran, int num_sms, Fp8GemmConfig config, int* ctas);
}  // namespace fp8_gemm_detail
}  // namespace dskernels

using dskernels::Fp8GemmConfig;
using dskernels::Fp8GemmEpilogue;
using dskernels::ScaleGranularity;

namespace {

constexpr int kGuardBytes = 4096;
constexpr uint8_t kGuardByte = 0xA5;

using selftest::uniform;

// Random e4m3 values spread over the format's range (as quantized activations/weights would be).
__global__ void fill_fp8(__nv_fp8_e4m3* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = __nv_fp8_e4m3(uniform(i, seed) * 448.0f);
}

// Positive scales in [2^-10, 2^-6), like amax/448 of unit-scale data; `valid` of every `ld` are set,
// the padding gets NaN so a read of it shows.
__global__ void fill_scales(float* x, size_t n, int ld, int valid, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = int(i % ld) < valid ? exp2f(-8.0f + 2.0f * uniform(i, seed)) : __int_as_float(0x7fc00000);
}

__global__ void fill_f32(float* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = uniform(i, seed);
}

// ref[m, n] = init[m, n] (if given) + sum_kb (sum_k a*b) * a_scale(m, kb) * b_scale(n, kb).
__global__ void reference_gemm(const uint8_t* a, const float* a_scale, int a_scale_ld, const uint8_t* b,
                               const float* b_scale, int b_scale_ld, bool per_row_b, const float* init,
                               double* ref, int M, int N, int K) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (n >= N) return;
  const int kbs = K / 128;
  double acc = init != nullptr ? init[size_t(m) * N + n] : 0.0;
  for (int kb = 0; kb < kbs; ++kb) {
    float partial = 0.0f;
    const uint4* ar = reinterpret_cast<const uint4*>(a + size_t(m) * K + kb * 128);
    const uint4* br = reinterpret_cast<const uint4*>(b + size_t(n) * K + kb * 128);
    for (int v = 0; v < 8; ++v) {
      const uint4 av = ar[v], bv = br[v];
      const uint8_t* ab = reinterpret_cast<const uint8_t*>(&av);
      const uint8_t* bb = reinterpret_cast<const uint8_t*>(&bv);
      for (int i = 0; i < 16; ++i) {
        __nv_fp8_e4m3 x, y;
        x.__x = ab[i];
        y.__x = bb[i];
        partial = fmaf(float(x), float(y), partial);
      }
    }
    const float sa = a_scale[size_t(kb) * a_scale_ld + m];
    const float sb = per_row_b ? b_scale[size_t(kb) * b_scale_ld + n] : b_scale[size_t(n / 128) * kbs + kb];
    acc += double(partial) * sa * sb;
  }
  ref[size_t(m) * N + n] = acc;
}

struct ErrorStats {
  unsigned long long bad;  // NaN/Inf outputs
  double max_abs_err, max_abs_ref, sum_xy, sum_xx_yy;
};

__device__ void atomic_max_nonneg(double* addr, double v) {
  atomicMax(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(__double_as_longlong(v)));
}

__global__ void compare(const void* out, bool out_fp32, const double* ref, size_t n, ErrorStats* stats) {
  double local_err = 0, local_ref = 0, xy = 0, xx_yy = 0;
  unsigned long long bad = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const double x = out_fp32 ? double(static_cast<const float*>(out)[i])
                              : double(__bfloat162float(static_cast<const __nv_bfloat16*>(out)[i]));
    const double y = ref[i];
    if (!isfinite(x)) {
      ++bad;
      continue;
    }
    local_err = fmax(local_err, fabs(x - y));
    local_ref = fmax(local_ref, fabs(y));
    xy += x * y;
    xx_yy += x * x + y * y;
  }
  atomicAdd(&stats->bad, bad);
  atomic_max_nonneg(&stats->max_abs_err, local_err);
  atomic_max_nonneg(&stats->max_abs_ref, local_ref);
  atomicAdd(&stats->sum_xy, xy);
  atomicAdd(&stats->sum_xx_yy, xx_yy);
}

int g_num_sms = 0;

struct Case {
  int M, N, K;
  ScaleGranularity gran;
  bool out_fp32, accumulate;
  Fp8GemmConfig config;  // {0, 0}: heuristic
};

// Device buffers of one case.
struct Buffers {
  uint8_t *a = nullptr, *b = nullptr, *out = nullptr;
  float *a_scale = nullptr, *b_scale = nullptr, *init = nullptr;
  double* ref = nullptr;
  int a_scale_ld = 0, b_scale_ld = 0;
  size_t out_bytes = 0;

  Buffers(const Case& c, uint32_t seed) {
    const int kbs = c.K / 128;
    a_scale_ld = (c.M + 3) / 4 * 4 + 4;  // padded past M: the kernel must not read the padding
    b_scale_ld = (c.N + 3) / 4 * 4 + 4;
    const size_t b_scales =
        c.gran == ScaleGranularity::k1D1D ? size_t(kbs) * b_scale_ld : size_t((c.N + 127) / 128) * kbs;
    out_bytes = size_t(c.M) * c.N * (c.out_fp32 ? 4 : 2);
    CHECK_CUDA(cudaMalloc(&a, size_t(c.M) * c.K));
    CHECK_CUDA(cudaMalloc(&b, size_t(c.N) * c.K));
    CHECK_CUDA(cudaMalloc(&a_scale, size_t(kbs) * a_scale_ld * 4));
    CHECK_CUDA(cudaMalloc(&b_scale, b_scales * 4));
    CHECK_CUDA(cudaMalloc(&out, out_bytes + kGuardBytes));
    fill_fp8<<<1024, 256>>>(reinterpret_cast<__nv_fp8_e4m3*>(a), size_t(c.M) * c.K, seed);
    fill_fp8<<<1024, 256>>>(reinterpret_cast<__nv_fp8_e4m3*>(b), size_t(c.N) * c.K, seed + 1);
    fill_scales<<<256, 256>>>(a_scale, size_t(kbs) * a_scale_ld, a_scale_ld, c.M, seed + 2);
    if (c.gran == ScaleGranularity::k1D1D)
      fill_scales<<<256, 256>>>(b_scale, b_scales, b_scale_ld, c.N, seed + 3);
    else
      fill_scales<<<256, 256>>>(b_scale, b_scales, 1 << 30, 1 << 30, seed + 3);
    if (c.accumulate) {
      CHECK_CUDA(cudaMalloc(&init, size_t(c.M) * c.N * 4));
      fill_f32<<<1024, 256>>>(init, size_t(c.M) * c.N, seed + 4);
    }
    CHECK_CUDA(cudaGetLastError());
  }
  ~Buffers() {
    cudaFree(a);
    cudaFree(b);
    cudaFree(a_scale);
    cudaFree(b_scale);
    cudaFree(out);
    cudaFree(init);
    cudaFree(ref);
  }
  cudaError_t run(const Case& c, cudaStream_t stream) const {
    return dskernels::fp8_gemm(a, a_scale, a_scale_ld, b, b_scale, b_scale_ld, c.gran, out, c.out_fp32,
                               c.accumulate, c.M, c.N, c.K, g_num_sms, stream,
                               c.config.block_m != 0 ? &c.config : nullptr);
  }
};

const char* gran_name(ScaleGranularity g) { return g == ScaleGranularity::k1D2D ? "1D2D" : "1D1D"; }

const char* epilogue_name(Fp8GemmEpilogue e) {
  switch (e) {
    case Fp8GemmEpilogue::kRegisters: return "regs";
    case Fp8GemmEpilogue::kOverlap: return "overlap";
    case Fp8GemmEpilogue::kTmaStore: return "tmastore";
  }
  return "?";
}

std::vector<Fp8GemmConfig> list_configs(ScaleGranularity gran) {
  std::vector<Fp8GemmConfig> configs(dskernels::fp8_gemm_list_configs(gran, nullptr, 0));
  dskernels::fp8_gemm_list_configs(gran, configs.data(), int(configs.size()));
  return configs;
}

bool check(const Case& c, uint32_t seed) {
  Buffers buf(c, seed);
  const size_t n = size_t(c.M) * c.N;
  if (c.accumulate)
    CHECK_CUDA(cudaMemcpy(buf.out, buf.init, n * 4, cudaMemcpyDeviceToDevice));
  else
    CHECK_CUDA(cudaMemset(buf.out, 0xFF, buf.out_bytes));  // NaN in both bf16 and fp32
  CHECK_CUDA(cudaMemset(buf.out + buf.out_bytes, kGuardByte, kGuardBytes));

  const cudaError_t launch = buf.run(c, 0);
  const cudaError_t sync = cudaDeviceSynchronize();
  const Fp8GemmConfig used =
      c.config.block_m != 0 ? c.config : dskernels::fp8_gemm_pick_config(c.M, c.N, c.K, c.gran, g_num_sms);
  if (launch != cudaSuccess || sync != cudaSuccess) {
    std::printf("FAIL M=%5d N=%5d K=%5d %s %s%s tile=%dx%d %s c%d: %s / %s\n", c.M, c.N, c.K,
                gran_name(c.gran), c.out_fp32 ? "fp32" : "bf16", c.accumulate ? "+acc" : "", used.block_m, used.block_n,
                epilogue_name(used.epilogue), used.cluster_m,
                cudaGetErrorString(launch), cudaGetErrorString(sync));
    if (sync != cudaSuccess) std::exit(3);  // the context is gone after a device fault
    return false;
  }

  CHECK_CUDA(cudaMalloc(&buf.ref, n * 8));
  reference_gemm<<<dim3((c.N + 127) / 128, c.M), 128>>>(buf.a, buf.a_scale, buf.a_scale_ld, buf.b, buf.b_scale,
                                                         buf.b_scale_ld, c.gran == ScaleGranularity::k1D1D,
                                                         buf.init, buf.ref, c.M, c.N, c.K);
  ErrorStats* stats;
  CHECK_CUDA(cudaMallocManaged(&stats, sizeof(ErrorStats)));
  std::memset(stats, 0, sizeof(ErrorStats));
  compare<<<512, 256>>>(buf.out, c.out_fp32, buf.ref, n, stats);
  CHECK_CUDA(cudaDeviceSynchronize());

  std::vector<uint8_t> guard(kGuardBytes);
  CHECK_CUDA(cudaMemcpy(guard.data(), buf.out + buf.out_bytes, kGuardBytes, cudaMemcpyDeviceToHost));
  const bool guard_ok = std::all_of(guard.begin(), guard.end(), [](uint8_t v) { return v == kGuardByte; });

  const double rel = stats->max_abs_err / std::max(stats->max_abs_ref, 1e-30);
  const double diff = 1.0 - 2.0 * stats->sum_xy / std::max(stats->sum_xx_yy, 1e-300);
  const bool ok = stats->bad == 0 && guard_ok && rel <= 1e-2;
  std::printf("%s M=%5d N=%5d K=%5d %s %s%s tile=%3dx%-3d %-8s c%d max_rel_err=%.3e diff=%.3e nonfinite=%llu guard=%s\n",
              ok ? "ok  " : "FAIL", c.M, c.N, c.K, gran_name(c.gran), c.out_fp32 ? "fp32" : "bf16",
              c.accumulate ? "+acc" : "    ", used.block_m, used.block_n, epilogue_name(used.epilogue), used.cluster_m, rel, diff, stats->bad,
              guard_ok ? "intact" : "OVERWRITTEN");
  CHECK_CUDA(cudaFree(stats));
  return ok;
}

// Median time of `reps` launches, each after an L2 flush (so small-M shapes read B from DRAM).
double time_us(const Case& c, const Buffers& buf, void* flush, size_t flush_bytes, int reps) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int r = 0; r < reps + 2; ++r) {
    CHECK_CUDA(cudaMemsetAsync(flush, r, flush_bytes));
    CHECK_CUDA(cudaEventRecord(start));
    CHECK_CUDA(buf.run(c, 0));
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    if (r >= 2) times.push_back(ms * 1000.0f);
  }
  std::sort(times.begin(), times.end());
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return times[times.size() / 2];
}

// Times the heuristic's pick (or, sweeping, every compiled config) on each (M, N, K) of `shapes`.
int bench(const std::vector<std::array<int, 3>>& shapes, ScaleGranularity gran, bool out_fp32, bool sweep) {
  const std::vector<Fp8GemmConfig> all = list_configs(gran);
  const size_t flush_bytes = 256u << 20;
  void* flush;
  CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
  std::printf("device: %d SMs; b_scale %s, %s out\n", g_num_sms, gran == ScaleGranularity::k1D1D ? "1D1D" : "1D2D",
              out_fp32 ? "fp32" : "bf16");
  for (const auto& shape : shapes) {
    Case c{shape[0], shape[1], shape[2], gran, out_fp32, false, {0, 0}};
    Buffers buf(c, 7);
    const Fp8GemmConfig pick = dskernels::fp8_gemm_pick_config(c.M, c.N, c.K, c.gran, g_num_sms);
    std::vector<Fp8GemmConfig> configs;
    if (sweep)
      configs = all;
    else
      configs.push_back(pick);
    for (const Fp8GemmConfig& cfg : configs) {
      c.config = cfg;
      const double us = time_us(c, buf, flush, flush_bytes, 20);
      const double flops = 2.0 * c.M * c.N * double(c.K);
      const double bytes = double(c.M) * c.K + double(c.N) * c.K + (out_fp32 ? 4.0 : 2.0) * c.M * c.N;
      const bool picked = cfg.block_m == pick.block_m && cfg.block_n == pick.block_n &&
                          cfg.epilogue == pick.epilogue && cfg.cluster_m == pick.cluster_m;
      // The launched grid (CTAs), so a cluster config's grid can be checked against the SM count.
      int ctas = 0;
      CHECK_CUDA(dskernels::fp8_gemm_detail::fp8_gemm_grid_ctas(c.M, c.N, c.gran, g_num_sms, cfg, &ctas));
      std::printf("bench M=%5d N=%5d K=%5d tile=%3dx%-3d %s c%d%s %9.1f us %7.1f TFLOPS %6.0f GB/s grid=%d\n", c.M,
                  c.N, c.K, cfg.block_m, cfg.block_n, epilogue_name(cfg.epilogue), cfg.cluster_m, picked ? "*" : " ",
                  us, flops / us * 1e-6, bytes / us * 1e-3, ctas);
    }
  }
  CHECK_CUDA(cudaFree(flush));
  return 0;
}

// The DeepSeek-V3 shapes (1D2D, bf16 out) at M = 64, 128 and 4096.
std::vector<std::array<int, 3>> deepseek_shapes() {
  std::vector<std::array<int, 3>> shapes;
  for (int m : {64, 128, 4096})
    for (const auto& nk : std::vector<std::array<int, 2>>{
             {2112, 7168}, {576, 7168}, {24576, 1536}, {32768, 512}, {7168, 16384}, {4096, 7168}, {7168, 2048}})
      shapes.push_back({m, nk[0], nk[1]});
  return shapes;
}

// The weight-gradient GEMMs of FP8Linear (1D1D): dW [out, in] = dy^T x over T tokens, for the
// benchmark's layers (in, out) and token counts.
std::vector<std::array<int, 3>> wgrad_shapes() {
  std::vector<std::array<int, 3>> shapes;
  for (int t : {2048, 4096, 16384})
    for (const auto& io : std::vector<std::array<int, 2>>{
             {1024, 1024}, {2048, 2048}, {2048, 5632}, {7168, 7168}, {7168, 2048}, {2048, 7168}})
      shapes.push_back({io[1], io[0], t});
  return shapes;
}

// The correctness cases: heuristic configs over a grid of tails and sizes, then every compiled config
// (tile shape, epilogue, cluster) on awkward shapes: odd N (unpaired stores, no TMA store), N not a
// multiple of the tile, tiles straddling two b_scale rows, M tails, a single K block, and more tiles than
// SMs (each CTA walks several tiles: the overlapped epilogue's path).
std::vector<Case> full_cases() {
  std::vector<Case> cases;
  for (int M : {1, 63, 128, 129, 4096})
    for (int N : {24, 576, 2112, 7168})
      for (int K : {128, 512, 7168}) {
        cases.push_back({M, N, K, ScaleGranularity::k1D2D, false, false, {0, 0}});
        cases.push_back({M, N, K, ScaleGranularity::k1D2D, true, true, {0, 0}});
        cases.push_back({M, N, K, ScaleGranularity::k1D1D, true, true, {0, 0}});
      }
  const std::vector<std::array<int, 3>> awkward = {
      {129, 2112, 512}, {63, 1001, 384}, {300, 600, 128}, {1000, 4000, 256}, {4096, 2112, 512}};
  for (ScaleGranularity gran : {ScaleGranularity::k1D2D, ScaleGranularity::k1D1D}) {
    for (const Fp8GemmConfig& cfg : list_configs(gran))
      for (const auto& s : awkward) {
        cases.push_back({s[0], s[1], s[2], gran, false, false, cfg});
        cases.push_back({s[0], s[1], s[2], gran, true, gran == ScaleGranularity::k1D1D, cfg});
      }
  }
  return cases;
}

// For compute-sanitizer, which instruments every access: small problems with every kind of tail, the
// heuristic's pick for both granularities and output types, and every compiled config once.
std::vector<Case> sanitize_cases() {
  std::vector<Case> cases;
  for (const auto& s : std::vector<std::array<int, 3>>{{1, 24, 128}, {63, 1001, 384}, {129, 2112, 256}}) {
    cases.push_back({s[0], s[1], s[2], ScaleGranularity::k1D2D, false, false, {0, 0}});
    cases.push_back({s[0], s[1], s[2], ScaleGranularity::k1D1D, true, true, {0, 0}});
  }
  for (ScaleGranularity gran : {ScaleGranularity::k1D2D, ScaleGranularity::k1D1D})
    for (const Fp8GemmConfig& cfg : list_configs(gran))
      cases.push_back({129, 1000, 256, gran, false, false, cfg});
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  CHECK_CUDA(cudaDeviceGetAttribute(&g_num_sms, cudaDevAttrMultiProcessorCount, 0));
  const char* mode = argc > 1 ? argv[1] : "";
  if (std::strcmp(mode, "bench") == 0) return bench(deepseek_shapes(), ScaleGranularity::k1D2D, false, false);
  if (std::strcmp(mode, "sweep") == 0) return bench(deepseek_shapes(), ScaleGranularity::k1D2D, false, true);
  if (std::strcmp(mode, "sweep-wgrad") == 0) {  // bf16 dW, then fp32 (an fp32 weight's gradient)
    bench(wgrad_shapes(), ScaleGranularity::k1D1D, false, true);
    return bench(wgrad_shapes(), ScaleGranularity::k1D1D, true, true);
  }
  const std::vector<Case> cases = std::strcmp(mode, "sanitize") == 0 ? sanitize_cases() : full_cases();

  int failures = 0;
  uint32_t seed = 1;
  for (const Case& c : cases) failures += check(c, seed += 10) ? 0 : 1;
  std::printf("%s: %d of %zu cases failed\n", failures == 0 ? "PASS" : "FAIL", failures, cases.size());
  return failures == 0 ? 0 : 1;
}
