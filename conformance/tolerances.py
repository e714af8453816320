"""Every tolerance of the conformance suite, each with where it comes from (DESIGN.md section 3).

Tier 1 (kernel vs reference on identical quantized inputs): only summation order and the output
rounding differ. Tier 2 (FP8 path vs BF16 path on unquantized inputs): bounded by E4M3's precision.
NaN or Inf never passes a tolerance.
"""
import torch

# Quantization is specified as single IEEE fp32 operations and one round-to-nearest-even cast, so
# every backend must produce identical bytes and identical scales: no tolerance at all.
QUANT_EXACT = 0

# E4M3 keeps 3 mantissa bits: a normal value rounds with relative error at most 2**-4 (half an ulp).
# Below 2**-6 (subnormals) the spacing is 2**-9, so the absolute error is at most 2**-10 in the
# scaled domain; multiplied back by the tile's scale that is 2**-10 * amax / 448.
E4M3_REL_ROUNDING = 2.0 ** -4
E4M3_SUBNORMAL_ABS = 2.0 ** -10


def e4m3_roundtrip_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |dequant(quant(x)) - x| allowed per element; scale broadcast to x's shape.
    Includes one bf16 output rounding (relative 2**-9) when the dequantized value is bf16."""
    return (x.abs() * E4M3_REL_ROUNDING + E4M3_SUBNORMAL_ABS * scale) * (1 + 2.0 ** -8)


def diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's and FlashMLA's similarity metric: 1 - 2<x,y> / (|x|^2 + |y|^2), in float64.
    0 for identical tensors; about the squared relative error for close ones."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def max_rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| relative to max |y| (y is the reference)."""
    scale = y.double().abs().max().item()
    return float((x.double() - y.double()).abs().max().item() / (scale if scale > 0 else 1.0))


def assert_finite(name: str, x: torch.Tensor):
    bad = ~torch.isfinite(x.float())
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values (first at {bad.nonzero()[0].tolist()})"


def assert_same_fp8(name: str, got: torch.Tensor, want: torch.Tensor):
    """Identical e4m3 bytes, with NaN matched as NaN (its sign bit carries no meaning)."""
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{name}: got {got.dtype}{tuple(got.shape)}, want {want.dtype}{tuple(want.shape)}"
    g, w = got.view(torch.uint8).cpu(), want.view(torch.uint8).cpu()
    g_nan, w_nan = (g & 0x7F) == 0x7F, (w & 0x7F) == 0x7F
    bad = (g != w) & ~(g_nan & w_nan)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} of {g.numel()} bytes differ; first at {idx}: "
                             f"got 0x{int(g[tuple(idx)]):02x}, want 0x{int(w[tuple(idx)]):02x}")


