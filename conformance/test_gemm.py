"""Block-wise FP8 GEMM: tier 1 (every backend vs the exact promoted sum on the same e4m3 inputs, three
checks shown able to catch planted bugs), tier 2 (vs the exact GEMM of the unquantized inputs, with a
bound from E4M3's precision that also catches a kernel skipping promotion), and the op contract
(opcheck, torch.compile, bad input). A Linear layer's three GEMMs: test_linear.py."""
import functools

import pytest
import torch

import dskernels
from conformance.conftest import (DEVICE, ON_GPU, accumulation, available, backends_for, exact_gemm, gpu_only,
                                  random_input, twice_poisoned)
from conformance.tolerances import assert_finite, gemm_tier1_errors, gemm_tier2_bound
from dskernels.reference import gemm as ref
from dskernels.reference import quant as rq
from dskernels.shapes import GEMM_BROAD, GEMM_M, GEMM_NK

BACKENDS = backends_for("fp8_gemm")
ODD = [(1, 24, 128), (63, 2112, 256), (129, 24, 384), (1, 2112, 128), (63, 24, 16384)]
BENCH = [(m, n, k) for m in GEMM_M for n, k in GEMM_NK]
SHAPES = ODD + (BENCH + [(129, 2112, 16384)] if ON_GPU else [])
OUT_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


def quantized_operands(M, N, K, seed, per_row_b=False):
    """Fresh bf16 inputs, quantized by the reference: (a, sa, b, sb) plus the originals."""
    x = random_input((M, K), torch.bfloat16, seed=seed, device="cpu")
    w = random_input((N, K), torch.bfloat16, seed=seed + 1, device="cpu", outliers=False)
    a, sa = rq.per_token_group_quant(x)
    b, sb = rq.per_token_group_quant(w) if per_row_b else rq.per_block_quant(w)
    return [t.to(DEVICE) for t in (a, sa, b, sb)], (x.to(DEVICE), w.to(DEVICE))


@functools.lru_cache(maxsize=2)
def problem(M, N, K, seed, per_row_b=False):
    """quantized_operands and their exact GEMM, made once for every backend and out dtype of a shape
    (the float64 GEMMs of the large shapes cost seconds each)."""
    operands, _ = quantized_operands(M, N, K, seed, per_row_b)
    return operands, exact_gemm(*operands)


def skip_slow_reference(backend, M, N, K):
    if backend == "reference" and M * N * K > 1 << 32:
        pytest.skip("the reference is the specification; on the GPU's large shapes it costs tens of seconds")


def check_tier1(got, want, magnitude, out_dtype, backend):
    assert_finite("out", got)
    elem, whole, row = gemm_tier1_errors(got, want, magnitude, out_dtype, accumulation(backend))
    assert max(elem, whole, row) <= 1, (f"tier 1 ({accumulation(backend)} accumulation): per element "
                                        f"{elem:.3g}, whole matrix {whole:.3g}, worst row {row:.3g} of the bound")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_1d2d(backend, shape, out_dtype):
    M, N, K = shape
    skip_slow_reference(backend, M, N, K)
    (a, sa, b, sb), (want, magnitude) = problem(M, N, K, seed=M + N + K)
    out = twice_poisoned(lambda: dskernels.fp8_gemm(a, sa, b, sb, out_dtype=out_dtype, backend=backend))
    assert out.shape == (M, N) and out.dtype == out_dtype
    check_tier1(out, want, magnitude, out_dtype, backend)


@gpu_only
@pytest.mark.parametrize("shape", [s for s in GEMM_BROAD if s[0] <= 129], ids=lambda s: "x".join(map(str, s)))
def test_broad_grid_small_m(shape):
    """The benchmarks' broad grid (other models' projections) at M <= 129, every backend that runs here."""
    M, N, K = shape
    x = random_input((M, K), torch.bfloat16, seed=M + K)  # on the GPU: the CPU would take minutes here
    w = random_input((N, K), torch.bfloat16, seed=N + K, outliers=False)
    (a, sa), (b, sb) = rq.per_token_group_quant(x), rq.per_block_quant(w)
    want, magnitude = exact_gemm(a, sa, b, sb)
    for backend in available(BACKENDS):
        if backend == "reference":
            continue
        out = dskernels.fp8_gemm(a, sa, b, sb, backend=backend)
        check_tier1(out, want, magnitude, torch.bfloat16, backend)


