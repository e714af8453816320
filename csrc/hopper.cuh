// Hopper (sm_90a) device helpers shared by dskernels' CUDA kernels: TMA bulk tensor copies, mbarriers,
// wgmma (FP8 e4m3 and BF16 with shared-memory descriptors), named barriers, proxy fences, setmaxnreg,
// and host-side tensor-map creation through the driver entry point (so extensions need no -lcuda).
//
// Everything that emits sm_90a-only PTX sits in inline functions that are instantiated only from
// kernel bodies guarded by DSK_HOPPER_DEVICE, so a file including this header still compiles for a
// portable PTX target (e.g. compute_80).
#pragma once

#include <cuda.h>  // CUtensorMap and its enums only: types, no driver symbols are linked
#include <cuda_runtime.h>
#include <cstdint>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSK_HOPPER_DEVICE 1
#else
#define DSK_HOPPER_DEVICE 0
#endif

namespace dskernels {
namespace hopper {

// ---------------------------------------------------------------------------------------------
// Shared memory addresses, fences, register reallocation
// ---------------------------------------------------------------------------------------------

// PTX shared-memory instructions take 32-bit shared-window addresses, not generic pointers.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Makes mbarrier.init visible to the async proxy (TMA complete_tx) and to other threads.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Orders generic-proxy shared-memory accesses before later async-proxy ones (TMA, wgmma).
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Producer warpgroups give registers back so the math warpgroups can grow (needs a launch-bound cap).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// Math warpgroups claim the registers the producer released (accumulators live in registers).
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// ---------------------------------------------------------------------------------------------
// mbarriers (64-bit, in shared memory)
// ---------------------------------------------------------------------------------------------

// One phase completes after `count` arrivals plus all expected transaction bytes.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

// Spins until the phase with the given parity has completed (a fresh barrier counts parity 1 as done).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_addr(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.b32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// Plain arrival (release semantics: this thread's earlier shared-memory reads are ordered before it).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Arrival that also announces how many bytes TMA copies will complete on this phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// ---------------------------------------------------------------------------------------------
// TMA (cp.async.bulk.tensor)
// ---------------------------------------------------------------------------------------------

// Pulls the 128-byte tensor map into the descriptor cache before the first copy needs it.
__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// 2-D tile copy global -> shared; completes `box bytes` on `bar` (out-of-bounds parts arrive as zeros).
__device__ __forceinline__ void tma_load_2d(void* smem_dst, const CUtensorMap* map, uint64_t* bar, int32_t inner,
                                            int32_t outer) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];" ::"r"(
          smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(inner), "r"(outer)
      : "memory");
}

// 3-D tile copy global -> shared (coordinates innermost first); same completion rules as tma_load_2d.
__device__ __forceinline__ void tma_load_3d(void* smem_dst, const CUtensorMap* map, uint64_t* bar, int32_t c0,
                                            int32_t c1, int32_t c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];" ::"r"(
          smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// 2-D tile copy shared -> global (coordinates innermost first) into the calling thread's current bulk
// group; out-of-bounds parts of the box are not written.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, const void* smem_src, int32_t inner,
                                             int32_t outer) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_addr(smem_src)), "r"(inner), "r"(outer)
               : "memory");
}

// Closes the calling thread's bulk async copies issued since the last commit into one bulk group.
__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Waits until at most kPending of this thread's bulk groups still read their shared-memory source.
template <int kPending>
__device__ __forceinline__ void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}

// Waits until at most kPending of this thread's bulk groups are incomplete (writes done).
template <int kPending>
__device__ __forceinline__ void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
}

// 3-D tile copy shared -> global (coordinates innermost first), as tma_store_2d.
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* smem_src, int32_t c0, int32_t c1,
                                             int32_t c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_addr(smem_src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}

// ---------------------------------------------------------------------------------------------
// Thread-block clusters: geometry, cluster barrier, remote mbarrier arrival, multicast TMA
// ---------------------------------------------------------------------------------------------

// Cluster geometry (1-D grids and clusters along x).
__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_id_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t num_clusters_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
  return r;
}

// Every thread of every CTA of the cluster: arrive (release), then wait (acquire). Not .aligned, so
// diverged warps may call it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}

