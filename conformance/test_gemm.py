"""Block-wise FP8 GEMM: tier 1 (every backend vs the reference on the same e4m3 inputs), tier 2
(vs the exact GEMM of the unquantized inputs, with a bound from E4M3's precision that also catches a
kernel skipping promotion), and a Linear layer's three GEMMs against bf16 autograd."""
import pytest
import torch

import dskernels
from conformance.conftest import DEVICE, ON_GPU, backends_for, gpu_only, random_input
from conformance.tolerances import (GEMM_DIFF, assert_finite, diff, gemm_tier1_bound,
                                    gemm_tier2_bound, max_rel_error)
from dskernels.gemm import MIN_CAPABILITY
from dskernels.linear import fp8_linear
from dskernels.reference import gemm as ref
from dskernels.reference import quant as rq
from dskernels.shapes import GEMM_M, GEMM_NK

BACKENDS = backends_for(MIN_CAPABILITY)
ODD = [(1, 24, 128), (63, 2112, 256), (129, 24, 384), (1, 2112, 128), (63, 24, 16384)]
BENCH = [(m, n, k) for m in GEMM_M for n, k in GEMM_NK]
SHAPES = ODD + (BENCH + [(129, 2112, 16384)] if ON_GPU else [])


def quantized_operands(M, N, K, seed, per_row_b=False, positive=False):
    """Fresh bf16 inputs, quantized by the reference: (a, sa, b, sb) plus the originals."""
    if positive:
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(M, K, generator=g) * 0.5 + 0.5).to(torch.bfloat16)
        w = (torch.rand(N, K, generator=g) * 0.5 + 0.5).to(torch.bfloat16)
    else:
        x = random_input((M, K), torch.bfloat16, seed=seed, device="cpu")
        w = random_input((N, K), torch.bfloat16, seed=seed + 1, device="cpu", outliers=False)
    a, sa = rq.per_token_group_quant(x)
    b, sb = rq.per_token_group_quant(w) if per_row_b else rq.per_block_quant(w)
    return [t.to(DEVICE) for t in (a, sa, b, sb)], (x.to(DEVICE), w.to(DEVICE))


def check_tier1(got, a, sa, b, sb, out_dtype, base=None):
    want = ref.fp8_gemm(a, sa, b, sb, torch.float32)
    if base is not None:
        want = want + base
    magnitude = ref.fp8_gemm(a.float().abs().to(a.dtype), sa, b.float().abs().to(b.dtype), sb, torch.float32)
    if base is not None:
        magnitude = magnitude + base.abs()
    assert_finite("out", got)
    bound = gemm_tier1_bound(want, magnitude, out_dtype)
    err = (got.float() - want).abs()
    worst = (err / bound).max().item()
    assert worst <= 1, (f"tier 1: max error / bound = {worst:.3g}, max rel error "
                        f"{max_rel_error(got, want):.3g}")
    d = diff(got, want.to(out_dtype))
    assert d < GEMM_DIFF, f"tier 1: diff {d:.3g} >= {GEMM_DIFF}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_1d2d(backend, shape):
    M, N, K = shape
    (a, sa, b, sb), _ = quantized_operands(M, N, K, seed=M + N + K)
    out = dskernels.fp8_gemm(a, sa, b, sb, backend=backend)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    check_tier1(out, a, sa, b, sb, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ODD + ([(4096, 7168, 4096), (2048, 2112, 16384)] if ON_GPU else []),
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("accumulate", [False, True], ids=["fresh", "accumulate"])
def test_matches_reference_1d1d_fp32(backend, shape, accumulate):
    M, N, K = shape
    (a, sa, b, sb), _ = quantized_operands(M, N, K, seed=3, per_row_b=True)
    base = random_input((M, N), torch.float32, seed=8)
    out = base.clone()
    dskernels.fp8_gemm(a, sa, b, sb, out=out, accumulate=accumulate, backend=backend)
    check_tier1(out, a, sa, b, sb, torch.float32, base if accumulate else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mn_major_scales_and_fp32_out(backend):
    M, N, K = 70, 200, 384
    x = random_input((M, K), torch.bfloat16, seed=4)
    a, sa = dskernels.per_token_group_quant(x, scale_layout="col", backend="reference")
    b, sb = rq.per_block_quant(random_input((N, K), torch.bfloat16, seed=5, device="cpu"))
    b, sb = b.to(DEVICE), sb.to(DEVICE)
    out = dskernels.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, backend=backend)
    check_tier1(out, a, sa.contiguous(), b, sb, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(64, 2112, 7168), (129, 24, 1024)] if ON_GPU else [(33, 24, 1024)],
                         ids=lambda s: "x".join(map(str, s)))
def test_close_to_exact_gemm_of_unquantized_inputs(backend, shape):
    """Tier 2: the FP8 result against the exact product of the bf16 originals."""
    M, N, K = shape
    (a, sa, b, sb), (x, w) = quantized_operands(M, N, K, seed=21)
    got = dskernels.fp8_gemm(a, sa, b, sb, backend=backend).double()
    exact = x.double() @ w.double().T
    bound = gemm_tier2_bound(x, sa.repeat_interleave(128, 1), w,
                             sb.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1), exact)
    worst = ((got - exact).abs() / bound).max().item()
    assert worst <= 1, f"tier 2: max error / bound = {worst:.3g}"


