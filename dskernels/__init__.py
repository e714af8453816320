"""dskernels: DeepSeek-V3's efficiency kernels for Hopper, as CUDA and Triton, with a plain-PyTorch
reference for each. Every public op takes backend="auto" | "cuda" | "triton" | "reference"."""
from dskernels.backend import poison_outputs
from dskernels.gemm import fp8_gemm
from dskernels.grouped_gemm import (get_mk_alignment_for_contiguous_layout, k_grouped_bf16_gemm_nt_contiguous,
                                    k_grouped_fp8_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_contiguous, m_grouped_bf16_gemm_nt_masked,
                                    m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked)
from dskernels.linear import FP8Linear, fp8_linear
from dskernels.quant import (dequant, per_block_quant, per_token_group_quant, per_token_group_quant_both,
                             per_token_group_quant_transposed)

__all__ = ["per_token_group_quant", "per_token_group_quant_transposed", "per_token_group_quant_both",
           "per_block_quant", "dequant",
           "fp8_gemm", "get_mk_alignment_for_contiguous_layout", "m_grouped_fp8_gemm_nt_contiguous",
           "m_grouped_fp8_gemm_nt_masked", "m_grouped_bf16_gemm_nt_contiguous", "m_grouped_bf16_gemm_nt_masked",
           "k_grouped_fp8_gemm_nt_contiguous", "k_grouped_bf16_gemm_nt_contiguous", "fp8_linear", "FP8Linear", "poison_outputs"]
__version__ = "0.1.0"
