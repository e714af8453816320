"""FP8 quantization: every backend produces the reference's bytes and scales exactly, every output
written (each checked call runs under two poisons and must give the same bits)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dskernels
from conformance.conftest import (DEVICE, ON_GPU, as_bytes, backends_for, gpu_only, random_input, seed_of,
                                  twice_poisoned)
from conformance.tolerances import (assert_same_float, assert_same_fp8, e4m3_roundtrip_bound)
from dskernels.reference import quant as ref
from dskernels.shapes import QUANT_ACTIVATIONS, QUANT_ODD, QUANT_WEIGHTS

# Every quantization op has the same support (dskernels.backend.SUPPORT); the transposed and block
# variants are parametrized from their own entries where they differ in name only.
BACKENDS = backends_for("per_token_group_quant")
SHAPES = QUANT_ODD + (QUANT_ACTIVATIONS if ON_GPU else [])
WEIGHT_SHAPES = QUANT_ODD + (QUANT_WEIGHTS if ON_GPU else [])
DTYPES = [torch.bfloat16, torch.float32, torch.float16]


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3 value (both zeros included), as fp32."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v[~torch.isnan(v)]


def limit_values() -> torch.Tensor:
    """Inputs that land exactly on, between and just around e4m3 values once scaled by 1 (the tile
    amax is 448): ties that must round to even, carries into the exponent, the subnormals, +-0,
    and 448 itself."""
    grid = e4m3_grid().unique()  # sorted, one zero
    mids = (grid[1:] + grid[:-1]) / 2
    eps = torch.tensor(1e-6)
    vals = torch.cat([grid, -grid, mids, -mids, mids * (1 + eps), mids * (1 - eps),
                      torch.tensor([-0.0, 448.0, -448.0, 447.9, 2.0**-10, 2.0**-11, 3 * 2.0**-11])])
    return vals


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_group_matches_reference(backend, shape, dtype):
    x = random_input(shape, dtype, seed=seed_of(shape, str(dtype)))
    q, s = twice_poisoned(lambda: dskernels.per_token_group_quant(x, backend=backend))
    q_ref, s_ref = ref.per_token_group_quant(x.cpu())
    assert s.shape == (shape[0], ref.cdiv(shape[1], 128))
    assert_same_fp8("q", q, q_ref)
    assert_same_float("scale", s, s_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pow2_scale", [False, True], ids=["amax_scale", "pow2_scale"])
@pytest.mark.parametrize("scale_layout", ["row", "col"])
def test_per_token_group_options(backend, pow2_scale, scale_layout):
    x = random_input((67, 300), torch.bfloat16, seed=7)
    q, s = twice_poisoned(lambda: dskernels.per_token_group_quant(x, pow2_scale=pow2_scale,
                                                                  scale_layout=scale_layout, backend=backend))
    q_ref, s_ref = ref.per_token_group_quant(x.cpu(), pow2_scale)
    assert_same_fp8("q", q, q_ref)
    assert_same_float("scale", s, s_ref)
    if scale_layout == "col":
        assert s.stride() == (1, 68), "MN-major scales: M padded to a multiple of 4"
    if pow2_scale:
        mantissa, _ = torch.frexp(s.cpu())
        assert (mantissa == 0.5).all(), "pow2 scales must be exact powers of two"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_transposed_matches_reference(backend, shape):
    x = random_input(shape, torch.bfloat16, seed=11)
    q_t, s = twice_poisoned(lambda: dskernels.per_token_group_quant_transposed(x, backend=backend))
    q_ref, s_ref = ref.per_token_group_quant(x.cpu().t().contiguous())
    assert q_t.shape == (shape[1], shape[0]) and q_t.is_contiguous()
    assert_same_fp8("q_t", q_t, q_ref)
    assert_same_float("scale", s, s_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_layout", ["row", "col"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_options(backend, scale_layout, dtype):
    x = random_input((300, 130), dtype, seed=3)
    q_t, s = twice_poisoned(lambda: dskernels.per_token_group_quant_transposed(
        x, pow2_scale=True, scale_layout=scale_layout, backend=backend))
    q_ref, s_ref = ref.per_token_group_quant(x.cpu().t().contiguous(), pow2_scale=True)
    assert_same_fp8("q_t", q_t, q_ref)
    assert_same_float("scale", s, s_ref)


BOTH_SHAPES = QUANT_ODD + [(300, 1024)] + (QUANT_ACTIVATIONS if ON_GPU else [])


@pytest.mark.parametrize("backend", backends_for("per_token_group_quant_both"))
@pytest.mark.parametrize("shape", BOTH_SHAPES, ids=str)
@pytest.mark.parametrize("pad", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_both_ways_at_once_match_the_two_references(backend, shape, pad, dtype):
    """per_token_group_quant_both = per_token_group_quant and per_token_group_quant_transposed, byte for
    byte, plus (pad=True) zero columns up to a multiple of 128 in q and q_t."""
    M, K = shape
    x = random_input(shape, dtype, seed=seed_of("both", shape, str(dtype)))
    q, s, q_t, s_t = twice_poisoned(lambda: dskernels.per_token_group_quant_both(
        x, scale_layout="col", pad=pad, backend=backend))
    q_ref, s_ref = ref.per_token_group_quant(x.cpu())
    qt_ref, st_ref = ref.per_token_group_quant_transposed(x.cpu())
    K_out, M_out = (ref.cdiv(K, 128) * 128, ref.cdiv(M, 128) * 128) if pad else (K, M)
    assert q.shape == (M, K_out) and q_t.shape == (K, M_out) and q.is_contiguous() and q_t.is_contiguous()
    assert_same_fp8("q", q[:, :K], q_ref)
    assert_same_fp8("q_t", q_t[:, :M], qt_ref)
    assert (q[:, K:].view(torch.uint8) == 0).all() and (q_t[:, M:].view(torch.uint8) == 0).all(), "padding"
    assert_same_float("scale", s, s_ref)
    assert_same_float("scale_t", s_t, st_ref)
    assert s.stride() == (1, ref.cdiv(M, 4) * 4) and s_t.stride() == (1, ref.cdiv(K, 4) * 4), "MN-major scales"


@pytest.mark.parametrize("backend", backends_for("per_token_group_quant_both"))
@pytest.mark.parametrize("scale_layout", ["row", "col"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_ways_at_once_options(backend, scale_layout, dtype):
    x = random_input((300, 130), dtype, seed=seed_of("both options", scale_layout, str(dtype)))
    q, s, q_t, s_t = twice_poisoned(lambda: dskernels.per_token_group_quant_both(
        x, pow2_scale=True, scale_layout=scale_layout, backend=backend))
    for name, got, want in [("q", (q, s), ref.per_token_group_quant(x.cpu(), pow2_scale=True)),
                            ("q_t", (q_t, s_t), ref.per_token_group_quant_transposed(x.cpu(), pow2_scale=True))]:
        assert_same_fp8(name, got[0], want[0])
        assert_same_float(f"{name} scale", got[1], want[1])
        if scale_layout == "row":
            assert got[1].is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=str)
@pytest.mark.parametrize("pow2_scale", [False, True], ids=["amax_scale", "pow2_scale"])
def test_per_block_matches_reference(backend, shape, pow2_scale):
    w = random_input(shape, torch.bfloat16, seed=5)
    q, s = twice_poisoned(lambda: dskernels.per_block_quant(w, pow2_scale=pow2_scale, backend=backend))
    q_ref, s_ref = ref.per_block_quant(w.cpu(), pow2_scale)
    assert s.shape == (ref.cdiv(shape[0], 128), ref.cdiv(shape[1], 128))
    assert_same_fp8("q", q, q_ref)
    assert_same_float("scale", s, s_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("block_shape", [(1, 128), (128, 128)], ids=["groups", "blocks"])
@pytest.mark.parametrize("shape", [(1, 7), (130, 1000), (257, 136)], ids=str)
def test_dequant_matches_reference(backend, out_dtype, block_shape, shape):
    x = random_input(shape, torch.float32, seed=9)
    quant = ref.per_token_group_quant if block_shape == (1, 128) else ref.per_block_quant
    q, s = quant(x.cpu())
    y = twice_poisoned(lambda: dskernels.dequant(q.to(DEVICE), s.to(DEVICE), block_shape=block_shape,
                                                 out_dtype=out_dtype, backend=backend))
    assert_same_float("dequant", y.float(), ref.dequant(q, s, block_shape[0], out_dtype).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequant_reads_mn_major_scales(backend):
    x = random_input((70, 260), torch.bfloat16, seed=2)
    q, s = dskernels.per_token_group_quant(x, scale_layout="col", backend="reference")
    y = dskernels.dequant(q, s, backend=backend)
    assert_same_float("dequant", y.float(), ref.dequant(q.cpu(), s.cpu(), 1, torch.bfloat16).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_at_e4m3_limits_round_exactly(backend):
    """One tile per row; each row's amax is 448, so the scale is 1 and every value is cast as is."""
    vals = limit_values()
    cols = 128
    rows = ref.cdiv(vals.numel(), cols - 1)
    x = torch.zeros(rows, cols)
    x[:, 0] = 448.0
    body = torch.cat([vals, torch.full((rows * (cols - 1) - vals.numel(),), 1.0)])
    x[:, 1:] = body.view(rows, cols - 1)
    q, s = dskernels.per_token_group_quant(x.to(DEVICE), backend=backend)
    assert (s.cpu() == 1.0).all()
    assert_same_fp8("q", q, x.to(torch.float8_e4m3fn))  # torch's own cast: RNE, saturating at 448
    assert_same_fp8("q", q, ref.per_token_group_quant(x)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_zeros(backend):
    x = random_input((5, 300), torch.bfloat16, seed=1)
    x[1] = 0
    x[3, 128:256] = 0
    q, s = dskernels.per_token_group_quant(x, backend=backend)
    q, s = q.cpu(), s.cpu()
    assert (q[1].float() == 0).all() and (q[3, 128:256].float() == 0).all()
    floor_scale = torch.tensor(ref.AMAX_FLOOR, dtype=torch.float32) / ref.FP8_MAX
    assert (s[1] == floor_scale).all() and s[3, 1] == floor_scale
    assert torch.isfinite(s).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_roundtrip_error_within_e4m3_precision(backend):
    x = random_input((96, 1000), torch.float32, seed=4)
    q, s = dskernels.per_token_group_quant(x, backend=backend)
    y = dskernels.dequant(q, s, out_dtype=torch.float32, backend=backend)
    s_full = s.repeat_interleave(128, 1)[:, : x.shape[1]]
    err = (y - x).abs()
    bound = e4m3_roundtrip_bound(x, s_full)
    assert (err <= bound).all(), f"max error / bound = {(err / bound).max().item():.3f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_element_and_inf_poisons_its_tile(backend):
    x = random_input((4, 256), torch.float32, seed=6)
    x[0, 5] = float("nan")
    x[2, 130] = float("inf")
    q, s = dskernels.per_token_group_quant(x, backend=backend)
    q, s = q.cpu(), s.cpu()
    clean = x.cpu().clone()
    clean[0, 5] = 0.0
    q_clean, s_clean = ref.per_token_group_quant(clean)
    assert torch.isnan(q[0, 5].float())
    q_f = q.float()
    others = torch.ones_like(q_f, dtype=torch.bool)
    others[0, 5] = False
    others[2, 128:256] = False
    assert (q_f[others] == q_clean.float()[others]).all(), "a NaN must not change its neighbours"
    assert s[0, 0] == s_clean[0, 0]
    assert s[2, 1] == float("inf")
    y = dskernels.dequant(q.to(DEVICE), s.to(DEVICE), out_dtype=torch.float32, backend=backend).cpu()
    assert torch.isnan(y[2, 128:256]).all() and torch.isfinite(y[2, :128]).all()


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "reference"])
@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 300), K=st.integers(1, 600), dtype=st.sampled_from(DTYPES), pow2=st.booleans(),
       log_magnitude=st.floats(-6, 4), seed=st.integers(0, 2**31 - 1))