def test_skipping_promotion_is_caught():
    """Positive inputs with the same scale in every tile (every tile's amax is 1), K = 16384, fp32
    out: the promoted GEMM passes the tier-2 bound everywhere; the same products kept in a ~14-bit
    accumulator for the whole K fail it everywhere."""
    M, N, K = 8, 16, 16384
    g = torch.Generator().manual_seed(0)
    x = torch.rand(M, K, generator=g) * 0.5 + 0.5
    w = torch.rand(N, K, generator=g) * 0.5 + 0.5
    x[:, ::128] = 1.0
    w[:, ::128] = 1.0
    x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
    a, sa = rq.per_token_group_quant(x)
    b, sb = rq.per_block_quant(w)
    exact = x.double() @ w.double().T
    bound = gemm_tier2_bound(x, sa.repeat_interleave(128, 1), w,
                             sb.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1), exact, torch.float32)
    promoted = ref.fp8_gemm(a, sa, b, sb, torch.float32).double()
    unpromoted = ref.fp8_gemm_no_promotion(a, sa, b, sb, torch.float32).double()
    assert ((promoted - exact).abs() <= bound).all()
    ratio = ((unpromoted - exact).abs() / bound).min()
    assert ratio > 1, f"the bound is too loose: the no-promotion error is only {ratio:.3g} x the bound"


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_layer_forward_and_gradients_match_bf16_autograd(backend):
    """y = x W^T through the three FP8 GEMMs against bf16 autograd on the same data: tier-2 style
    agreement, measured as diff (about the squared relative error; E4M3 gives ~1e-3)."""
    M, K, N = (256, 512, 384) if not ON_GPU else (1000, 2048, 1536)
    x = random_input((M, K), torch.bfloat16, seed=1, outliers=False).requires_grad_()
    w = (random_input((N, K), torch.float32, seed=2, outliers=False) * 0.05).requires_grad_()
    dy = random_input((M, N), torch.bfloat16, seed=3, outliers=False)
    y = fp8_linear(x, w, backend=backend)
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = w.detach().clone().to(torch.bfloat16).requires_grad_()
    y_ref = x_ref @ w_ref.T
    y_ref.backward(dy)
    for name, got, want in [("y", y, y_ref), ("dx", x.grad, x_ref.grad), ("dW", w.grad, w_ref.grad)]:
        assert_finite(name, got)
        d = diff(got, want)
        assert d < 2e-3, f"{name}: diff {d:.3g} vs bf16 autograd"
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


# --- bad input --------------------------------------------------------------------------------

def test_bad_input_raises():
    (a, sa, b, sb), _ = quantized_operands(64, 256, 256, seed=0)
    gemm = dskernels.fp8_gemm
    with pytest.raises(TypeError, match="a must have dtype"):
        gemm(a.float(), sa, b, sb)
    with pytest.raises(TypeError, match="b must have dtype"):
        gemm(a, sa, b.to(torch.bfloat16), sb)
    with pytest.raises(ValueError, match="K must be a multiple of 128"):
        gemm(a[:, :200].contiguous(), sa, b[:, :200].contiguous(), sb)
    with pytest.raises(ValueError, match="b must have K = 256"):
        gemm(a, sa, b[:, :128].contiguous(), sb)
    with pytest.raises(ValueError, match=r"a_scale must have shape \(64, 2\)"):
        gemm(a, sa[:, :1], b, sb)
    with pytest.raises(TypeError, match="a_scale must have dtype"):
        gemm(a, sa.double(), b, sb)
    with pytest.raises(ValueError, match="b_scale must have shape"):
        gemm(a, sa, b, sb[:, :1])
    with pytest.raises(ValueError, match="a must be contiguous"):
        gemm(a.t(), sa, b, sb)
    with pytest.raises(ValueError, match="b must be contiguous"):
        gemm(a, sa, b[:, ::2], sb)
    with pytest.raises(ValueError, match="accumulate=True needs an out"):
        gemm(a, sa, b, sb, accumulate=True)
    with pytest.raises(TypeError, match="out must have dtype"):
        gemm(a, sa, b, sb, out=torch.empty(64, 256, dtype=torch.bfloat16, device=DEVICE), accumulate=True)
    with pytest.raises(ValueError, match=r"out must have shape \(64, 256\)"):
        gemm(a, sa, b, sb, out=torch.empty(64, 255, device=DEVICE))
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        gemm(a, sa, b, sb, out_dtype=torch.float16)


@gpu_only
def test_mismatched_devices_and_misaligned_operands_raise():
    (a, sa, b, sb), _ = quantized_operands(64, 256, 256, seed=0)
    with pytest.raises(ValueError, match="b must be on cuda"):
        dskernels.fp8_gemm(a, sa, b.cpu(), sb)
    with pytest.raises(ValueError, match="a_scale must be on cuda"):
        dskernels.fp8_gemm(a, sa.cpu(), b, sb)
    if backends_for(MIN_CAPABILITY)[2].marks[0].args[0] is False:  # cuda backend available
        shifted = torch.empty(64 * 256 + 8, dtype=torch.uint8, device=DEVICE)[8:].view(torch.float8_e4m3fn)
        shifted = shifted.view(64, 256).copy_(a)
        with pytest.raises(ValueError, match="16-byte aligned"):
            dskernels.fp8_gemm(shifted, sa, b, sb, backend="cuda")
