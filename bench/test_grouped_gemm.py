"""Grouped GEMMs of a MoE layer on the shapes DeepGEMM's H200 figures cover (bench/anchors.json):
contiguous (prefill/training, G experts x about m_mean rows, ragged or even) and masked (decode, about
m_expected rows per expert), FP8 against bf16 `torch._grouped_mm` on the same rows in the same run, with
DeepGEMM's eager figure as a reference line (compare it with eager_us); the k-grouped weight gradient
on DeepGEMM's H100 shapes. FLOPs count valid rows only (padding rows and rows past masked_m are not work).
"""
import pytest
import torch

import dskernels
from bench.harness import anchor_row, anchors

BACKENDS = ["cuda", "triton"]
ALIGN = 128


def counts_for(G, mean, ragged, seed):
    """Rows per expert: mean each, or ragged (uniform in [0.3, 1.7] x mean, seeded; one expert empty)."""
    if not ragged:
        return [mean] * G
    g = torch.Generator().manual_seed(seed)
    counts = (mean * (0.3 + 1.4 * torch.rand(G, generator=g))).int().tolist()
    counts[G // 2] = 0
    return counts


def contiguous_layout(counts):
    ids = []
    for e, n in enumerate(counts):
        ids += [e] * n + [-1] * ((-n) % ALIGN)
    return torch.tensor(ids, dtype=torch.int32, device="cuda")


def experts(G, N, K):
    w = torch.randn(G, N, K, dtype=torch.bfloat16, device="cuda")
    qs = [dskernels.per_block_quant(w[g]) for g in range(G)]
    return w, torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def grouped_mm_bf16(x, w, counts):
    """torch._grouped_mm on the valid rows (x stacked without padding, offs = cumulative row counts), or None
    with the reason."""
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    try:
        fn = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs, out_dtype=torch.bfloat16)  # noqa: E731
        fn()
        return fn, None
    except (RuntimeError, AttributeError, TypeError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"


def anchor(section, match):
    row = anchor_row(section, lambda r: all(r.get(k) == v for k, v in match.items()))
    return {k: v for k, v in row.items() if k.startswith(("dg_", "grouped_mm"))} if row else {}


CONTIGUOUS = [(r["G"], r["m_mean"], r["N"], r["K"], r["ragged"]) for r in
              anchors("NVIDIA H200").get("grouped_fp8_gemm_contiguous", [])]
MASKED = [(r["G"], r["m_expected"], r["N"], r["K"]) for r in anchors("NVIDIA H200").get("grouped_fp8_gemm_masked", [])]
K_GROUPED = [(r["groups"], r["M"], r["N"], r["K_total"]) for r in
             anchors("NVIDIA H100 80GB HBM3").get("grouped_fp8_gemm_weight_gradient_k_grouped_kernel_time", [])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CONTIGUOUS, ids=lambda c: "G{}-m{}-N{}-K{}{}".format(*c[:4], "-ragged" * c[4]))
def test_contiguous(report, case, backend):
    G, mean, N, K, ragged = case
    counts = counts_for(G, mean, ragged, seed=G * mean)
    m_indices = contiguous_layout(counts)
    rows = sum(counts)
    x_valid = torch.randn(rows, K, dtype=torch.bfloat16, device="cuda")
    x = torch.zeros(m_indices.shape[0], K, dtype=torch.bfloat16, device="cuda")
    x[m_indices != -1] = x_valid
    a, sa = dskernels.per_token_group_quant(x, scale_layout="col")
    w, b, sb = experts(G, N, K)
    peer_fn, why = grouped_mm_bf16(x_valid, w, counts)
    extra = anchor("grouped_fp8_gemm_contiguous", {"G": G, "m_mean": mean, "N": N, "K": K, "ragged": ragged})
    if why:
        extra["grouped_mm_unavailable"] = why
    report(op="m_grouped_fp8_gemm_contiguous", backend=backend,
           shape={"G": G, "m_mean": mean, "N": N, "K": K, "ragged": ragged},
           fn=lambda: dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, backend=backend),
           flops=2 * rows * N * K, bytes_moved=m_indices.shape[0] * K + G * N * K + 2 * rows * N,
           bound="fp8_TFLOPS", peer="torch._grouped_mm bf16" if peer_fn else None, peer_fn=peer_fn,
           headline="eager", extra=extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", MASKED, ids=lambda c: "G{}-m{}-N{}-K{}".format(*c))
def test_masked(report, case, backend):
    G, expected, N, K = case
    g = torch.Generator().manual_seed(G * expected)
    masked = (expected * (0.7 + 0.6 * torch.rand(G, generator=g))).int().clamp_min(1).tolist()
    M_max = -(-max(masked) // ALIGN) * ALIGN
    masked_m = torch.tensor(masked, dtype=torch.int32, device="cuda")
    x = torch.randn(G, M_max, K, dtype=torch.bfloat16, device="cuda")
    a, sa = dskernels.per_token_group_quant(x.view(-1, K), scale_layout="col")  # (as the MoE layer's permute)
    a, sa = a.view(G, M_max, K), sa.view(G, M_max, -1)
    w, b, sb = experts(G, N, K)
    valid = torch.cat([x[e, :n] for e, n in enumerate(masked)])
    peer_fn, why = grouped_mm_bf16(valid, w, masked)
    extra = anchor("grouped_fp8_gemm_masked", {"G": G, "m_expected": expected, "N": N, "K": K})
    if why:
        extra["grouped_mm_unavailable"] = why
    rows = sum(masked)
    report(op="m_grouped_fp8_gemm_masked", backend=backend, shape={"G": G, "m_expected": expected, "N": N, "K": K},
           fn=lambda: dskernels.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, expected, backend=backend),
           flops=2 * rows * N * K, bytes_moved=rows * K + G * N * K + 2 * rows * N,
           bound="copy_GBps" if expected <= 64 else "fp8_TFLOPS",
           peer="torch._grouped_mm bf16" if peer_fn else None, peer_fn=peer_fn, headline="graph", extra=extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", K_GROUPED, ids=lambda c: "G{}-M{}-N{}-K{}".format(*c))
def test_k_grouped(report, case, backend):
    G, M, N, K_total = case
    g = torch.Generator().manual_seed(G)
    sizes = (torch.rand(G, generator=g) + 0.5)
    sizes = (sizes / sizes.sum() * K_total / ALIGN).round().int().clamp_min(0) * ALIGN
    T = int(sizes.sum())
    k_offsets = torch.tensor([0, *sizes.cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    dy = torch.randn(T, M, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(T, N, dtype=torch.bfloat16, device="cuda")
    a, sa = dskernels.per_token_group_quant_transposed(dy, scale_layout="col")
    b, sb = dskernels.per_token_group_quant_transposed(x, scale_layout="col")
    out = torch.zeros(G, M, N, dtype=torch.float32, device="cuda")
    report(op="k_grouped_fp8_gemm", backend=backend, shape={"G": G, "M": M, "N": N, "K_total": T},
           fn=lambda: dskernels.k_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, k_offsets, out, backend=backend),
           flops=2 * M * N * T, bytes_moved=(M + N) * T + 8 * G * M * N, bound="fp8_TFLOPS", extra={})