// Arrives on the mbarrier at the same shared-memory offset as `bar` in cluster CTA `cta_rank` (the peer).
// Default semantics (release at CTA scope), deliberately not `.release.cluster`: ptxas (CUDA 13.0) lowers
// a cluster-scope release to MEMBAR.ALL.CTA + MEMBAR.ALL.GPU + ERRBAR + CGAERRBAR before the arrive, a
// GPU-scope fence that stalls the warp until its outstanding memory operations are performed. The math
// warps did that twice per K block (one arrival per CTA of the pair) right after the wgmma wait: the
// H100 sweep shows a fixed ~1.5-2 us per K block in every cluster kernel, whatever the tile shape or
// memory level, i.e. the 3-4x slowdown (csrc/gemm/NOTES.md). No fence is needed where the only hazard is
// write-after-read on a buffer the wgmma read (see retire() in fp8_gemm.cu). This is the instruction of
// CUTLASS's ClusterBarrier::arrive(cta_id).
__device__ __forceinline__ void mbarrier_arrive_remote(uint64_t* bar, uint32_t cta_rank) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_addr(bar)),
      "r"(cta_rank)
      : "memory");
}

// 2-D tile copy global -> the shared memory of every CTA in `cta_mask`, at smem_dst's offset in each, and
// complete_tx on the mbarrier at bar's offset in each.
__device__ __forceinline__ void tma_load_2d_multicast(void* smem_dst, const CUtensorMap* map, uint64_t* bar,
                                                      int32_t inner, int32_t outer, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;" ::"r"(smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(inner), "r"(outer), "h"(cta_mask)
      : "memory");
}

// ---------------------------------------------------------------------------------------------
// wgmma
// ---------------------------------------------------------------------------------------------

// Shared-memory matrix descriptor for a K-major tile written by TMA with 128-byte swizzle: rows of 128
// bytes, 8-row (1024-byte) swizzle atoms stacked along M/N (stride byte offset 1024). The leading byte
// offset is unused for K-major swizzled layouts. The tile must start 1024-byte aligned (base offset 0);
// advancing K by 32 bytes inside the 128-byte row is done by adding 2 (= 32 >> 4) to the descriptor.
__device__ __forceinline__ uint64_t smem_desc_k_major_sw128(const void* tile) {
  const uint64_t start = (smem_addr(tile) & 0x3FFFFu) >> 4;
  const uint64_t stride_byte_offset = 1024 >> 4;
  const uint64_t swizzle_128b = 1;
  return start | (stride_byte_offset << 32) | (swizzle_128b << 62);
}

// Required before the first wgmma of a batch: orders register/shared accesses before the async MMA.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }

// Closes the batch of wgmma issued since the last commit into one group.
__device__ __forceinline__ void wgmma_commit_group() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

// Waits until at most kPending committed groups are still running.
template <int kPending>
__device__ __forceinline__ void wgmma_wait_group() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving reads/writes of an accumulator register across a wgmma wait/fence.
__device__ __forceinline__ void fence_register(float& r) { asm volatile("" : "+f"(r)::"memory"); }

template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) fence_register(r[i]);
}

// d[N/2] (+)= A(64x32, smem desc) * B(Nx32, smem desc)^T, e4m3 x e4m3 -> fp32; scale_d = 0 overwrites d.
// Fragment layout (per thread of the warpgroup, warp w, lane l): d[4j + 2h + c] holds
// row 16w + l/4 + 8h, column 8j + 2(l%4) + c. One specialization per N we instantiate (N % 8 == 0).
template <int N>
__device__ __forceinline__ void wgmma_m64k32_e4m3(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d);

// Eight fp32 accumulator operands d[i] .. d[i + 7] of a wgmma asm statement ("+f": read and written).
#define DSK_ACC8(d, i)                                                                                       \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])

// Generated pattern: one asm per N (the operand list must be spelled out, eight at a time).
template <>
__device__ __forceinline__ void wgmma_m64k32_e4m3<16>(float (&d)[8], uint64_t desc_a, uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1;\n}\n"
      : DSK_ACC8(d, 0)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <>
__device__ __forceinline__ void wgmma_m64k32_e4m3<32>(float (&d)[16], uint64_t desc_a, uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1;\n}\n"
      : DSK_ACC8(d, 0), DSK_ACC8(d, 8)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <>
__device__ __forceinline__ void wgmma_m64k32_e4m3<64>(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1;\n}\n"
      : DSK_ACC8(d, 0), DSK_ACC8(d, 8), DSK_ACC8(d, 16), DSK_ACC8(d, 24)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <>