def assert_same_float(name: str, got: torch.Tensor, want: torch.Tensor):
    """Bitwise-equal floats (NaN matches NaN), for scales and dequantized values."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.cpu(), want.cpu()
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))
    if not same.all():
        idx = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int((~same).sum())} of {g.numel()} values differ; first at "
                             f"{idx}: got {g[tuple(idx)].item()!r}, want {w[tuple(idx)].item()!r}")


# --- FP8 GEMM -----------------------------------------------------------------------------------

# Tier 1, kernel vs the exact promoted sum (the reference's formula in float64) on the same e4m3 inputs
# and scales. The difference is the kernel's summation and its one output rounding, and how large the
# summation's share may be depends on where the kernel sums a 128-wide K block:
#  "tensor_core" (the CUDA kernel; Triton on a GPU): Hopper's tensor cores sum FP8 products in an
#     accumulator that keeps about 14 bits (DeepSeek-V3, section 3.3.2: the reason for promotion),
#     truncating, each of a block's partial additions losing up to 2**-13 of the running magnitude: at
#     most 2**-9 of the block's sum|a*b| (16 additions), added over the blocks. Measured on an H200
#     (2026-12-01, CUDA and Triton, random signed data, K 128 to 16384): at most 8.1e-4 of sum|a*b| per
#     element; fp32 results 1e-4 to 5e-4 relative per row (median 1.7e-4, 2**-12.5), 1.1e-3 on the
#     noisiest row of 24 columns.
#  "ieee" (the reference; Triton's interpreter, whose tl.dot sums in numpy fp32): fp32 sums of 128
#     exact products (2**-17 of the block's sum|a*b|) and one fp32 multiply-add per block promotion:
#     2**-16 of sum|a*b| for K up to 16384, and a relative error near 2**-21.
# Three checks, each catching what the others let through (test_tier1_check_catches_planted_errors
# plants each kind of bug):
#  - per element, |err| <= 2 u |exact| + GEMM_SUM[acc] * sum|a*b|: any single wrong element;
#  - the whole matrix, ||err|| / ||exact|| <= u + GEMM_REL[acc]: an error spread thinly over every element
#    (one K block scaled by 1.02 moves an fp32 result by ~0.02 / sqrt(K / 128) relative: 1.8e-3 at K =
#    16384, against 4.9e-4 allowed on the tensor cores; the per-element bound, linear in K, is ~10x too
#    loose for it);
#  - every row, ||err_r|| / ||exact_r|| <= u + 8 GEMM_REL[acc]: errors confined to rows whose magnitude is
#    too small to move the whole matrix (rows differ by 10**+-2 in the test data: 3 % on the smaller half
#    of the rows moves the whole by ~1e-5).
# u is the output's unit roundoff (bf16 2**-8, fp32 2**-24): the kernel rounds once, the exact value
# not at all. Only fp32 outputs can see the 1.02 block, which bf16 rounding (~1.7e-3) hides.
GEMM_OUT_U = {torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
GEMM_SUM = {"tensor_core": 2.0 ** -9, "ieee": 2.0 ** -16}
GEMM_REL = {"tensor_core": 2.0 ** -11, "ieee": 2.0 ** -18}
GEMM_ROW_FACTOR = 8


def gemm_tier1_errors(got, exact, magnitude, out_dtype, accumulation):
    """(per-element worst error / bound, whole-matrix relative error / bound, worst row's relative error /
    bound); each must be <= 1. exact and magnitude: the exact promoted GEMM and the same on |a|, |b|."""
    u = GEMM_OUT_U[out_dtype]
    err = got.double() - exact
    elem = (err.abs() / (2 * u * exact.abs() + GEMM_SUM[accumulation] * magnitude).clamp_min(1e-300)).max().item()
    whole = (err.norm() / exact.norm().clamp_min(1e-300)).item() / (u + GEMM_REL[accumulation])
    rows = err.norm(dim=1) / exact.norm(dim=1).clamp_min(1e-300)
    row = rows.max().item() / (u + GEMM_ROW_FACTOR * GEMM_REL[accumulation])
    return elem, whole, row


# Tier 2, FP8 GEMM of quantized inputs vs the exact GEMM of the originals. Quantizing a value with
# tile scale s errs by at most 2**-4 |x| + 2**-10 s (E4M3_REL_ROUNDING, E4M3_SUBNORMAL_ABS), roughly
# uniformly, so with standard deviation at most that over sqrt(3). A product a*b then errs by about
# |a| e_b + |b| e_a, independently across k, and the output error has standard deviation
# sigma = sqrt(sum_k (|a_k| sd_b + |b_k| sd_a)^2). The bound is 6 sigma plus the output's unit
# roundoff (bf16: 2**-8 relative). Unlike a worst-case bound (13 % of sum|a b|), this one is
# tight enough to catch a kernel that skips promotion: test_skipping_promotion_is_caught.
GEMM_SIGMAS = 6.0


def quantization_sd(x: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    return (E4M3_REL_ROUNDING * x.abs() + E4M3_SUBNORMAL_ABS * scale_full) / 3 ** 0.5


def gemm_tier2_bound(a, a_scale_full, b, b_scale_full, ref, out_dtype=torch.bfloat16) -> torch.Tensor:
    """a [M, K], b [N, K] the unquantized inputs, *_scale_full their per-element scales, ref the
    exact product."""
    a, b = a.abs().double(), b.abs().double()
    sd_a, sd_b = quantization_sd(a, a_scale_full.double()), quantization_sd(b, b_scale_full.double())
    var = (a * a) @ (sd_b * sd_b).T + (sd_a * sd_a) @ (b * b).T + 2 * (a * sd_a) @ (b * sd_b).T
    return GEMM_SIGMAS * var.sqrt() + GEMM_OUT_U[out_dtype] * ref.abs()


# --- MLA decode ---------------------------------------------------------------------------------

# Kernel vs the fp32 reference on the same bf16 q and cache. The kernels round P to bf16 for the
# P @ V product (relative 2**-9 per weight, so at most 2**-9 * max|V| on an output) and round the
# output to bf16 (half an ulp, 2**-9 relative; the reference rounds too, so up to one ulp, 2**-8,
# apart); scores, softmax and accumulation are fp32 (summation order only).
MLA_P_ROUNDING = 2.0 ** -9
MLA_OUT_ULP = 2.0 ** -8
MLA_DIFF = 1e-5
# The log-sum-exp is fp32 throughout; exp2/log2 are the GPU's approximate ones (~2 ulp) and the
# max-shift order differs: 2**-16 relative to (1 + |lse|) is far above those and far below any bug.
MLA_LSE = 2.0 ** -16


def mla_out_bound(ref: torch.Tensor, v_max: float) -> torch.Tensor:
    return MLA_OUT_ULP * ref.float().abs() + 2 * MLA_P_ROUNDING * v_max


# Absorbed vs un-absorbed (tier 2): the same math in another association order, except that the
# absorbed query is rounded to bf16 before the kernel (relative 2**-9 per element, independent: the
# scores move by ~2**-9 |q||k| / sqrt(576)) and the kernel's own bf16 roundings above. Measured
# diff is ~1e-6; 1e-5 is bf16-level agreement with headroom, as the issue asks ("within bf16
# rounding").
MLA_ABSORBED_DIFF = 1e-5

# FP8 cache vs bf16 cache (tier 2): diff is about the mean squared relative error of the output.
# E4M3 rounding errs uniformly within +-2**-4 relative, a mean square of (2**-4)**2 / 3 = 1.3e-3 per
# value, once through the values and once through the keys' scores: their sum bounds the output's.
MLA_FP8_CACHE_DIFF = 2 * E4M3_REL_ROUNDING ** 2 / 3
