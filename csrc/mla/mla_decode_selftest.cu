// Standalone check of mla_decode_split + mla_decode_combine against a naive reference kernel (one CTA
// per (batch, query row), FP32 scores and softmax, FP32 P V; no bf16 rounding of P). Where a case uses
// the scheduler's split, mla_decode_schedule's work list must equal the host's copy of that split, its
// record of the inputs (lengths, block-table fingerprints) the host's, and the decode then runs with the
// match check on.
//
// Build and run on an H100 (no PyTorch needed):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        csrc/mla/mla_decode.cu csrc/mla/mla_decode_selftest.cu -o mla_decode_selftest
//   ./mla_decode_selftest          # correctness: one line per case, exit 1 on any mismatch
//   ./mla_decode_selftest bench    # bench/test_mla.py's shapes: time, TFLOPS, roofline fraction
//   ./mla_decode_selftest sanitize # a few small cases of every path (for compute-sanitizer)
//
// A case fails when max|out - ref| / max|ref| > 1.5e-2, when |lse - ref_lse| > 2e-3 * max(1, |ref_lse|)
// (or -inf does not match), or when any output is NaN. The cache is filled with NaN everywhere except
// the valid tokens (so unmasked garbage shows up), outputs and workspaces start as NaN.
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "mla_decode.h"
#include "../selftest.cuh"

namespace {

constexpr int D = dskernels::kMlaDimQK;
constexpr int DV = dskernels::kMlaDimV;
constexpr int PAGE = dskernels::kMlaPageSize;

using selftest::uniform;

__global__ void fill_uniform(__nv_bfloat16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = __float2bfloat16(uniform(i, seed));
}

template <typename T>
__global__ void fill_bits(T* x, size_t n, T v) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) x[i] = v;
}

// Random values into the valid tokens of every sequence (the rest of the cache stays NaN).
__global__ void fill_cache(__nv_bfloat16* cache, int64_t page_stride, const int* bt, int bt_stride, int b,
                           int seqlen, uint32_t seed) {
  for (int t = blockIdx.x; t < seqlen; t += gridDim.x) {
    const int page = bt[size_t(b) * bt_stride + t / PAGE];
    __nv_bfloat16* tok = cache + page * page_stride + size_t(t % PAGE) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x)
      tok[d] = __float2bfloat16(uniform((uint64_t(b) << 40) + uint64_t(t) * D + d, seed));
  }
}

// One CTA (256 threads) per (b, row): scores -> scratch, softmax, P V.
__global__ void reference_kernel(const __nv_bfloat16* q, const __nv_bfloat16* cache, int64_t page_stride,
                                 const int* bt, int bt_stride, const int* seqlens, int rows, int H, int s_q,
                                 float scale, bool causal, int max_seq, float* scratch, float* out, float* lse) {
  const int b = blockIdx.x / rows, row = blockIdx.x % rows;
  const int i = row / H, h = row % H;
  const int seqlen = seqlens[b];
  const int lim = max(0, causal ? seqlen - s_q + i + 1 : seqlen);
  const __nv_bfloat16* qr = q + (size_t(b) * rows + row) * D;
  float* sc = scratch + size_t(blockIdx.x) * max_seq;
  __shared__ float red[256];
  for (int t = threadIdx.x; t < lim; t += blockDim.x) {
    const __nv_bfloat16* k = cache + bt[size_t(b) * bt_stride + t / PAGE] * page_stride + size_t(t % PAGE) * D;
    float acc = 0.0f;
    for (int d = 0; d < D; ++d) acc += __bfloat162float(qr[d]) * __bfloat162float(k[d]);
    sc[t] = acc * scale;
  }
  __syncthreads();
  float m = -INFINITY;
  for (int t = threadIdx.x; t < lim; t += blockDim.x) m = fmaxf(m, sc[t]);
  red[threadIdx.x] = m;
  __syncthreads();
  for (int s = 128; s > 0; s /= 2) {
    if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  m = red[0];
  __syncthreads();
  float sum = 0.0f;
  for (int t = threadIdx.x; t < lim; t += blockDim.x) {
    sc[t] = expf(sc[t] - m);
    sum += sc[t];
  }
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int s = 128; s > 0; s /= 2) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  sum = red[0];
  for (int d = threadIdx.x; d < DV; d += blockDim.x) {
    float acc = 0.0f;
    for (int t = 0; t < lim; ++t)
      acc += sc[t] * __bfloat162float(cache[bt[size_t(b) * bt_stride + t / PAGE] * page_stride + size_t(t % PAGE) * D + d]);
    out[(size_t(b) * rows + row) * DV + d] = lim > 0 ? acc / sum : 0.0f;
  }
  if (threadIdx.x == 0) lse[(size_t(b) * H + h) * s_q + i] = lim > 0 ? m + logf(sum) : -INFINITY;
}