__device__ __forceinline__ void wgmma_m64k32_e4m3<96>(float (&d)[48], uint64_t desc_a, uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,\n"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, %48, %49, p, 1, 1;\n}\n"
      : DSK_ACC8(d, 0), DSK_ACC8(d, 8), DSK_ACC8(d, 16), DSK_ACC8(d, 24),
        DSK_ACC8(d, 32), DSK_ACC8(d, 40)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <>
__device__ __forceinline__ void wgmma_m64k32_e4m3<112>(float (&d)[56], uint64_t desc_a, uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %58, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n112k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,\n"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,\n"
      "%48, %49, %50, %51, %52, %53, %54, %55}, %56, %57, p, 1, 1;\n}\n"
      : DSK_ACC8(d, 0), DSK_ACC8(d, 8), DSK_ACC8(d, 16), DSK_ACC8(d, 24),
        DSK_ACC8(d, 32), DSK_ACC8(d, 40), DSK_ACC8(d, 48)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <>
__device__ __forceinline__ void wgmma_m64k32_e4m3<128>(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,\n"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,\n"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1;\n}\n"
      : DSK_ACC8(d, 0), DSK_ACC8(d, 8), DSK_ACC8(d, 16), DSK_ACC8(d, 24),
        DSK_ACC8(d, 32), DSK_ACC8(d, 40), DSK_ACC8(d, 48), DSK_ACC8(d, 56)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <>
__device__ __forceinline__ void wgmma_m64k32_e4m3<144>(float (&d)[72], uint64_t desc_a, uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %74, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n144k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,\n"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,\n"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,\n"
      "%64, %65, %66, %67, %68, %69, %70, %71}, %72, %73, p, 1, 1;\n}\n"
      : DSK_ACC8(d, 0), DSK_ACC8(d, 8), DSK_ACC8(d, 16), DSK_ACC8(d, 24),
        DSK_ACC8(d, 32), DSK_ACC8(d, 40), DSK_ACC8(d, 48), DSK_ACC8(d, 56),
        DSK_ACC8(d, 64)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

template <>
__device__ __forceinline__ void wgmma_m64k32_e4m3<160>(float (&d)[80], uint64_t desc_a, uint64_t desc_b,
                                                       int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %82, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n160k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,\n"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,\n"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,\n"
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79}, %80, %81, p, 1, 1;\n}\n"
      : DSK_ACC8(d, 0), DSK_ACC8(d, 8), DSK_ACC8(d, 16), DSK_ACC8(d, 24),
        DSK_ACC8(d, 32), DSK_ACC8(d, 40), DSK_ACC8(d, 48), DSK_ACC8(d, 56),
        DSK_ACC8(d, 64), DSK_ACC8(d, 72)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// ---------------------------------------------------------------------------------------------
// wgmma, bf16 inputs (added for MLA decode)
// ---------------------------------------------------------------------------------------------

// General descriptor of a 128-byte-swizzled tile (TMA SWIZZLE_128B layout: 16-byte chunk c of the
// 128-byte row r sits at chunk c ^ (r % 8); rows 128 bytes apart; 8-row atoms of 1024 bytes). The tile
// must start 1024-byte aligned (base offset 0). Field meaning depends on the operand's major-ness:
//   K-major  (reduction dim contiguous): LBO unused (0), SBO = bytes between 8-row groups along M/N.
//   MN-major (M/N dim contiguous, 64 bf16 per 128-byte row, rows indexed by K): LBO = bytes between
//            64-element blocks along M/N, SBO = bytes between 8-row groups along K.
// Offsets are in 16-byte units in the descriptor; adding x >> 4 to the descriptor moves the start by x bytes.
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* tile, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint64_t start = (smem_addr(tile) & 0x3FFFFu) >> 4;
  const uint64_t lbo = (lbo_bytes >> 4) & 0x3FFFu;
  const uint64_t sbo = (sbo_bytes >> 4) & 0x3FFFu;
  const uint64_t swizzle_128b = 1;
  return start | (lbo << 16) | (sbo << 32) | (swizzle_128b << 62);
}

// d[N/2] (+)= A(64x16 bf16, smem desc, K-major) * B(Nx16 bf16, smem desc, K-major)^T -> fp32;
// scale_d = 0 overwrites d. Same fragment layout as the e4m3 wrappers above.
template <int N>
__device__ __forceinline__ void wgmma_m64k16_bf16_kk(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d);

template <>
__device__ __forceinline__ void wgmma_m64k16_bf16_kk<64>(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : DSK_ACC8(d, 0), DSK_ACC8(d, 8), DSK_ACC8(d, 16), DSK_ACC8(d, 24)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// A 128-register fp32 accumulator (wgmma N = 256): its operands d[0] .. d[127] and their list
// "%0, ..., %127" in the instruction string.
#define DSK_ACC128_REGS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,\n" \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,\n" \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,\n" \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,\n" \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,\n" \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,\n" \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,\n" \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define DSK_ACC128(d)                                                                                          \
  DSK_ACC8(d, 0), DSK_ACC8(d, 8), DSK_ACC8(d, 16), DSK_ACC8(d, 24), DSK_ACC8(d, 32), DSK_ACC8(d, 40),            \
      DSK_ACC8(d, 48), DSK_ACC8(d, 56), DSK_ACC8(d, 64), DSK_ACC8(d, 72), DSK_ACC8(d, 80), DSK_ACC8(d, 88),      \
      DSK_ACC8(d, 96), DSK_ACC8(d, 104), DSK_ACC8(d, 112), DSK_ACC8(d, 120)

// d[N/2] (+)= A(64x16 bf16, smem desc, K-major) * B(16xN bf16, smem desc, MN-major, i.e. "transposed
// B": each 128-byte smem row holds 64 consecutive N elements of one K index) -> fp32.
template <int N>
__device__ __forceinline__ void wgmma_m64k16_bf16_kmn(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d);

template <>
__device__ __forceinline__ void wgmma_m64k16_bf16_kmn<256>(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      DSK_ACC128_REGS "}, %128, %129, p, 1, 1, 0, 1;\n}\n"
      : DSK_ACC128(d)
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d[128] (+)= A(64x16 bf16 from registers) * B(16x256 bf16, smem desc, MN-major / "transposed B", as in
// wgmma_m64k16_bf16_kmn<256>) -> fp32. A fragment (four bf16 pairs, lower column in the low half):
// a0 = row 16 * warp + lane / 4, columns 2 * (lane % 4) + {0, 1}; a1 = the same columns of row + 8;
// a2, a3 = a0, a1 at columns + 8. This is the accumulator layout of a 64 x 16 slice of an fp32 tile
// (d[8k .. 8k+7] packed pairwise), so a P tile computed by wgmma feeds the next one without shuffles.
// The registers are read asynchronously: keep them unchanged until the group's wgmma_wait_group.
__device__ __forceinline__ void wgmma_m64n256k16_bf16_rs_tnspb(float (&d)[128], uint32_t a0, uint32_t a1, uint32_t a2,
                                                               uint32_t a3, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      DSK_ACC128_REGS "}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : DSK_ACC128(d)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(scale_d));
}

// ---------------------------------------------------------------------------------------------
// Misc (added for MLA decode)
// ---------------------------------------------------------------------------------------------

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads (a multiple of 32).
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");  // racecheck FP (mla/NOTES.md)
}

// 2^x with the MUFU approximation (ex2(-inf) = +0, flushes subnormal results to zero).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Keeps the compiler from moving accesses of 32-bit registers (e.g. a wgmma A fragment) across a
// wgmma wait/fence; the 32-bit counterpart of fence_registers.
template <int N>
__device__ __forceinline__ void fence_registers_b32(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Signals named barrier `id` without waiting (the producer side of a one-way hand-off): completes the
// barrier's current phase together with the threads that bar.sync on it, `threads` in all.
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// ---------------------------------------------------------------------------------------------
// Host: tensor maps
// ---------------------------------------------------------------------------------------------

// The driver's cuTensorMapEncodeTiled, fetched once through the runtime (no -lcuda at link time).
inline decltype(&cuTensorMapEncodeTiled) tensor_map_encoder() {
  static const auto fn = []() -> decltype(&cuTensorMapEncodeTiled) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status);
#else
    cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &status);
#endif
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess) return nullptr;
    return reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(p);
  }();
  return fn;
}