@pytest.mark.parametrize("accumulate", [False, True], ids=["fresh", "accumulate"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ODD + ([(4096, 7168, 4096), (2048, 2112, 16384)] if ON_GPU else []),
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_1d1d_fp32(backend, shape, accumulate):
    M, N, K = shape
    skip_slow_reference(backend, M, N, K)
    (a, sa, b, sb), (want, magnitude) = problem(M, N, K, seed=3, per_row_b=True)
    base = random_input((M, N), torch.float32, seed=8)

    def run():
        out = base.clone()  # the caller's out: not allocated by the op, so the test fills it
        return dskernels.fp8_gemm(a, sa, b, sb, out=out, accumulate=accumulate, backend=backend)
    out = twice_poisoned(run)
    if accumulate:
        want, magnitude = want + base.double(), magnitude + base.double().abs()
    check_tier1(out, want, magnitude, torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mn_major_scales_and_fp32_out(backend):
    M, N, K = 70, 200, 384
    x = random_input((M, K), torch.bfloat16, seed=4)
    a, sa = dskernels.per_token_group_quant(x, scale_layout="col", backend="reference")
    b, sb = rq.per_block_quant(random_input((N, K), torch.bfloat16, seed=5, device="cpu"))
    b, sb = b.to(DEVICE), sb.to(DEVICE)
    out = twice_poisoned(lambda: dskernels.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, backend=backend))
    check_tier1(out, *exact_gemm(a, sa.contiguous(), b, sb), torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tier1_check_catches_planted_errors(backend):
    """The real kernel's output passes; the same output with one K block scaled by 1.02, or with 3 %
    more on the smaller half of the rows, fails (K = 16384, fp32 out: where those bugs hide best)."""
    M, N, K = (129, 2112, 16384) if ON_GPU else (63, 24, 16384)
    (a, sa, b, sb), _ = quantized_operands(M, N, K, seed=5)
    got = dskernels.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, backend=backend).double()
    want, magnitude = exact_gemm(a, sa, b, sb)
    check_tier1(got, want, magnitude, torch.float32, backend)
    mid = slice(K // 2, K // 2 + 128)  # one K block's own contribution
    block = ref.fp8_gemm(a[:, mid].contiguous(), sa[:, K // 256:K // 256 + 1].contiguous(), b[:, mid].contiguous(),
                         sb[:, K // 256:K // 256 + 1].contiguous(), torch.float64, accumulate_dtype=torch.float64)
    small_rows = want.norm(dim=1).argsort()[:M // 2]
    rows_off = got.clone()
    rows_off[small_rows] *= 1.03
    for name, planted in [("one K block x 1.02", got + 0.02 * block), ("smaller rows x 1.03", rows_off)]:
        with pytest.raises(AssertionError, match="tier 1"):
            check_tier1(planted, want, magnitude, torch.float32, backend)


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


# --- the op contract --------------------------------------------------------------------------

# opcheck's test_schema multiplies the inputs to detect mutation, which torch cannot do on float8 tensors
# on the CPU ("mul_cpu_reduced_float not implemented for Float8_e4m3fn"): every other test runs.
OPCHECK_TESTS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_ops_pass_torch_library_opcheck():
    (a, sa, b, sb), _ = quantized_operands(3, 24, 256, seed=1)
    a, sa, b, sb = (t.cpu() for t in (a, sa, b, sb))
    torch.library.opcheck(torch.ops.dskernels.fp8_gemm, (a, sa, b, sb, torch.float32, "reference"),
                          test_utils=OPCHECK_TESTS)
    out = torch.zeros(3, 24)
    torch.library.opcheck(torch.ops.dskernels.fp8_gemm_out, (a, sa, b, sb, out, True, "reference"),
                          test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference-cpu"),
                                     *([pytest.param(n, id=n) for n in available(BACKENDS)] if ON_GPU else [])])
def test_compiles_with_torch_compile_fullgraph(backend):
    device = DEVICE if backend != "reference" or ON_GPU else "cpu"
    (a, sa, b, sb), _ = quantized_operands(65, 256, 256, seed=2)
    a, sa, b, sb = (t.to(device) for t in (a, sa, b, sb))

    def step(a, sa, b, sb):
        out = dskernels.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, backend=backend)
        return dskernels.fp8_gemm(a, sa, b, sb, out=out, accumulate=True, backend=backend)
    got = torch.compile(step, fullgraph=True, backend="eager")(a, sa, b, sb)
    assert torch.equal(got, step(a, sa, b, sb))


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
    with pytest.raises(TypeError, match="accumulate must be a bool"):
        gemm(a, sa, b, sb, out=torch.zeros(64, 256, device=DEVICE), accumulate="yes")
    with pytest.raises(TypeError, match="out must have dtype"):
        gemm(a, sa, b, sb, out=torch.empty(64, 256, dtype=torch.bfloat16, device=DEVICE), accumulate=True)
    with pytest.raises(ValueError, match=r"out must have shape \(64, 256\)"):
        gemm(a, sa, b, sb, out=torch.empty(64, 255, device=DEVICE))
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        gemm(a, sa, b, sb, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown backend 'cublas'"):
        gemm(a, sa, b, sb, backend="cublas")
    with pytest.raises(TypeError, match="backend must be a str"):
        gemm(a, sa, b, sb, backend=None)


def test_checks_are_not_skipped_after_a_good_call():
    """Eager calls reuse the checks' verdict per argument signature: a call that differs from a good one
    in anything a rule reads (a value's type, a dtype, a stride, a device) is checked again."""
    (a, sa, b, sb), _ = quantized_operands(64, 256, 256, seed=0)
    out = torch.zeros(64, 256, device=DEVICE)
    dskernels.fp8_gemm(a, sa, b, sb, out=out, accumulate=True)
    with pytest.raises(TypeError, match="accumulate must be a bool"):
        dskernels.fp8_gemm(a, sa, b, sb, out=out, accumulate=1)
    with pytest.raises(TypeError, match="b must have dtype"):
        dskernels.fp8_gemm(a, sa, b.view(torch.uint8), sb, out=out, accumulate=True)
    with pytest.raises(ValueError, match="out must be contiguous"):
        dskernels.fp8_gemm(a, sa, b, sb, out=torch.zeros(256, 64, device=DEVICE).t(), accumulate=True)


@gpu_only
def test_mismatched_devices_and_misaligned_operands_raise():
    (a, sa, b, sb), _ = quantized_operands(64, 256, 256, seed=0)
    with pytest.raises(ValueError, match="b must be on cuda"):
        dskernels.fp8_gemm(a, sa, b.cpu(), sb)
    with pytest.raises(ValueError, match="a_scale must be on cuda"):
        dskernels.fp8_gemm(a, sa.cpu(), b, sb)
    if "cuda" in available(BACKENDS):
        shifted = torch.empty(64 * 256 + 8, dtype=torch.uint8, device=DEVICE)[8:].view(torch.float8_e4m3fn)
        shifted = shifted.view(64, 256).copy_(a)
        with pytest.raises(ValueError, match="a must start at a 16-byte aligned address"):
            dskernels.fp8_gemm(shifted, sa, b, sb, backend="cuda")



@gpu_only
@pytest.mark.parametrize("per_row_b", [False, True], ids=["1d2d", "1d1d"])
def test_the_cached_cuda_plan_launches_as_the_checked_path(per_row_b, monkeypatch):
    """A repeated eager call launches the CUDA kernel straight from the cached plan (never reaching the
    checked path's implementations, which are made to refuse): it must compute what the checked path
    computes (bit for bit: the same kernel and config), into out= too, and still refuse a misaligned
    operand of the same signature."""
    if "cuda" not in available(BACKENDS):
        pytest.skip("the CUDA backend is not available")
    from dskernels import gemm as gemm_module

    def operands(seed):  # with the scales in the layout the kernel reads (MN-major; 1D2D's b_scale as it is)
        a, sa, b, sb = quantized_operands(192, 384, 512, seed=seed, per_row_b=per_row_b)[0]
        return a, sa.t().contiguous().t(), b, sb.t().contiguous().t() if per_row_b else sb

    def refuse(*args, **kwargs):
        raise AssertionError("a call with a cached CUDA plan took the checked path")

    a, sa, b, sb = operands(3)
    first = dskernels.fp8_gemm(a, sa, b, sb, backend="cuda")  # checked; stores the plan
    a2, sa2, b2, sb2 = operands(4)
    checked = gemm_module._fp8_gemm_op(a2, sa2, b2, sb2, torch.bfloat16, "cuda")  # the custom op: no plan
    acc = torch.randn(192, 384, device=DEVICE)
    want = acc.clone()
    dskernels.fp8_gemm(a2, sa2, b2, sb2, out=want, accumulate=True, backend="cuda")  # checked; stores its plan
    with monkeypatch.context() as m:
        for name in ("_checked", "_gemm", "_gemm_out", "_fp8_gemm_op", "_fp8_gemm_out_op"):
            m.setattr(gemm_module, name, refuse)
        fast = dskernels.fp8_gemm(a2, sa2, b2, sb2, backend="cuda")
        got = acc.clone()
        dskernels.fp8_gemm(a2, sa2, b2, sb2, out=got, accumulate=True, backend="cuda")
        shifted = torch.empty(a.numel() + 8, dtype=torch.uint8, device=DEVICE)[8:].view(torch.float8_e4m3fn)
        shifted = shifted.view(a.shape).copy_(a)
        with pytest.raises(ValueError, match="a must start at a 16-byte aligned address"):
            dskernels.fp8_gemm(shifted, sa, b, sb, backend="cuda")
    assert torch.equal(fast.view(torch.int16), checked.view(torch.int16))
    assert not torch.equal(fast, first)
    assert torch.equal(got, want)
