// Shared by the standalone self-tests (csrc/**/*_selftest.cu): error checks and reproducible random
// inputs. No kernel of the extension includes it.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define CHECK_CUDA(expr)                                                                          \
  do {                                                                                            \
    cudaError_t e_ = (expr);                                                                      \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(2);                                                                               \
    }                                                                                             \
  } while (0)

namespace selftest {

__device__ inline uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

// Uniform in [-1, 1), a function of (i, seed) alone.
__device__ inline float uniform(uint64_t i, uint32_t seed) {
  return hash32(i * 0x9E3779B97F4A7C15ull + seed) * (2.0f / 4294967296.0f) - 1.0f;
}

}  // namespace selftest