def test_fuzz_shapes_and_magnitudes(backend, M, K, dtype, pow2, log_magnitude, seed):
    """Random shapes (any K, not only multiples of 8 or 128) and magnitudes from 1e-6 to 1e4, with
    exact zeros mixed in: every layout still produces the reference's bytes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 10.0 ** log_magnitude
    x[torch.rand(M, K, generator=g) < 0.05] = 0.0
    x = x.to(dtype).to(DEVICE)
    for ours, theirs in [(dskernels.per_token_group_quant(x, pow2_scale=pow2, backend=backend),
                          ref.per_token_group_quant(x.cpu(), pow2)),
                         (dskernels.per_token_group_quant_transposed(x, pow2_scale=pow2, backend=backend),
                          ref.per_token_group_quant(x.cpu().t().contiguous(), pow2)),
                         (dskernels.per_block_quant(x, pow2_scale=pow2, backend=backend),
                          ref.per_block_quant(x.cpu(), pow2))]:
        assert_same_fp8("q", ours[0], theirs[0])
        assert_same_float("scale", ours[1], theirs[1])


# --- bad input: a clear exception before any launch -------------------------------------------

@pytest.mark.parametrize("fn", [dskernels.per_token_group_quant, dskernels.per_token_group_quant_transposed,
                                dskernels.per_token_group_quant_both, dskernels.per_block_quant],
                         ids=lambda f: f.__name__)
def test_bad_input_raises(fn):
    name = "w" if fn is dskernels.per_block_quant else "x"
    good = random_input((8, 256), torch.bfloat16)
    with pytest.raises(TypeError, match=f"{name} must have dtype"):
        fn(good.to(torch.int32))
    with pytest.raises(TypeError, match=f"{name} must have dtype"):
        fn(good.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=f"{name} must be 2-D"):
        fn(good.view(8, 2, 128))
    with pytest.raises(ValueError, match=f"{name} must be contiguous"):
        fn(good.t())
    with pytest.raises(ValueError, match=f"{name} must be contiguous"):
        fn(good[:, ::2])
    with pytest.raises(ValueError, match=f"{name} must not be empty"):
        fn(good[:0])
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
        fn([[1.0, 2.0]])
    with pytest.raises(ValueError, match="backend='cuda' cannot run" if not ON_GPU else "unknown backend"):
        fn(good, backend="cuda" if not ON_GPU else "cuBLAS")
    with pytest.raises(TypeError, match="pow2_scale must be a bool"):
        fn(good, pow2_scale="no")


def test_bad_options_raise():
    x = random_input((8, 256), torch.bfloat16)
    with pytest.raises(ValueError, match="scale_layout must be one of"):
        dskernels.per_token_group_quant(x, scale_layout="transposed")
    q, s = ref.per_token_group_quant(x)
    with pytest.raises(ValueError, match=r"scale must have shape \(8, 2\)"):
        dskernels.dequant(q, s[:, :1])
    with pytest.raises(ValueError, match=r"scale must have shape \(1, 2\)"):
        dskernels.dequant(q, s, block_shape=(128, 128))
    with pytest.raises(TypeError, match="scale must have dtype"):
        dskernels.dequant(q, s.double())
    with pytest.raises(TypeError, match="q must have dtype"):
        dskernels.dequant(x, s)
    with pytest.raises(ValueError, match="block_shape must be one of"):
        dskernels.dequant(q, s, block_shape=(1, 64))
    with pytest.raises(TypeError, match="block_shape must be a tuple"):
        dskernels.dequant(q, s, block_shape=128)
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        dskernels.dequant(q, s, out_dtype=torch.float16)


@gpu_only
def test_mismatched_devices_raise():
    q, s = ref.per_token_group_quant(random_input((8, 256), torch.bfloat16, device="cpu"))
    with pytest.raises(ValueError, match="scale must be on cuda"):
        dskernels.dequant(q.cuda(), s)


# --- the op contract: torch.library registration, foreign arrays, the info command ------------

# opcheck's schema test compares outputs with arithmetic torch lacks for float8 on the CPU; the
# fake-tensor, autograd-registration and AOT-dispatch tests are the ones that matter for compile.
OPCHECK_TESTS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


def test_ops_pass_torch_library_opcheck():
    x = random_input((3, 200), torch.bfloat16, device="cpu")
    ops = torch.ops.dskernels
    for op, args in [(ops.per_token_group_quant, (x, False, "col", "reference")),
                     (ops.per_token_group_quant_transposed, (x, True, "row", "reference")),
                     (ops.per_token_group_quant_both, (x, False, "col", True, "reference")),
                     (ops.per_block_quant, (x, False, "reference")),
                     (ops.dequant, (*ref.per_block_quant(x), 128, torch.float32, "reference"))]:
        torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def test_jit_trace_records_the_op():
    """torch.jit.trace records only dispatcher calls: under it the op must go through its custom op, or
    the trace would replay a stale output."""
    traced = torch.jit.trace(lambda t: dskernels.per_token_group_quant(t, backend="reference")[0],
                             random_input((4, 256), torch.bfloat16, seed=1, device="cpu"), check_trace=False)
    x = random_input((4, 256), torch.bfloat16, seed=2, device="cpu")
    assert_same_fp8("traced q", traced(x), ref.per_token_group_quant(x)[0])


@pytest.mark.parametrize("backend", ["reference", *(["auto"] if ON_GPU else [])])
def test_compiles_with_torch_compile_fullgraph(backend):
    x = random_input((3, 200), torch.bfloat16)

    def step(t):
        q, s = dskernels.per_token_group_quant(t, scale_layout="col", backend=backend)
        q_t, s_t = dskernels.per_token_group_quant_transposed(t, backend=backend)
        w, w_s = dskernels.per_block_quant(t, backend=backend)
        both = dskernels.per_token_group_quant_both(t, scale_layout="col", pad=True, backend=backend)
        return q, s, q_t, s_t, w, w_s, dskernels.dequant(q, s, backend=backend), *both
    got = torch.compile(step, fullgraph=True, backend="eager")(x)
    for g, w in zip(got, step(x)):
        assert torch.equal(as_bytes(g), as_bytes(w))


@gpu_only
def test_cupy_arrays_go_through_the_same_kernels():
    cp = pytest.importorskip("cupy")
    x = cp.random.standard_normal((100, 300), dtype=cp.float32)
    q, s = dskernels.per_token_group_quant(x)
    q_ref, s_ref = ref.per_token_group_quant(torch.from_dlpack(x).cpu())
    assert_same_fp8("q", q, q_ref)
    assert_same_float("scale", s, s_ref)
    back = cp.from_dlpack(s)  # and back to CuPy without a copy
    assert back.shape == (100, 3) and int(back.data.ptr) == s.data_ptr()
