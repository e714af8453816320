"""Block-wise FP8 GEMM with FP32 promotion in Triton.

out[M, N] = a[M, K] @ b[N, K].T, e4m3 operands. BLOCK_K is 128, one scale block: each iteration's
tl.dot starts from zero (its accumulator never holds more than 128 K-elements), and the result is
scaled by a_scale (per row) and b_scale (per column: per 128-column block for 1D2D, per column for
1D1D) and added into the fp32 accumulator: the promotion. On Hopper tl.dot on e4m3 lowers to wgmma.
"""
import torch
import triton
import triton.language as tl

from dskernels.triton.common import EMULATE_CASTS, swizzled_tile, to_bf16


def _configs():
    if EMULATE_CASTS:  # the CPU interpreter: one small config, autotuning would only cost time
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 16, 4, 8), (64, 32, 4, 8), (64, 64, 4, 6),
                                 (64, 64, 4, 4), (64, 128, 4, 4), (64, 128, 4, 6), (128, 128, 8, 4),
                                 (128, 256, 8, 3), (128, 128, 4, 4), (64, 256, 8, 4), (128, 64, 4, 5)]]


def _prune(configs, named_args, **kwargs):
    """Autotune only the tiles that can win. M <= 128 is bound by reading b once: 64-row tiles, and
    narrow ones (16, 32 columns) that spread N = 2112 / 576 / 4096 over all SMs (a 64 x 64 grid
    fills a quarter of an H100 at M = 64, N = 2112: measured 45 us against CUDA's 15 us on 64 x 16
    tiles). Larger M is bound by the tensor cores: tiles of at least 64 x 64."""
    M = named_args["M"]
    if EMULATE_CASTS:
        return configs
    if M <= 128:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] <= 128]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_N"] >= 64]
    return keep or configs


@triton.autotune(configs=_configs(), key=["M", "N", "K", "B_PER_ROW", "ACCUMULATE"],
                 prune_configs_by={"early_config_prune": _prune},
                 restore_value=["out_ptr"])  # accumulate: every trial must start from the same out
@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, M, N, K, stride_sa_m, stride_sa_k,
                     stride_sb_n, stride_sb_k, B_PER_ROW: tl.constexpr, ACCUMULATE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                     EMULATE: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = swizzled_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    m_ok, n_ok = rm < M, rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * K + rk[None, :]
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * K + rk[:, None]      # [128, BLOCK_N], K-major
    sa_ptrs = sa_ptr + rm * stride_sa_m
    if B_PER_ROW:
        sb_ptrs = sb_ptr + rn * stride_sb_n
    else:
        sb_ptrs = sb_ptr + (rn // 128) * stride_sb_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, K // 128):
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        sa = tl.load(sa_ptrs + kb * stride_sa_k, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptrs + kb * stride_sb_k, mask=n_ok, other=0.0)
        partial = tl.dot(a, b)                                        # <= 128 K-elements
        acc += partial * sa[:, None] * sb[None, :]                    # promotion into fp32
        a_ptrs += 128
        b_ptrs += 128

    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptrs, to_bf16(acc, EMULATE), mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


def fp8_gemm(a, a_scale, b, b_scale, out, accumulate):
    """Fills out [M, N] (bf16, or fp32 with accumulate adding into it); arguments already checked."""
    M, K = a.shape
    N = b.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](a, b, out, a_scale, b_scale, M, N, K, a_scale.stride(0), a_scale.stride(1),
                           b_scale.stride(0), b_scale.stride(1), B_PER_ROW=b_scale.shape[0] == N,
                           ACCUMULATE=accumulate, EMULATE=EMULATE_CASTS)
