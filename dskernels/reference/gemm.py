"""Block-wise FP8 GEMM with FP32 promotion, the specification.

    out[m, n] = sum over K blocks kb of  (a[m, kb-block] . b[n, kb-block]) * a_scale[m, kb] * sb[n, kb]

a [M, K] and b [N, K] are e4m3 ("NT": out = a @ b.T), K a multiple of 128. a_scale [M, K/128] has one
scale per 1 x 128 tile. b's scales come in two granularities:
  "1D2D": b_scale [ceil(N/128), K/128], one per 128 x 128 block (weights: forward, input gradient);
  "1D1D": b_scale [N, K/128], one per 1 x 128 tile (weight gradient, reducing over tokens).
Each 128-wide partial sum is exact-ish in fp32 (products of two e4m3 values have at most 8
significant bits), then scaled and added into the fp32 accumulator: the "promotion" that the tensor
cores' ~14-bit FP8 accumulator needs. The result is rounded once, to out_dtype.
"""
import torch

BLOCK = 128


def b_scale_per_row(b_scale: torch.Tensor, N: int) -> torch.Tensor:
    """b's scales as [N, K/128], whichever granularity they came in."""
    if b_scale.shape[0] == N:
        return b_scale.float()                                      # 1D1D
    return b_scale.float().repeat_interleave(BLOCK, 0)[:N]         # 1D2D: [ceil(N/128)*128 -> N, Kb]


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, accumulate_dtype=torch.float32):
    """a [M, K] e4m3, a_scale [M, K/128], b [N, K] e4m3, b_scale (see module) -> [M, N] out_dtype.
    accumulate_dtype float64 gives the exact promoted sum (products of e4m3 values and their sums over
    a block fit its 53 bits), which the tests measure kernels against."""
    M, K = a.shape
    N = b.shape[0]
    af, bf = a.to(accumulate_dtype), b.to(accumulate_dtype)
    sa = a_scale.to(accumulate_dtype)                               # [M, Kb]
    sb = b_scale_per_row(b_scale, N).to(accumulate_dtype)           # [N, Kb]
    acc = torch.zeros(M, N, dtype=accumulate_dtype, device=a.device)
    for kb in range(K // BLOCK):
        k = slice(kb * BLOCK, (kb + 1) * BLOCK)
        partial = af[:, k] @ bf[:, k].t()                           # [M, N], one K block
        acc += partial * (sa[:, kb, None] * sb[None, :, kb])
    return acc.to(out_dtype)


def fp8_gemm_no_promotion(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, mantissa_bits=13):
    """What a kernel that skips promotion computes: the whole K reduction stays in a tensor-core-
    like accumulator that keeps `mantissa_bits` bits (~14 on Hopper, FP8 inputs) and is scaled
    only at the end with the scales of the first K block. Used to show that the tier-2 bound catches
    it; never a backend."""
    M, K = a.shape
    N = b.shape[0]
    af, bf = a.float(), b.float()
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for k0 in range(0, K, 32):  # one wgmma k32 step at a time, truncated like the hardware adder
        acc = _truncate(acc + af[:, k0:k0 + 32] @ bf[:, k0:k0 + 32].t(), mantissa_bits)
    sb = b_scale_per_row(b_scale, N)
    return (acc * a_scale.float()[:, :1] * sb[None, :, 0]).to(out_dtype)


def _truncate(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Drop fp32 mantissa bits below `mantissa_bits` (round toward zero)."""
    mask = ~((1 << (23 - mantissa_bits)) - 1)
    return (x.view(torch.int32) & mask).view(torch.float32)