struct Case {
  std::vector<int> seqlens;
  int s_q, H;
  bool causal;
  int splits;         // items per batch (at most its block count); 0: dskernels.mla.schedule's split
  float scale;
  int page_pad;       // extra elements between pages
  bool empty_items = false;  // one more item per batch, past its last block (yields lse = -inf, o = 0)
};

struct Problem {
  int B, rows, num_pages, bt_stride, max_items, max_seq;
  int64_t page_stride;
  __nv_bfloat16 *q, *cache, *out;
  int *bt, *seqlens, *items, *offsets;
  int *made_seqlens = nullptr, *made_hash = nullptr, *error = nullptr;  // the scheduler's record (splits = 0)
  float *o_part, *lse_part, *lse;
};

// mla_decode_schedule must give the host's split (items, offsets), flag no batch and record the lengths and
// block-table fingerprints; the record stays in p for the decode's match check.
void check_schedule(const Case& c, Problem& p, int num_parts, const std::vector<int>& items,
                    const std::vector<int>& offsets, const std::vector<int>& bt) {
  int *d_items, *d_offsets, *d_bad;
  CHECK_CUDA(cudaMalloc(&d_items, items.size() * 4));
  CHECK_CUDA(cudaMalloc(&d_offsets, offsets.size() * 4));
  CHECK_CUDA(cudaMalloc(&d_bad, p.B * 4));
  CHECK_CUDA(cudaMalloc(&p.made_seqlens, p.B * 4));
  CHECK_CUDA(cudaMalloc(&p.made_hash, p.B * 4));
  CHECK_CUDA(cudaMalloc(&p.error, 2 * 4));
  CHECK_CUDA(cudaMemset(d_items, 0xFF, items.size() * 4));
  CHECK_CUDA(cudaMemset(d_offsets, 0xFF, offsets.size() * 4));
  for (int* d : {d_bad, p.made_seqlens, p.made_hash}) CHECK_CUDA(cudaMemset(d, 0xFF, p.B * 4));
  CHECK_CUDA(cudaMemset(p.error, 0xFF, 8));
  CHECK_CUDA(dskernels::mla_decode_schedule(p.seqlens, p.bt, p.bt_stride, p.B, p.bt_stride, p.num_pages, c.s_q,
                                            num_parts, d_items, d_offsets, d_bad, p.made_seqlens, p.made_hash,
                                            p.error, nullptr));
  std::vector<int> got_items(items.size()), got_offsets(offsets.size()), got_bad(p.B), got_seqlens(p.B),
      got_hash(p.B), got_error(2);
  CHECK_CUDA(cudaMemcpy(got_items.data(), d_items, items.size() * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(got_offsets.data(), d_offsets, offsets.size() * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(got_bad.data(), d_bad, p.B * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(got_seqlens.data(), p.made_seqlens, p.B * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(got_hash.data(), p.made_hash, p.B * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(got_error.data(), p.error, 8, cudaMemcpyDeviceToHost));
  cudaFree(d_items);
  cudaFree(d_offsets);
  cudaFree(d_bad);
  std::vector<int> want_hash(p.B);
  for (int b = 0; b < p.B; ++b) {
    uint32_t h = 0;
    for (int k = 0; k < (c.seqlens[b] + PAGE - 1) / PAGE; ++k)
      h += dskernels::mla_table_hash_term(bt[size_t(b) * p.bt_stride + k], k);
    want_hash[b] = static_cast<int>(h);
  }
  const bool ok = got_items == items && got_offsets == offsets &&
                  std::all_of(got_bad.begin(), got_bad.end(), [](int x) { return x == 0; }) &&
                  got_seqlens == c.seqlens && got_hash == want_hash && got_error[0] == 0 &&
                  got_error[1] == INT32_MAX;
  std::printf("%s mla_decode_schedule B=%d num_parts=%d slots=%zu\n", ok ? "PASS" : "FAIL", p.B, num_parts,
              items.size() / 3);
  if (!ok) std::exit(1);
}

// Outputs and workspaces to NaN before a run.
void poison(const Problem& p) {
  __nv_bfloat16_raw nan_raw;
  nan_raw.x = 0x7FC0;
  fill_bits<<<1024, 256>>>(p.out, size_t(p.B) * p.rows * DV, __nv_bfloat16(nan_raw));
  fill_bits<<<1024, 256>>>(p.o_part, size_t(p.max_items) * p.rows * DV, NAN);
  fill_bits<<<1024, 256>>>(p.lse_part, size_t(p.max_items) * p.rows, NAN);
  fill_bits<<<1024, 256>>>(p.lse, size_t(p.B) * p.rows, NAN);
  CHECK_CUDA(cudaGetLastError());
}

// Items: each batch's blocks split into `splits` near-equal ranges, then one unused slot. With
// splits = 0, the split of dskernels.mla.schedule for this GPU: num_parts = SMs / m-blocks, each batch
// cut into round(blocks / quota) (at least 1) items of ceil(blocks / items) blocks, num_parts + B slots.
Problem make_problem(const Case& c, std::mt19937& rng) {
  Problem p{};
  p.B = int(c.seqlens.size());
  p.rows = c.s_q * c.H;
  p.max_seq = *std::max_element(c.seqlens.begin(), c.seqlens.end());
  int total_pages = 0, max_blocks = 0;
  for (int s : c.seqlens) {
    total_pages += (s + PAGE - 1) / PAGE;
    max_blocks = std::max(max_blocks, (s + PAGE - 1) / PAGE);
  }
  p.num_pages = total_pages + 3;
  p.bt_stride = max_blocks + 1;
  p.page_stride = int64_t(PAGE) * D + c.page_pad;
  std::vector<int> perm(p.num_pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int> bt(size_t(p.B) * p.bt_stride, -1), items, offsets{0};
  int num_parts = 0, quota = 0;
  if (c.splits == 0) {
    int device = 0, sms = 0;
    CHECK_CUDA(cudaGetDevice(&device));
    CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    num_parts = std::max(1, sms / ((p.rows + 63) / 64));
    quota = std::max(1, (total_pages + num_parts - 1) / num_parts);
  }
  int next = 0;
  for (int b = 0; b < p.B; ++b) {
    const int nb = (c.seqlens[b] + PAGE - 1) / PAGE;
    for (int k = 0; k < nb; ++k) bt[size_t(b) * p.bt_stride + k] = perm[next++];
    const int parts = c.splits == 0 ? std::max(1, (nb + quota / 2) / quota) : std::max(1, std::min(c.splits, nb));
    const int chunk = (nb + parts - 1) / parts;
    for (int s = 0; s < parts; ++s) {
      items.push_back(b);
      items.push_back(c.splits == 0 ? std::min(s * chunk, nb) : nb * s / parts);
      items.push_back(c.splits == 0 ? std::min((s + 1) * chunk, nb) : nb * (s + 1) / parts);
    }
    if (c.empty_items) items.insert(items.end(), {b, nb, nb + 2});
    offsets.push_back(offsets.back() + parts + (c.empty_items ? 1 : 0));
  }
  const int slots = c.splits == 0 ? num_parts + p.B : int(items.size() / 3) + 1;
  while (int(items.size() / 3) < slots) items.insert(items.end(), {-1, 0, 0});
  p.max_items = int(items.size() / 3);

  const size_t q_elems = size_t(p.B) * p.rows * D;
  const size_t cache_elems = size_t(p.num_pages) * p.page_stride;
  CHECK_CUDA(cudaMalloc(&p.q, q_elems * 2));
  CHECK_CUDA(cudaMalloc(&p.cache, cache_elems * 2));
  CHECK_CUDA(cudaMalloc(&p.out, size_t(p.B) * p.rows * DV * 2));
  CHECK_CUDA(cudaMalloc(&p.bt, bt.size() * 4));
  CHECK_CUDA(cudaMalloc(&p.seqlens, p.B * 4));
  CHECK_CUDA(cudaMalloc(&p.items, items.size() * 4));
  CHECK_CUDA(cudaMalloc(&p.offsets, offsets.size() * 4));
  CHECK_CUDA(cudaMalloc(&p.o_part, size_t(p.max_items) * p.rows * DV * 4));
  CHECK_CUDA(cudaMalloc(&p.lse_part, size_t(p.max_items) * p.rows * 4));
  CHECK_CUDA(cudaMalloc(&p.lse, size_t(p.B) * p.rows * 4));
  CHECK_CUDA(cudaMemcpy(p.bt, bt.data(), bt.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(p.seqlens, c.seqlens.data(), p.B * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(p.items, items.data(), items.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(p.offsets, offsets.data(), offsets.size() * 4, cudaMemcpyHostToDevice));

  if (c.splits == 0) check_schedule(c, p, num_parts, items, offsets, bt);

  const uint32_t seed = rng();
  fill_uniform<<<1024, 256>>>(p.q, q_elems, seed);
  __nv_bfloat16_raw nan_raw;
  nan_raw.x = 0x7FC0;
  fill_bits<<<1024, 256>>>(p.cache, cache_elems, __nv_bfloat16(nan_raw));
  for (int b = 0; b < p.B; ++b)
    fill_cache<<<std::min(c.seqlens[b], 4096), 128>>>(p.cache, p.page_stride, p.bt, p.bt_stride, b, c.seqlens[b], seed + 1);
  poison(p);
  return p;
}

void free_problem(Problem& p) {
  for (void* ptr : {(void*)p.q, (void*)p.cache, (void*)p.out, (void*)p.bt, (void*)p.seqlens, (void*)p.items,
                    (void*)p.offsets, (void*)p.o_part, (void*)p.lse_part, (void*)p.lse, (void*)p.made_seqlens,
                    (void*)p.made_hash, (void*)p.error})
    cudaFree(ptr);
}

cudaError_t split(const Case& c, const Problem& p) {
  return dskernels::mla_decode_split(p.q, p.cache, p.num_pages, p.page_stride, p.bt, p.bt_stride, p.bt_stride,
                                     p.seqlens, p.items, p.offsets, nullptr, p.made_seqlens, p.made_hash, p.error,
                                     p.max_items, p.B, c.s_q, c.H, c.scale, c.causal, p.o_part, p.lse_part, p.out,
                                     p.lse, nullptr);
}

cudaError_t run(const Case& c, const Problem& p) {
  cudaError_t err = split(c, p);
  if (err != cudaSuccess) return err;
  return dskernels::mla_decode_combine(p.o_part, p.lse_part, p.offsets, nullptr, p.B, c.s_q, c.H, p.out, p.lse,
                                       nullptr);
}

// Runs the case (outputs and workspaces poisoned with NaN) against the reference; returns 1 on failure.
int check_case(const Case& c, std::mt19937& rng) {
  Problem p = make_problem(c, rng);
  const size_t n_out = size_t(p.B) * p.rows * DV, n_lse = size_t(p.B) * p.rows;
  float *ref_out, *ref_lse, *scratch;
  CHECK_CUDA(cudaMalloc(&ref_out, n_out * 4));
  CHECK_CUDA(cudaMalloc(&ref_lse, n_lse * 4));
  CHECK_CUDA(cudaMalloc(&scratch, size_t(p.B) * p.rows * p.max_seq * 4));
  reference_kernel<<<p.B * p.rows, 256>>>(p.q, p.cache, p.page_stride, p.bt, p.bt_stride, p.seqlens, p.rows, c.H,
                                          c.s_q, c.scale, c.causal, p.max_seq, scratch, ref_out, ref_lse);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<__nv_bfloat16> out(n_out);
  std::vector<float> ro(n_out), lse(n_lse), rl(n_lse);
  CHECK_CUDA(cudaMemcpy(ro.data(), ref_out, n_out * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(rl.data(), ref_lse, n_lse * 4, cudaMemcpyDeviceToHost));
  int failed = 0;
  {
    const cudaError_t err = run(c, p);
    CHECK_CUDA(cudaDeviceSynchronize());
    CHECK_CUDA(cudaMemcpy(out.data(), p.out, n_out * 2, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(lse.data(), p.lse, n_lse * 4, cudaMemcpyDeviceToHost));
    double max_ref = 0.0, max_err = 0.0, max_lse_err = 0.0;
    size_t nonfinite = 0, lse_bad = 0;
    for (size_t i = 0; i < n_out; ++i) {
      const double o = __bfloat162float(out[i]);
      if (!std::isfinite(o)) { ++nonfinite; continue; }
      max_ref = std::max(max_ref, std::fabs(double(ro[i])));
      max_err = std::max(max_err, std::fabs(o - ro[i]));
    }
    for (size_t i = 0; i < n_lse; ++i) {
      if (std::isinf(rl[i]) || std::isinf(lse[i])) {
        if (!(std::isinf(rl[i]) && std::isinf(lse[i]) && rl[i] < 0 && lse[i] < 0)) ++lse_bad;
        continue;
      }
      if (std::isnan(lse[i])) { ++lse_bad; continue; }
      const double e = std::fabs(double(lse[i]) - rl[i]);
      max_lse_err = std::max(max_lse_err, e);
      if (e > 2e-3 * std::max(1.0, std::fabs(double(rl[i])))) ++lse_bad;
    }
    const double rel = max_err / std::max(max_ref, 1e-20);
    const bool ok = err == cudaSuccess && nonfinite == 0 && lse_bad == 0 && rel <= 1.5e-2;
    failed += !ok;
    std::printf("%s B=%d s_q=%d H=%d causal=%d splits=%d%s scale=%.3f pad=%d seqlens=[",
                ok ? "PASS" : "FAIL", p.B, c.s_q, c.H, int(c.causal), c.splits, c.empty_items ? "+empty" : "",
                c.scale, c.page_pad);
    for (size_t i = 0; i < c.seqlens.size(); ++i) std::printf(i ? ",%d" : "%d", c.seqlens[i]);
    std::printf("] rel_err=%.3e lse_err=%.3e nonfinite=%zu lse_bad=%zu%s%s\n", rel, max_lse_err, nonfinite, lse_bad,
                err == cudaSuccess ? "" : " launch: ", err == cudaSuccess ? "" : cudaGetErrorString(err));
  }
  cudaFree(ref_out);
  cudaFree(ref_lse);
  cudaFree(scratch);
  free_problem(p);
  return failed;
}

int correctness(bool sanitize) {
  const float s = 1.0f / std::sqrt(float(D));
  // Per item the seesaw kernel pairs blocks (even: warpgroup 0, odd: warpgroup 1): the cases cover
  // items of 0, 1, 2, odd and even block counts and a partial last block at either parity.
  const std::vector<Case> all = {
      {{1, 100}, 1, 16, false, 1, s, 0},
      {{64, 65, 128, 129}, 1, 16, false, 1, s, 0},
      {{2, 65, 1000}, 2, 16, true, 3, s, 0},
      {{1, 2, 3}, 2, 16, true, 1, s, 0},           // s_q > seqlen: rows with nothing visible
      {{65, 130}, 2, 16, true, 8, s, 0},           // one block per item; query 0 sees nothing in the last item
      {{4096, 777}, 1, 128, false, 4, s, 0},
      {{64, 129, 3000}, 2, 128, true, 2, s, 8},    // padded page stride
      {{500}, 1, 1, false, 1, s, 0},               // rows = 1
      {{300, 70}, 2, 3, true, 2, 0.3f, 0},         // rows = 6, peaky softmax
      {{1000, 333}, 2, 40, true, 3, s, 0},         // rows = 80: second m-block half padded
      {{2048, 100}, 2, 64, false, 5, 0.3f, 64},    // non-causal s_q = 2
      {{8192}, 1, 32, true, 16, s, 0},
      // 16 blocks with the partial one odd, 17 with it even, one full block; plus an empty item each
      {{1000, 1025, 64}, 1, 128, true, 1, s, 0, true},
      // items of 1 block (130, 190) and of 21 blocks with the partial one last and even (4000); 4 m-blocks
      {{130, 190, 4000}, 2, 128, true, 3, s, 0},
      // the scheduler's split (device work list checked against the host's) on a ragged batch, 1 to 16k
      {{1, 100, 5000, 64, 65, 16384}, 1, 128, true, 0, s, 0},
  };
  // Under compute-sanitizer (every access instrumented): single-item and combined batches, rows with
  // nothing visible, a padded page stride, padded m-block rows, empty items and the scheduler's split.
  const std::vector<Case> small = {all[0], all[3], all[4], all[6], all[9], all[12],
                                   {{1, 100, 700, 64, 65}, 1, 128, true, 0, s, 0}};
  const std::vector<Case>& cases = sanitize ? small : all;
  std::mt19937 rng(1234);
  int failures = 0;
  for (const Case& c : cases) failures += check_case(c, rng);
  std::printf("%s: %d of %zu cases failed\n", failures ? "FAILED" : "ALL PASSED", failures, cases.size());
  return failures ? 1 : 0;
}

// bench/test_mla.py's shapes (B, cache length, heads, s_q), causal, with the scheduler's item split.
// Each sample flushes L2 (256 MB written) and times split + combine alone with events (no scheduler, no
// Python); the median of 30 is reported. Roofline as in bench/: max(bytes / copy, FLOPs / bf16) with the
// copy (3.0 TB/s) and bf16 (755 TFLOPS) ceilings measured on this workplace's H100 (DESIGN.md).
int bench() {
  std::mt19937 rng(7);
  const float s = 1.0f / std::sqrt(float(D));
  const int shapes[][4] = {{64, 4096, 128, 1},  {128, 8192, 128, 1}, {128, 16384, 128, 1}, {128, 8192, 16, 1},
                           {64, 8192, 128, 2},  {128, 4096, 64, 1},  {32, 16384, 128, 1},  {64, 1024, 16, 1}};
  void* flush = nullptr;
  const size_t flush_bytes = size_t(256) << 20;
  CHECK_CUDA(cudaMalloc(&flush, flush_bytes));
  cudaEvent_t e0, e1, e2;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  CHECK_CUDA(cudaEventCreate(&e2));
  for (const auto& shape : shapes) {
    const int B = shape[0], seq = shape[1], H = shape[2], s_q = shape[3];
    Case c{std::vector<int>(B, seq), s_q, H, true, 0, s, 0};
    Problem p = make_problem(c, rng);
    const double bytes = double(B) * seq * D * 2 + double(B) * s_q * H * (D + DV) * 2;
    const double flops = 2.0 * B * s_q * H * double(seq) * (D + DV);
    const double roof = std::max(bytes / 3.0e12, flops / 755e12);
    CHECK_CUDA(run(c, p));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<float> total, split_only;
    for (int r = 0; r < 30; ++r) {
      CHECK_CUDA(cudaMemsetAsync(flush, r, flush_bytes));
      CHECK_CUDA(cudaEventRecord(e0));
      CHECK_CUDA(split(c, p));
      CHECK_CUDA(cudaEventRecord(e1));
      CHECK_CUDA(dskernels::mla_decode_combine(p.o_part, p.lse_part, p.offsets, nullptr, p.B, c.s_q, c.H, p.out,
                                               p.lse, nullptr));
      CHECK_CUDA(cudaEventRecord(e2));
      CHECK_CUDA(cudaEventSynchronize(e2));
      float ms_split = 0.0f, ms_total = 0.0f;
      CHECK_CUDA(cudaEventElapsedTime(&ms_split, e0, e1));
      CHECK_CUDA(cudaEventElapsedTime(&ms_total, e0, e2));
      split_only.push_back(ms_split);
      total.push_back(ms_total);
    }
    std::sort(split_only.begin(), split_only.end());
    std::sort(total.begin(), total.end());
    const double t = total[total.size() / 2] / 1e3, t_split = split_only[split_only.size() / 2] / 1e3;
    std::printf("B=%d L=%d H=%d s_q=%d items=%d: %7.1f us (split %7.1f us), %4.0f TFLOPS, %5.0f GB/s, "
                "%.2f of roofline\n",
                B, seq, H, s_q, p.max_items, t * 1e6, t_split * 1e6, flops / t / 1e12, bytes / t / 1e9, roof / t);
    free_problem(p);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaEventDestroy(e2);
  cudaFree(flush);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "bench") == 0) return bench();
  return correctness(argc > 1 && std::strcmp(argv[1], "sanitize") == 0);
}
