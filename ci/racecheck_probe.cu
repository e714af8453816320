// Evidence for csrc/mla/NOTES.md ("compute-sanitizer"): the MLA split kernel's shared-memory protocol
// without wgmma or TMA, which compute-sanitizer's racecheck reports as racy although every access pair
// is ordered. 384 threads: warpgroups 0 and 1 hand the running max and rescale (s_max_a/b,
// s_scale_a/b) and a P tile (p_a/p_b) to each other with the kernel's one-way named barriers (ids 1-4:
// bar.arrive by the writer, bar.sync by the reader; a slot's reuse is ordered through the other id), a
// per-warpgroup barrier (5/6, 128 threads), and the epilogue's row sums through bar.sync 7, 256 on both
// warpgroups. Modes (argv[1]):
//   0: the third warpgroup exits at once
//   1: lanes 0 of warps 8 and 9 stay alive (spinning on a global flag) while the math warpgroups work,
//      as the kernel's TMA producer lanes do, with setmaxnreg as in the kernel
// ci/gpu.sh's sanitize phase builds and runs it under racecheck beside the kernel's report:
//   nvcc -std=c++17 -O3 -lineinfo -gencode=arch=compute_90a,code=sm_90a -Icsrc ci/racecheck_probe.cu -o probe
//   compute-sanitizer --tool racecheck ./probe 1
#include <cstdio>
#include <cstdlib>

#include "hopper.cuh"

using namespace dskernels::hopper;

template <int kMode>
__global__ void __launch_bounds__(384, 1) protocol(float* out, int num_blocks, volatile int* flag) {
  __shared__ float s_stat[6 * 64];
  __shared__ float p_a[64 * 64], p_b[64 * 64];
  __shared__ float s_stage[2][64 * 16];
  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 2) {
    if (kMode == 1) {
      setmaxnreg_dec<24>();
      const int w = (threadIdx.x - 256) / 32;
      if (threadIdx.x % 32 == 0 && w < 2) {
        long spins = 0;
        while (*flag < 2 && spins < (1l << 26)) ++spins;  // alive until both math warpgroups finish
      }
    }
    return;
  }
  if (kMode == 1) setmaxnreg_inc<240>();
  const int wg = warpgroup, wtid = threadIdx.x % 128, warp = wtid / 32, lane = wtid % 32;
  const int r_lo = warp * 16 + lane / 4;
  float* s_max_a = s_stat + 0 * 64;
  float* s_scale_a = s_stat + 1 * 64;
  float* s_max_b = s_stat + 2 * 64;
  float* s_scale_b = s_stat + 3 * 64;
  float* s_sum = s_stat + 4 * 64;
  float acc[2] = {0.0f, 0.0f};
  auto publish = [&](float* m, float* sc, uint32_t bar, float v) {
    for (int h = 0; h < 2; ++h)
      if (lane % 4 == 0) {
        m[r_lo + 8 * h] = v + h;
        sc[r_lo + 8 * h] = 0.5f * v;
      }
    named_barrier_arrive(bar, 256);
  };
  auto store_p = [&](float* p, float v) {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 16; ++j) p[(r_lo + 8 * h) * 64 + 4 * j + lane % 4] = v + j;
  };
  auto read_p = [&](const float* p) {
    for (int h = 0; h < 2; ++h)
      for (int j = 0; j < 16; ++j) acc[h] += p[(r_lo + 8 * h) * 64 + 4 * j + lane % 4];
  };
  for (int k = 0;; ++k) {
    const int a = 2 * k;
    const bool has_b = a + 1 < num_blocks;
    if (wg == 0) {
      publish(s_max_a, s_scale_a, 1, float(a));
      if (has_b) {
        named_barrier_sync(2, 256);
        for (int h = 0; h < 2; ++h) acc[h] += s_max_b[r_lo + 8 * h] * s_scale_b[r_lo + 8 * h];
      }
      store_p(p_a, float(a));
      named_barrier_arrive(3, 256);
      if (has_b) {
        named_barrier_sync(4, 256);
        read_p(p_b);
      }
      if (a + 2 >= num_blocks) break;
    } else {
      named_barrier_sync(1, 256);
      for (int h = 0; h < 2; ++h) acc[h] += s_max_a[r_lo + 8 * h] * s_scale_a[r_lo + 8 * h];
      if (has_b) {
        publish(s_max_b, s_scale_b, 2, float(a + 1));
        store_p(p_b, float(a + 1));
        named_barrier_arrive(4, 256);
      }
      named_barrier_sync(3, 256);
      read_p(p_a);
      if (a + 2 >= num_blocks) break;
    }
  }
  for (int h = 0; h < 2; ++h)
    if (lane % 4 == 0) s_sum[wg * 64 + r_lo + 8 * h] = acc[h];
  named_barrier_sync(7, 256);
  float total[2];
  for (int h = 0; h < 2; ++h) total[h] = s_sum[r_lo + 8 * h] + s_sum[64 + r_lo + 8 * h];
  for (int h = 0; h < 2; ++h) s_stage[wg][(r_lo + 8 * h) * 16 + lane % 4] = total[h];
  named_barrier_sync(5 + wg, 128);
  if (wtid == 0) {
    float t = 0.0f;
    for (int i = 0; i < 64 * 16; ++i) t += s_stage[wg][i];
    out[wg] = t;
    __threadfence();
    atomicAdd(const_cast<int*>(flag), 1);
  }
}

int main(int argc, char** argv) {
  const int mode = argc > 1 ? std::atoi(argv[1]) : 0;
  float* out;
  int* flag;
  cudaMalloc(&out, 2 * sizeof(float));
  cudaMalloc(&flag, sizeof(int));
  for (int nb : {1, 2, 3, 6, 7}) {
    cudaMemset(flag, 0, sizeof(int));
    if (mode == 0)
      protocol<0><<<2, 384>>>(out, nb, flag);
    else
      protocol<1><<<2, 384>>>(out, nb, flag);
  }
  const cudaError_t e = cudaDeviceSynchronize();
  std::printf("protocol mode %d: %s\n", mode, cudaGetErrorString(e));
  return e == cudaSuccess ? 0 : 1;
}