// 2-D row-major tensor [outer, inner] with row stride `row_stride_bytes` (a multiple of 16), read in
// boxes of [box_outer, box_inner]; out-of-bounds elements read as zero.
inline cudaError_t make_tensor_map_2d(CUtensorMap* map, CUtensorMapDataType dtype, const void* base, uint64_t inner,
                                      uint64_t outer, uint64_t row_stride_bytes, uint32_t box_inner,
                                      uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {row_stride_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(map, dtype, 2, const_cast<void*>(base), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// 3-D tensor [dim2, dim1, dim0] (dims[0] innermost, contiguous) with byte strides strides[0] (between
// dim-1 rows) and strides[1] (between dim-2 slices), both multiples of 16, read in boxes of box[0..2];
// out-of-bounds elements read as zero.
inline cudaError_t make_tensor_map_3d(CUtensorMap* map, CUtensorMapDataType dtype, const void* base,
                                      const uint64_t (&dims)[3], const uint64_t (&strides_bytes)[2],
                                      const uint32_t (&box)[3], CUtensorMapSwizzle swizzle) {
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t d[3] = {dims[0], dims[1], dims[2]};
  const cuuint64_t s[2] = {strides_bytes[0], strides_bytes[1]};
  const cuuint32_t b[3] = {box[0], box[1], box[2]};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult r = encode(map, dtype, 3, const_cast<void*>(base), d, s, b, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace hopper
}  // namespace dskernels
