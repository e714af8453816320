// Standalone check of the quantization kernels (quant.cu) against a host reference of the same fp32
// arithmetic: every byte and every scale must be identical, on tail shapes (a row of 1, K not a
// multiple of 128 or of 8, rows just past a block), for fp32, bf16 and fp16 inputs, row-major and
// MN-major scales, amax and power-of-two scales. Outputs start poisoned (0xFF) with guard bytes after
// them, so an unwritten element or a write past the end shows.
//
// Build and run on a GPU (no PyTorch needed):
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        csrc/quant/quant.cu csrc/quant/quant_selftest.cu -o quant_selftest
//   ./quant_selftest            # every case, one line per failure, exit 1 on any mismatch
//   ./quant_selftest sanitize   # the same cases (they are small): for compute-sanitizer
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "quant.h"
#include "../selftest.cuh"

using dskernels::DType;

namespace {

constexpr int kGuard = 256;
constexpr uint8_t kPoison = 0xFF;

// Host twins of common.cuh's scale_from_amax and to_e4m3x2: the same IEEE fp32 operations.
float host_scale(float amax, bool pow2) {
  float scale = std::fmax(amax, dskernels::kAmaxFloor) / dskernels::kFp8Max;
  if (pow2) {
    uint32_t bits;
    std::memcpy(&bits, &scale, 4);
    bits = (bits + 0x7FFFFFu) & 0x7F800000u;
    std::memcpy(&scale, &bits, 4);
  }
  return scale;
}

uint8_t host_e4m3(float v) {
  v = std::isnan(v) ? v : std::fmin(std::fmax(v, -dskernels::kFp8Max), dskernels::kFp8Max);
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

float host_from_e4m3(uint8_t b) { return float(__half(__nv_cvt_fp8_to_halfraw(b, __NV_E4M3))); }

// A device buffer of `bytes` poisoned bytes followed by kGuard guard bytes.
struct Buf {
  uint8_t* p = nullptr;
  size_t bytes = 0;
  explicit Buf(size_t n) : bytes(n) {
    CHECK_CUDA(cudaMalloc(&p, n + kGuard));
    CHECK_CUDA(cudaMemset(p, kPoison, n + kGuard));
  }
  ~Buf() { cudaFree(p); }
  std::vector<uint8_t> host(bool* guard_ok) const {
    std::vector<uint8_t> h(bytes + kGuard);
    CHECK_CUDA(cudaMemcpy(h.data(), p, h.size(), cudaMemcpyDeviceToHost));
    *guard_ok = true;
    for (int i = 0; i < kGuard; ++i) *guard_ok &= h[bytes + i] == kPoison;
    h.resize(bytes);
    return h;
  }
};

struct Input {
  DType dtype;
  std::vector<float> values;     // the exact values the kernel reads (already rounded to dtype)
  std::vector<uint8_t> raw;      // their bytes in dtype
};

// With g_specials set, make_input plants NaN, +Inf and -Inf in some rows (a NaN must stay in its element, an
// infinity makes its tile's scale infinite and the tile's bytes NaN or 0).
bool g_specials = false;

float special_at(int r, int c, int cols, float v) {
  if (r % 3 == 0 && c == (r * 37) % cols) return std::nanf("");
  if (r % 5 == 1 && c == (r * 11 + 3) % cols) return INFINITY;
  if (r % 7 == 2 && c == (r * 13 + 1) % cols) return -INFINITY;
  return v;
}

// Rows of normal values whose magnitude varies by 10^+-2 per row, with exact zeros mixed in.
Input make_input(int rows, int cols, DType dtype, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  Input in{dtype, std::vector<float>(size_t(rows) * cols), {}};
  const int esize = dtype == DType::kFloat32 ? 4 : 2;
  in.raw.resize(in.values.size() * esize);
  for (int r = 0; r < rows; ++r) {
    const float mag = std::pow(10.0f, uniform(rng));
    for (int c = 0; c < cols; ++c) {
      const size_t i = size_t(r) * cols + c;
      float v = (rng() % 20 == 0) ? 0.0f : normal(rng) * mag;
      if (g_specials) v = special_at(r, c, cols, v);
      if (dtype == DType::kBFloat16) {
        const __nv_bfloat16 h = __float2bfloat16_rn(v);
        v = __bfloat162float(h);
        std::memcpy(&in.raw[2 * i], &h, 2);
      } else if (dtype == DType::kFloat16) {
        const __half h = __float2half_rn(v);
        v = __half2float(h);
        std::memcpy(&in.raw[2 * i], &h, 2);
      } else {
        std::memcpy(&in.raw[4 * i], &v, 4);
      }
      in.values[i] = v;
    }
  }
  return in;
}

const char* dtype_name(DType d) { return d == DType::kFloat32 ? "fp32" : d == DType::kBFloat16 ? "bf16" : "fp16"; }

int g_failures = 0, g_cases = 0;

// e4m3 bytes equal, a NaN (0x7F or 0xFF: the host's conversion and the device's may differ in its sign)
// matching any NaN.
bool same_e4m3(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want) {
  if (got.size() != want.size()) return false;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i] && !((got[i] & 0x7F) == 0x7F && (want[i] & 0x7F) == 0x7F)) return false;
  return true;
}

