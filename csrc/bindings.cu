// The Python module dskernels._C. Tensors arrive as (pointer, sizes, strides) integers that the
// Python layer read off torch, DLPack or __cuda_array_interface__ objects and checked; streams as
// integers. No PyTorch headers: the module builds in seconds and works with any torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include "common.cuh"
#include <tuple>

#include "gemm/fp8_gemm.h"
#include "gemm/fp8_grouped_gemm.h"
#include "mla/mla_decode.h"
#include "quant/quant.h"

namespace py = pybind11;
using namespace dskernels;

namespace {

template <typename T = void>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
cudaStream_t stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// The current device's properties, or a RuntimeError naming why there is no usable GPU.
py::dict device_info() {
  int count = 0, device = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  py::dict d;
  d["count"] = count;
  d["device"] = device;
  d["name"] = std::string(prop.name);
  d["capability"] = py::make_tuple(prop.major, prop.minor);
  d["sms"] = prop.multiProcessorCount;
  d["smem_per_block_optin"] = prop.sharedMemPerBlockOptin;
  d["l2_bytes"] = prop.l2CacheSize;
  return d;
}

// cudaErrorInvalidValue means a rule of the kernel's header was broken that the Python checks
// should have caught first: a bug on our side, raised as ValueError with the kernel's name.
void check_kernel(cudaError_t err, const char* kernel) {
  if (err == cudaErrorInvalidValue)
    throw std::invalid_argument(std::string(kernel) + ": an argument breaks a rule of its header in csrc/");
  check_cuda(err, kernel);
}

void fp8_gemm_binding(uintptr_t a, uintptr_t a_scale, int a_scale_ld, uintptr_t b, uintptr_t b_scale,
                      int b_scale_ld, bool b_per_row, uintptr_t out, bool out_fp32, bool accumulate,
                      int M, int N, int K, int num_sms, uintptr_t st) {
  const auto gran = b_per_row ? ScaleGranularity::k1D1D : ScaleGranularity::k1D2D;
  const cudaError_t err = fp8_gemm(ptr(a), ptr<const float>(a_scale), a_scale_ld, ptr(b),
                                   ptr<const float>(b_scale), b_scale_ld, gran, ptr(out), out_fp32,
                                   accumulate, M, N, K, num_sms, stream(st));
  check_kernel(err, "fp8_gemm");
}

// A grouped GEMM's config from Python: (block_m, block_n, epilogue) or (0, 0, 0) for the heuristics' pick
// (tests run every compiled config through this).
struct ConfigArg {
  Fp8GemmConfig config{0, 0};
  explicit ConfigArg(const std::tuple<int, int, int>& c)
      : config{std::get<0>(c), std::get<1>(c), static_cast<Fp8GemmEpilogue>(std::get<2>(c))} {}
  const Fp8GemmConfig* get() const { return config.block_m == 0 ? nullptr : &config; }
};

void m_grouped_contiguous_binding(uintptr_t a, uintptr_t a_scale, int a_scale_ld, uintptr_t b, uintptr_t b_scale,
                                  uintptr_t m_indices, uintptr_t out, int M, int N, int K, int G, int num_sms,
                                  uintptr_t st, std::tuple<int, int, int> config) {
  const ConfigArg c(config);
  check_kernel(fp8_m_grouped_gemm_contiguous(ptr(a), ptr<const float>(a_scale), a_scale_ld, ptr(b),
                                             ptr<const float>(b_scale), ptr<const int>(m_indices), ptr(out), M, N, K,
                                             G, num_sms, stream(st), c.get()),
               "m_grouped_fp8_gemm_nt_contiguous");
}

void m_grouped_masked_binding(uintptr_t a, uintptr_t a_scale, int a_scale_ld, long long a_scale_gs, uintptr_t b,
                              uintptr_t b_scale, uintptr_t masked_m, uintptr_t out, int M_max, int N, int K, int G,
                              int expected_m, int num_sms, uintptr_t st, std::tuple<int, int, int> config) {
  const ConfigArg c(config);
  check_kernel(fp8_m_grouped_gemm_masked(ptr(a), ptr<const float>(a_scale), a_scale_ld, a_scale_gs, ptr(b),
                                         ptr<const float>(b_scale), ptr<const int>(masked_m), ptr(out), M_max, N, K,
                                         G, expected_m, num_sms, stream(st), c.get()),
               "m_grouped_fp8_gemm_nt_masked");
}

void k_grouped_binding(uintptr_t a, uintptr_t a_scale, int a_scale_ld, uintptr_t b, uintptr_t b_scale,
                       int b_scale_ld, uintptr_t k_offsets, uintptr_t out, bool accumulate, int M, int N, int K_total,
                       int G, int num_sms, uintptr_t st, std::tuple<int, int, int> config) {
  const ConfigArg c(config);
  check_kernel(fp8_k_grouped_gemm(ptr(a), ptr<const float>(a_scale), a_scale_ld, ptr(b), ptr<const float>(b_scale),
                                  b_scale_ld, ptr<const int>(k_offsets), ptr<float>(out), accumulate, M, N, K_total, G,
                                  num_sms, stream(st), c.get()),
               "k_grouped_fp8_gemm_nt_contiguous");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dskernels CUDA kernels (sm_90a); called through the dskernels Python API";
  m.def("device_info", &device_info);
  m.def("cuda_runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });

  m.def("fp8_gemm", &fp8_gemm_binding);
  const auto auto_config = std::make_tuple(0, 0, 0);
  m.def("m_grouped_fp8_gemm_contiguous", &m_grouped_contiguous_binding, py::arg("a"), py::arg("a_scale"),
        py::arg("a_scale_ld"), py::arg("b"), py::arg("b_scale"), py::arg("m_indices"), py::arg("out"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("G"), py::arg("num_sms"), py::arg("stream"),
        py::arg("config") = auto_config);
  m.def("m_grouped_fp8_gemm_masked", &m_grouped_masked_binding, py::arg("a"), py::arg("a_scale"),
        py::arg("a_scale_ld"), py::arg("a_scale_gs"), py::arg("b"), py::arg("b_scale"), py::arg("masked_m"),
        py::arg("out"), py::arg("M_max"), py::arg("N"), py::arg("K"), py::arg("G"), py::arg("expected_m"),
        py::arg("num_sms"), py::arg("stream"), py::arg("config") = auto_config);
  m.def("k_grouped_fp8_gemm", &k_grouped_binding, py::arg("a"), py::arg("a_scale"), py::arg("a_scale_ld"),
        py::arg("b"), py::arg("b_scale"), py::arg("b_scale_ld"), py::arg("k_offsets"), py::arg("out"),
        py::arg("accumulate"), py::arg("M"), py::arg("N"), py::arg("K_total"), py::arg("G"), py::arg("num_sms"),
        py::arg("stream"), py::arg("config") = auto_config);
  m.def("fp8_grouped_gemm_config_supported", [](int layout, int block_m, int block_n, int epilogue) {
    const Fp8GemmConfig config{block_m, block_n, static_cast<Fp8GemmEpilogue>(epilogue)};
    return fp8_grouped_gemm_config_supported(layout, config);
  });
  m.def("mla_decode_split", [](uintptr_t q, uintptr_t cache, int num_pages, int64_t page_stride,
                               uintptr_t block_table, int bt_stride, int max_pages, uintptr_t seqlens, uintptr_t items,
                               uintptr_t offsets, uintptr_t bad, uintptr_t made_seqlens, uintptr_t made_table_hash,
                               uintptr_t error, int max_items, int B, int s_q, int H, float scale, bool causal,
                               uintptr_t o_partial, uintptr_t lse_partial, uintptr_t out, uintptr_t lse,
                               uintptr_t st) {
    check_kernel(mla_decode_split(ptr(q), ptr(cache), num_pages, page_stride, ptr<const int>(block_table), bt_stride,
                                  max_pages, ptr<const int>(seqlens), ptr<const int>(items), ptr<const int>(offsets),
                                  ptr<const int>(bad), ptr<const int>(made_seqlens), ptr<const int>(made_table_hash),
                                  ptr<int>(error), max_items, B, s_q, H, scale, causal, ptr<float>(o_partial),
                                  ptr<float>(lse_partial), ptr(out), ptr<float>(lse), stream(st)),
                 "mla_decode_split");
  });
  m.def("mla_decode_combine", [](uintptr_t o_partial, uintptr_t lse_partial, uintptr_t offsets, uintptr_t bad,
                                 int B, int s_q, int H, uintptr_t out, uintptr_t lse, uintptr_t st) {
    check_kernel(mla_decode_combine(ptr<const float>(o_partial), ptr<const float>(lse_partial),
                                    ptr<const int>(offsets), ptr<const int>(bad), B, s_q, H, ptr(out),
                                    ptr<float>(lse), stream(st)),
                 "mla_decode_combine");
  });
  m.def("mla_decode_schedule", [](uintptr_t seqlens, uintptr_t block_table, int bt_stride, int B, int max_pages,
                                  int num_pages, int s_q, int num_parts, uintptr_t items, uintptr_t offsets,
                                  uintptr_t bad, uintptr_t made_seqlens, uintptr_t made_table_hash, uintptr_t error,
                                  uintptr_t st) {
    check_kernel(mla_decode_schedule(ptr<const int>(seqlens), ptr<const int>(block_table), bt_stride, B,
                                     max_pages, num_pages, s_q, num_parts, ptr<int>(items), ptr<int>(offsets),
                                     ptr<int>(bad), ptr<int>(made_seqlens), ptr<int>(made_table_hash),
                                     ptr<int>(error), stream(st)),
                 "mla_decode_schedule");
  });
  m.def("quant_groups", [](uintptr_t x, int dtype, int rows, int cols, int64_t ld_x, uintptr_t q,
                           int64_t ld_q, uintptr_t s, int64_t s_r, int64_t s_g, bool pow2,
                           uintptr_t st) {
    quant_groups(ptr(x), DType(dtype), rows, cols, ld_x, ptr(q), ld_q, ptr<float>(s), s_r, s_g, pow2,
                 stream(st));
  });
  m.def("quant_groups_transposed", [](uintptr_t x, int dtype, int M, int K, int64_t ld_x,
                                      uintptr_t q_t, int64_t ld_q, uintptr_t s, int64_t s_r,
                                      int64_t s_g, bool pow2, uintptr_t st) {
    quant_groups_transposed(ptr(x), DType(dtype), M, K, ld_x, ptr(q_t), ld_q, ptr<float>(s), s_r,
                            s_g, pow2, stream(st));
  });
  m.def("quant_groups_both", [](uintptr_t x, int dtype, int M, int K, int64_t ld_x, uintptr_t q, int64_t ld_q,
                                int K_out, uintptr_t s, int64_t s_r, int64_t s_g, uintptr_t q_t, int64_t ld_qt,
                                int M_out, uintptr_t st, int64_t st_r, int64_t st_g, bool pow2, uintptr_t strm) {
    quant_groups_both(ptr(x), DType(dtype), M, K, ld_x, ptr(q), ld_q, K_out, ptr<float>(s), s_r, s_g, ptr(q_t),
                      ld_qt, M_out, ptr<float>(st), st_r, st_g, pow2, stream(strm));
  });
  m.def("quant_blocks", [](uintptr_t w, int dtype, int N, int K, int64_t ld_w, uintptr_t q,
                           int64_t ld_q, uintptr_t s, int64_t s_r, int64_t s_g, bool pow2,
                           uintptr_t st) {
    quant_blocks(ptr(w), DType(dtype), N, K, ld_w, ptr(q), ld_q, ptr<float>(s), s_r, s_g, pow2,
                 stream(st));
  });
  m.def("quant_blocks_both", [](uintptr_t w, int dtype, int N, int K, int64_t ld_w, uintptr_t q, int64_t ld_q,
                                uintptr_t s, int64_t s_r, int64_t s_g, uintptr_t q_t, int64_t ld_qt, int N_out,
                                uintptr_t st, int64_t st_r, int64_t st_g, bool pow2, uintptr_t strm) {
    quant_blocks_both(ptr(w), DType(dtype), N, K, ld_w, ptr(q), ld_q, ptr<float>(s), s_r, s_g, ptr(q_t), ld_qt, N_out,
                      ptr<float>(st), st_r, st_g, pow2, stream(strm));
  });
  m.def("dequant", [](uintptr_t q, int rows, int cols, int64_t ld_q, uintptr_t s, int64_t s_r,
                      int64_t s_g, int block_rows, uintptr_t out, int out_dtype, int64_t ld_out,
                      uintptr_t st) {
    dequant(ptr(q), rows, cols, ld_q, ptr<const float>(s), s_r, s_g, block_rows, ptr(out),
            DType(out_dtype), ld_out, stream(st));
  });
}
