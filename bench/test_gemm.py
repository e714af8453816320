"""Block-wise FP8 GEMM on DeepSeek-V3's shapes: TFLOPS and GB/s, the fraction of the measured fp8
ceiling (M = 4096) or copy ceiling (M <= 128, bound by reading b), the speedup over cuBLAS
block-wise (torch._scaled_mm) and bf16 cuBLAS (torch.matmul) measured in the same run, and
DeepGEMM's figure from bench/anchors.json as a reference line."""
import pytest
import torch

import dskernels
from bench.harness import anchor_row
from dskernels.reference import gemm as ref
from dskernels.shapes import GEMM_BROAD, GEMM_M, GEMM_NK

BACKENDS = ["cuda", "triton"]
SHAPES = [(m, n, k) for m in GEMM_M for n, k in GEMM_NK]


def operands(M, N, K):
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda")
    a, sa = dskernels.per_token_group_quant(x, scale_layout="col")
    b, sb = dskernels.per_block_quant(w)
    return x, w, a, sa, b, sb


def cublas_blockwise(a, sa, b, sb):
    """torch._scaled_mm with 1x128 / 128x128 scales, or None with the reason. torch 2.9-2.11 want
    a's [M, K/128] scales column-major with stride exactly M, and check b's scales transposed
    against b = mat2.T ([N, K]): scale_b.T must be [ceil(N/128), K/128] row-major, i.e. our b_scale,
    passed as b_scale.T. Other versions checked them against mat2 ([K/128, N/128] row-major, the row
    stride sometimes padded to a multiple of 4). Try each layout, keep the first whose result
    matches the reference; the reasons of all failures go into the record."""
    want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
    M, Kb = sa.shape
    Nb = sb.shape[0]
    sa_col = torch.empty_strided((M, Kb), (1, M), dtype=torch.float32, device=sa.device).copy_(sa)
    sb_kn = sb.t().contiguous()
    sb_kn_padded = torch.empty_strided((Kb, Nb), ((Nb + 3) // 4 * 4, 1), dtype=torch.float32,
                                       device=sb.device).copy_(sb.t())
    errors = []
    for sa_l, sb_l in [(sa_col, sb.t()), (sa_col, sb_kn), (sa_col, sb_kn_padded)]:
        try:
            fn = lambda: torch._scaled_mm(a, b.t(), sa_l, sb_l, out_dtype=torch.bfloat16)  # noqa: E731
            got = fn().float()
        except (RuntimeError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
            continue
        if ((got - want).norm() / want.norm()).item() < 1e-2:
            return fn, None
        errors.append("wrong result")
    return None, "; ".join(errors)


def anchor_line(M, N, K):
    row = anchor_row("fp8_gemm", lambda r: (r["M"], r["N"], r["K"]) == (M, N, K))
    return {"deepgemm_tflops": row["deepgemm_tflops"]} if row else {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp8_gemm(report, shape, backend):
    M, N, K = shape
    x, w, a, sa, b, sb = operands(M, N, K)
    peer_fn, why = cublas_blockwise(a, sa, b, sb)
    extra = anchor_line(M, N, K)
    if why:
        extra["cublas_blockwise_unavailable"] = why
    report(op="fp8_gemm", backend=backend, shape={"M": M, "N": N, "K": K},
           fn=lambda: dskernels.fp8_gemm(a, sa, b, sb, backend=backend),
           flops=2 * M * N * K, bytes_moved=M * K + N * K + 2 * M * N + 4 * (sa.numel() + sb.numel()),
           bound="fp8_TFLOPS" if M > 128 else "copy_GBps",
           peer="cuBLAS block-wise (torch._scaled_mm)" if peer_fn else None, peer_fn=peer_fn,
           more_peers={"bf16_matmul": lambda: x @ w.T}, extra=extra)


@pytest.mark.parametrize("shape", GEMM_BROAD, ids=lambda s: "x".join(map(str, s)))
def test_fp8_gemm_grid(report, shape):
    """The broad grid (dskernels.shapes.GEMM_BROAD: other models' projections, M from 1 to 16384), CUDA
    against cuBLAS block-wise; bench.report summarizes it (geomean, worst shape)."""
    M, N, K = shape
    x, w, a, sa, b, sb = operands(M, N, K)
    peer_fn, why = cublas_blockwise(a, sa, b, sb)
    report(op="fp8_gemm_grid", backend="cuda", shape={"M": M, "N": N, "K": K},
           fn=lambda: dskernels.fp8_gemm(a, sa, b, sb, backend="cuda"),
           flops=2 * M * N * K, bytes_moved=M * K + N * K + 2 * M * N + 4 * (sa.numel() + sb.numel()),
           bound="fp8_TFLOPS" if M > 128 else "copy_GBps",
           peer="cuBLAS block-wise (torch._scaled_mm)" if peer_fn else None, peer_fn=peer_fn,
           extra={"cublas_blockwise_unavailable": why} if why else {})