void report(bool ok, const char* what, int rows, int cols, DType dtype, bool pow2, bool mn_major, const char* why) {
  ++g_cases;
  if (ok) return;
  ++g_failures;
  std::printf("FAIL %s%s rows=%d cols=%d %s pow2=%d scales=%s: %s\n", what, g_specials ? " (NaN/Inf)" : "", rows,
              cols, dtype_name(dtype), int(pow2), mn_major ? "mn-major" : "row-major", why);
}

// Quantize the [R, C] matrix whose element (r, c) is at(r, c), tiles of tile_r x 128: the reference
// bytes (row-major, R x C) and scales (row-major [ceil(R/tile_r), ceil(C/128)]).
template <typename At>
void host_quant(int R, int C, int tile_r, bool pow2, At at, std::vector<uint8_t>& q, std::vector<float>& s) {
  const int tr = (R + tile_r - 1) / tile_r, tc = (C + 127) / 128;
  q.assign(size_t(R) * C, 0);
  s.assign(size_t(tr) * tc, 0.0f);
  for (int i = 0; i < tr; ++i)
    for (int j = 0; j < tc; ++j) {
      float amax = 0.0f;
      for (int r = i * tile_r; r < std::min(R, (i + 1) * tile_r); ++r)
        for (int c = j * 128; c < std::min(C, (j + 1) * 128); ++c) amax = std::fmax(amax, std::fabs(at(r, c)));
      const float scale = host_scale(amax, pow2), inv = 1.0f / scale;
      s[size_t(i) * tc + j] = scale;
      for (int r = i * tile_r; r < std::min(R, (i + 1) * tile_r); ++r)
        for (int c = j * 128; c < std::min(C, (j + 1) * 128); ++c) q[size_t(r) * C + c] = host_e4m3(at(r, c) * inv);
    }
}

// Compare device scales (strides s_r, s_g over a buffer) with the host's row-major [tr, tc].
bool same_scales(const std::vector<uint8_t>& dev, const std::vector<float>& want, int tr, int tc, int64_t s_r,
                 int64_t s_g) {
  for (int i = 0; i < tr; ++i)
    for (int j = 0; j < tc; ++j) {
      float got;
      std::memcpy(&got, &dev[4 * (i * s_r + j * s_g)], 4);
      if (std::memcmp(&got, &want[size_t(i) * tc + j], 4) != 0) return false;
    }
  return true;
}

// One quantization layout: "groups" (x [M, K], 1 x 128 tiles), "transposed" (q_t [K, M] = x.T in
// 1 x 128 tiles along M), "blocks" (128 x 128 tiles).
void check_quant(const char* what, int M, int K, DType dtype, bool pow2, bool mn_major, std::mt19937& rng) {
  const Input in = make_input(M, K, dtype, rng);
  const bool transposed = std::strcmp(what, "transposed") == 0, blocks = std::strcmp(what, "blocks") == 0;
  const int R = transposed ? K : M, C = transposed ? M : K, tile_r = blocks ? 128 : 1;
  const int tr = (R + tile_r - 1) / tile_r, tc = (C + 127) / 128;
  // MN-major: scale(i, j) at j * ld + i with ld = tr rounded up to 4 (what the GEMM's TMA reads).
  const int64_t ld = (tr + 3) / 4 * 4;
  const int64_t s_r = mn_major ? 1 : tc, s_g = mn_major ? ld : 1;
  Buf x(in.raw.size()), q(size_t(R) * C), s(size_t(mn_major ? ld * tc : int64_t(tr) * tc) * 4);
  CHECK_CUDA(cudaMemcpy(x.p, in.raw.data(), in.raw.size(), cudaMemcpyHostToDevice));
  if (transposed)
    dskernels::quant_groups_transposed(x.p, dtype, M, K, K, q.p, M, reinterpret_cast<float*>(s.p), s_r, s_g, pow2,
                                       nullptr);
  else if (blocks)
    dskernels::quant_blocks(x.p, dtype, M, K, K, q.p, K, reinterpret_cast<float*>(s.p), s_r, s_g, pow2, nullptr);
  else
    dskernels::quant_groups(x.p, dtype, M, K, K, q.p, K, reinterpret_cast<float*>(s.p), s_r, s_g, pow2, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint8_t> want_q;
  std::vector<float> want_s;
  host_quant(R, C, tile_r, pow2,
             [&](int r, int c) { return transposed ? in.values[size_t(c) * K + r] : in.values[size_t(r) * K + c]; },
             want_q, want_s);
  bool guard_q, guard_s;
  const std::vector<uint8_t> got_q = q.host(&guard_q), got_s = s.host(&guard_s);
  const char* why = !guard_q || !guard_s        ? "wrote past the end"
                    : !same_e4m3(got_q, want_q)  ? "e4m3 bytes differ"
                    : !same_scales(got_s, want_s, tr, tc, s_r, s_g) ? "scales differ"
                                                 : nullptr;
  report(why == nullptr, what, M, K, dtype, pow2, mn_major, why);
}

// quant_groups_both: both layouts from one read, MN-major scales, zero-padded to multiples of 128 when
// `pad`: q [M, K_out] must hold the groups' bytes then zeros, q_t [K, M_out] the transposed ones then zeros.
void check_both(int M, int K, DType dtype, bool pow2, bool pad, std::mt19937& rng) {
  const Input in = make_input(M, K, dtype, rng);
  const int K_out = pad ? (K + 127) / 128 * 128 : K, M_out = pad ? (M + 127) / 128 * 128 : M;
  const int kb = (K + 127) / 128, mb = (M + 127) / 128;
  const int64_t ld_s = (M + 3) / 4 * 4, ld_st = (K + 3) / 4 * 4;  // MN-major: scale(i, j) at j * ld + i
  Buf x(in.raw.size()), q(size_t(M) * K_out), sc(size_t(ld_s) * kb * 4), qt(size_t(K) * M_out),
      st(size_t(ld_st) * mb * 4);
  CHECK_CUDA(cudaMemcpy(x.p, in.raw.data(), in.raw.size(), cudaMemcpyHostToDevice));
  dskernels::quant_groups_both(x.p, dtype, M, K, K, q.p, K_out, K_out, reinterpret_cast<float*>(sc.p), 1, ld_s, qt.p,
                               M_out, M_out, reinterpret_cast<float*>(st.p), 1, ld_st, pow2, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint8_t> want_q, want_qt;
  std::vector<float> want_s, want_st;
  host_quant(M, K, 1, pow2, [&](int r, int c) { return in.values[size_t(r) * K + c]; }, want_q, want_s);
  host_quant(K, M, 1, pow2, [&](int r, int c) { return in.values[size_t(c) * K + r]; }, want_qt, want_st);
  auto widen = [](const std::vector<uint8_t>& v, int rows, int cols, int cols_out) {
    std::vector<uint8_t> w(size_t(rows) * cols_out, 0);
    for (int r = 0; r < rows; ++r) std::copy_n(&v[size_t(r) * cols], cols, &w[size_t(r) * cols_out]);
    return w;
  };
  bool guards[4];
  const std::vector<uint8_t> got_q = q.host(&guards[0]), got_s = sc.host(&guards[1]), got_qt = qt.host(&guards[2]),
                             got_st = st.host(&guards[3]);
  const char* why = !(guards[0] && guards[1] && guards[2] && guards[3]) ? "wrote past the end"
                    : !same_e4m3(got_q, widen(want_q, M, K, K_out))   ? "row-wise bytes differ"
                    : !same_e4m3(got_qt, widen(want_qt, K, M, M_out)) ? "transposed bytes differ"
                    : !same_scales(got_s, want_s, M, kb, 1, ld_s)       ? "row-wise scales differ"
                    : !same_scales(got_st, want_st, K, mb, 1, ld_st)    ? "transposed scales differ"
                                                                        : nullptr;
  report(why == nullptr, pad ? "both (padded)" : "both", M, K, dtype, pow2, true, why);
}

// quant_blocks_both: w [N, K] per 128 x 128 block and its transpose from one read: q must be what
// quant_blocks writes, q_t [K, N_out] its transpose then zero columns (pad), the scales [N/128, K/128]
// row-major and their transpose [K/128, N/128] row-major.
void check_blocks_both(int N, int K, DType dtype, bool pow2, bool pad, std::mt19937& rng) {
  const Input in = make_input(N, K, dtype, rng);
  const int N_out = pad ? (N + 127) / 128 * 128 : N;
  const int kb = (K + 127) / 128, nb = (N + 127) / 128;
  Buf x(in.raw.size()), q(size_t(N) * K), sc(size_t(nb) * kb * 4), qt(size_t(K) * N_out), st(size_t(kb) * nb * 4);
  CHECK_CUDA(cudaMemcpy(x.p, in.raw.data(), in.raw.size(), cudaMemcpyHostToDevice));
  dskernels::quant_blocks_both(x.p, dtype, N, K, K, q.p, K, reinterpret_cast<float*>(sc.p), kb, 1, qt.p, N_out, N_out,
                               reinterpret_cast<float*>(st.p), nb, 1, pow2, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint8_t> want_q;
  std::vector<float> want_s;
  host_quant(N, K, 128, pow2, [&](int r, int c) { return in.values[size_t(r) * K + c]; }, want_q, want_s);
  std::vector<uint8_t> want_qt(size_t(K) * N_out, 0);
  for (int r = 0; r < N; ++r)
    for (int c = 0; c < K; ++c) want_qt[size_t(c) * N_out + r] = want_q[size_t(r) * K + c];
  bool guards[4];
  const std::vector<uint8_t> got_q = q.host(&guards[0]), got_s = sc.host(&guards[1]), got_qt = qt.host(&guards[2]),
                             got_st = st.host(&guards[3]);
  bool same_st = true;  // scale(nb, kb) at st[kb * nb_count + nb]
  for (int i = 0; i < nb; ++i)
    for (int j = 0; j < kb; ++j) {
      float got;
      std::memcpy(&got, &got_st[4 * (size_t(j) * nb + i)], 4);
      same_st = same_st && std::memcmp(&got, &want_s[size_t(i) * kb + j], 4) == 0;
    }
  const char* why = !(guards[0] && guards[1] && guards[2] && guards[3]) ? "wrote past the end"
                    : !same_e4m3(got_q, want_q)                        ? "block bytes differ"
                    : !same_e4m3(got_qt, want_qt)                      ? "transposed bytes differ"
                    : !same_scales(got_s, want_s, nb, kb, kb, 1)        ? "block scales differ"
                    : !same_st                                          ? "transposed scales differ"
                                                                        : nullptr;
  report(why == nullptr, pad ? "blocks both (padded)" : "blocks both", N, K, dtype, pow2, false, why);
}

// dequant of the host's quantization, to fp32 and bf16, for 1 x 128 and 128 x 128 tiles.
void check_dequant(int R, int C, int block_rows, DType out_dtype, std::mt19937& rng) {
  const Input in = make_input(R, C, DType::kFloat32, rng);
  std::vector<uint8_t> q;
  std::vector<float> s;
  host_quant(R, C, block_rows, false, [&](int r, int c) { return in.values[size_t(r) * C + c]; }, q, s);
  const int tc = (C + 127) / 128;
  const int esize = out_dtype == DType::kFloat32 ? 4 : 2;
  Buf dq(q.size()), ds(s.size() * 4), out(size_t(R) * C * esize);
  CHECK_CUDA(cudaMemcpy(dq.p, q.data(), q.size(), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(ds.p, s.data(), s.size() * 4, cudaMemcpyHostToDevice));
  dskernels::dequant(dq.p, R, C, C, reinterpret_cast<float*>(ds.p), tc, 1, block_rows, out.p, out_dtype, C, nullptr);
  CHECK_CUDA(cudaDeviceSynchronize());
  bool guard;
  const std::vector<uint8_t> got = out.host(&guard);
  bool same = true;
  for (int r = 0; r < R && same; ++r)
    for (int c = 0; c < C && same; ++c) {
      const size_t i = size_t(r) * C + c;
      const float v = host_from_e4m3(q[i]) * s[size_t(r / block_rows) * tc + c / 128];
      if (out_dtype == DType::kFloat32) {
        same = std::memcmp(&got[4 * i], &v, 4) == 0;
      } else {
        const __nv_bfloat16 h = __float2bfloat16_rn(v);
        same = std::memcmp(&got[2 * i], &h, 2) == 0;
      }
    }
  report(guard && same, block_rows == 1 ? "dequant groups" : "dequant blocks", R, C, out_dtype, false, false,
         !guard ? "wrote past the end" : "values differ");
}

}  // namespace

int main() {  // `quant_selftest sanitize` (ci/gpu.sh) runs these same cases: they are small already
  std::mt19937 rng(2026);
  const int shapes[][2] = {{1, 7}, {1, 128}, {3, 200}, {64, 256}, {129, 384}, {130, 1000}, {257, 136}};
  for (const auto& sh : shapes)
    for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
      for (bool pow2 : {false, true})
        for (bool mn_major : {false, true})
          for (const char* what : {"groups", "transposed", "blocks"})
            check_quant(what, sh[0], sh[1], dtype, pow2, mn_major, rng);
  for (const auto& sh : shapes)
    for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16})
      for (bool pow2 : {false, true})
        for (bool pad : {false, true}) {
          check_both(sh[0], sh[1], dtype, pow2, pad, rng);
          check_blocks_both(sh[0], sh[1], dtype, pow2, pad, rng);
        }
  // More tiles than the GPU runs at once (several waves of CTAs), tails in both dims.
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    check_quant("transposed", 4100, 1100, dtype, false, true, rng);
    check_both(4100, 1100, dtype, false, true, rng);
    check_blocks_both(4100, 1100, dtype, true, true, rng);
  }
  g_specials = true;
  for (const auto& sh : shapes)
    for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
      for (const char* what : {"groups", "transposed", "blocks"}) check_quant(what, sh[0], sh[1], dtype, false, true, rng);
      check_both(sh[0], sh[1], dtype, true, true, rng);
      check_blocks_both(sh[0], sh[1], dtype, false, true, rng);
    }
  g_specials = false;
  for (const auto& sh : shapes)
    for (int block_rows : {1, 128})
      for (DType out_dtype : {DType::kFloat32, DType::kBFloat16}) check_dequant(sh[0], sh[1], block_rows, out_dtype, rng);
  std::printf("%s: %d of %d cases failed\n", g_failures ? "FAILED" : "ALL PASSED", g_failures, g_cases);
  return g_failures ? 1 : 0;
}
