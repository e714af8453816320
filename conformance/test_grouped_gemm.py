"""Grouped GEMMs (contiguous and masked, FP8 and BF16) against a float64 loop over experts: random, skewed
and empty routings, one row, one expert, a ragged last segment, masked_m of 0 and of M_max; the rows a
layout leaves unwritten keep whatever the output held (poisoned here), and rows that break the layout
come back NaN."""
import pytest
import torch

import dskernels
from dskernels import grouped_gemm as gg
from dskernels.gemm import mn_major
from conformance.conftest import (DEVICE, ON_GPU, POISONS, accumulation, as_bytes, available, backends_for, exact_gemm,
                                  gpu_only, random_input)
from conformance.tolerances import GEMM_OUT_U, assert_finite, gemm_tier1_errors
from dskernels.reference import quant as rq

FP8_BACKENDS = backends_for("m_grouped_fp8_gemm")
BF16_BACKENDS = backends_for("m_grouped_bf16_gemm")
ALIGN = dskernels.get_mk_alignment_for_contiguous_layout()
N, K = (576, 1024) if ON_GPU else (96, 256)  # N not a multiple of 128: a partial b_scale block

# Expert row counts of each routing: random, half the rows on one expert, an expert with none, one row in
# all, a single expert; "ragged" leaves the last segment unpadded (M_total a multiple of nothing).
ROUTINGS = {"random": [70, 130, 5, 200], "skewed": [300, 20, 10, 0], "empty": [0, 64, 0, 129],
            "one_row": [0, 1, 0], "one_expert": [257], "ragged": [40, 3, 77]}
if ON_GPU:
    ROUTINGS["large"] = [1500, 700, 0, 2100, 64, 900, 1, 1000]


def contiguous_layout(counts, pad_last=True):
    """m_indices: each expert's rows, padded with -1 to the alignment (the last segment only if pad_last)."""
    ids = []
    for e, n in enumerate(counts):
        ids += [e] * n
        if pad_last or e < len(counts) - 1:
            ids += [-1] * ((-n) % ALIGN)
    return torch.tensor(ids, dtype=torch.int32, device=DEVICE)


def fp8_experts(G, seed):
    w = random_input((G, N, K), torch.bfloat16, seed=seed, device="cpu", outliers=False)
    qs = [rq.per_block_quant(w[g]) for g in range(G)]
    return torch.stack([q for q, _ in qs]).to(DEVICE), torch.stack([s for _, s in qs]).to(DEVICE)


def fp8_rows(shape, seed):
    x = random_input(shape, torch.bfloat16, seed=seed, device="cpu")
    q, s = rq.per_token_group_quant(x.reshape(-1, K))
    return q.view(shape).to(DEVICE), s.view(*shape[:-1], K // 128).to(DEVICE)


def exact(kind, a, sa, b, sb):
    """The product in float64 and the same over |a|, |b| (one expert)."""
    if kind == "fp8":
        return exact_gemm(a, sa, b, sb)
    return a.double() @ b.double().t(), a.double().abs() @ b.double().abs().t()


def check_rows(kind, got, want, magnitude, backend):
    assert_finite("out", got)
    if kind == "fp8":
        elem, whole, row = gemm_tier1_errors(got, want, magnitude, torch.bfloat16, accumulation(backend))
        assert max(elem, whole, row) <= 1, f"tier 1: per element {elem:.3g}, whole {whole:.3g}, row {row:.3g}"
    else:  # bf16 products are exact in fp32; fp32 sums, one bf16 rounding
        err = (got.double() - want).abs()
        assert (err <= 2 * GEMM_OUT_U[torch.bfloat16] * want.abs() + 2.0 ** -16 * magnitude).all()


def under_each_poison(fn, written):
    """fn() under each poison byte: the written rows identical bit for bit, the others holding the poison."""
    results = []
    for byte in POISONS:
        with dskernels.poison_outputs(byte):
            out = fn()
        untouched = as_bytes(out[~written])
        assert bool((untouched == byte).all()), f"rows the layout leaves unwritten were written (poison {byte:#x})"
        results.append(out)
    assert torch.equal(as_bytes(results[0][written]), as_bytes(results[1][written]))
    return results[0]


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("backend", FP8_BACKENDS)
def test_contiguous_matches_the_loop_over_experts(backend, routing, kind):
    if kind == "bf16" and backend not in available(BF16_BACKENDS):
        pytest.skip("no bf16 form here")
    counts = ROUTINGS[routing]
    G = len(counts)
    m_indices = contiguous_layout(counts, pad_last=routing != "ragged")
    M = m_indices.shape[0]
    if kind == "fp8":
        (a, sa), (b, sb) = fp8_rows((M, K), seed=M + 1), fp8_experts(G, seed=G)
        run = lambda: dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, backend=backend)  # noqa
    else:
        a = random_input((M, K), torch.bfloat16, seed=M + 1)
        b = random_input((G, N, K), torch.bfloat16, seed=G, outliers=False)
        sa = sb = None
        run = lambda: dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, m_indices, backend=backend)  # noqa
    out = under_each_poison(run, m_indices != -1)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16
    for e in range(G):
        rows = (m_indices == e).nonzero().flatten()
        if rows.numel():
            want, mag = exact(kind, a[rows], None if sa is None else sa[rows], b[e], None if sb is None else sb[e])
            check_rows(kind, out[rows], want, mag, backend)


@pytest.mark.parametrize("kind", ["fp8", "bf16"])
@pytest.mark.parametrize("backend", FP8_BACKENDS)
def test_masked_matches_the_loop_over_experts(backend, kind):
    if kind == "bf16" and backend not in available(BF16_BACKENDS):
        pytest.skip("no bf16 form here")
    M_max = 200 if ON_GPU else 100
    masked = [0, M_max, 37, 1, 64]  # none, all, a tail, one row, a multiple of the block
    G = len(masked)
    masked_m = torch.tensor(masked, dtype=torch.int32, device=DEVICE)
    if kind == "fp8":
        (a, sa), (b, sb) = fp8_rows((G, M_max, K), seed=5), fp8_experts(G, seed=6)
        run = lambda: dskernels.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, 40, backend=backend)  # noqa
    else:
        a = random_input((G, M_max, K), torch.bfloat16, seed=5)
        b = random_input((G, N, K), torch.bfloat16, seed=6, outliers=False)
        sa = sb = None
        run = lambda: dskernels.m_grouped_bf16_gemm_nt_masked(a, b, masked_m, 40, backend=backend)  # noqa
    written = torch.arange(M_max, device=DEVICE)[None, :] < masked_m[:, None]
    out = under_each_poison(run, written)
    assert out.shape == (G, M_max, N)
    for g, n in enumerate(masked):
        if n:
            want, mag = exact(kind, a[g, :n], None if sa is None else sa[g, :n], b[g], None if sb is None else sb[g])
            check_rows(kind, out[g, :n], want, mag, backend)


@pytest.mark.parametrize("backend", FP8_BACKENDS)
def test_mn_major_scales_and_a_given_out(backend):
    """a_scale in the layout per_token_group_quant(scale_layout="col") returns; out= written in place, its
    padding rows left as they were."""
    m_indices = contiguous_layout([50, 0, 90])
    M = m_indices.shape[0]
    (a, sa), (b, sb) = fp8_rows((M, K), seed=9), fp8_experts(3, seed=10)
    want = dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, backend=backend)
    out = torch.full((M, N), 7.0, dtype=torch.bfloat16, device=DEVICE)
    got = dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa.t().contiguous().t(), b, sb, m_indices, out=out,
                                                     backend=backend)
    assert got is out
    pad = m_indices == -1
    assert torch.equal(out[~pad], want[~pad]) and bool((out[pad] == 7.0).all())


@pytest.mark.parametrize("backend", FP8_BACKENDS)
def test_masked_with_strided_scales(backend):
    """The masked form reads a_scale through its strides: an MN-major [G, M_max, K/128] view (each expert's
    scales column-major, as the TMA layout has them) gives what the contiguous one gives."""
    G, M_max = 3, 72
    masked_m = torch.tensor([72, 0, 31], dtype=torch.int32, device=DEVICE)
    (a, sa), (b, sb) = fp8_rows((G, M_max, K), seed=21), fp8_experts(G, seed=22)
    want = dskernels.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, 32, backend=backend)
    mn_major = sa.transpose(1, 2).contiguous().transpose(1, 2)  # strides (Kb * M_max, 1, M_max)
    assert mn_major.stride() != sa.stride()
    got = dskernels.m_grouped_fp8_gemm_nt_masked(a, mn_major, b, sb, masked_m, 32, backend=backend)
    for g, n in enumerate(masked_m.tolist()):
        assert torch.equal(got[g, :n], want[g, :n])


@pytest.mark.parametrize("backend", FP8_BACKENDS)
def test_rows_that_break_the_layout_come_back_nan(backend):
    """An expert id >= G, one below -1, a segment that starts off the alignment, and bad ids in a segment
    without any valid one: those rows NaN, every other row right."""
    G = 3
    m_indices = contiguous_layout([60, 100, 30])
    bad_id = m_indices.clone()
    bad_id[5], bad_id[ALIGN + 7] = G, -3  # inside expert 0's and expert 1's segments
    shifted = m_indices.clone()
    shifted[ALIGN:ALIGN + 4] = 0  # expert 0's rows spill into expert 1's aligned segment
    M = m_indices.shape[0]
    (a, sa), (b, sb) = fp8_rows((M, K), seed=11), fp8_experts(G, seed=12)
    good = dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, backend=backend)
    orphan = m_indices.clone()  # the last segment holds no valid id at all: its other rows still NaN
    last = 2 * ALIGN
    orphan[last:last + 30] = -1
    orphan[last + 3], orphan[last + 9] = G + 2, -3
    for layout, nan_rows in [(bad_id, [5, ALIGN + 7]), (shifted, list(range(ALIGN, ALIGN + 4))),
                             (orphan, [last + 3, last + 9])]:
        # out= filled with a number: a row left unwritten keeps it (a poisoned fresh output would pass as NaN)
        out = torch.full((M, N), 7.0, dtype=torch.bfloat16, device=DEVICE)
        dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, layout, out=out, backend=backend)
        nan = torch.zeros(M, dtype=torch.bool, device=DEVICE)
        nan[nan_rows] = True
        assert bool(torch.isnan(out[nan].float()).all())
        rest = ~nan & (layout != -1)
        assert torch.equal(out[rest], good[rest])
        assert bool((out[layout == -1] == 7.0).all())


K_GROUPED_BACKENDS = backends_for("k_grouped_fp8_gemm")
# tokens per expert for the weight gradient (multiples of 128, zero allowed)
K_SEGMENTS = {"ragged": [256, 0, 128, 640], "one_group": [384], "all_empty_but_one": [0, 0, 128]}
if ON_GPU:
    K_SEGMENTS["large"] = [4096, 128, 0, 2048, 8192, 256, 1024, 0]


def token_major_quantized(T, features, seed):
    """x [T, features] quantized per 1 x 128 along the tokens: x^T [features, T] e4m3 and its scales."""
    x = random_input((T, features), torch.bfloat16, seed=seed, device="cpu")
    q, s = rq.per_token_group_quant_transposed(x)
    return q.to(DEVICE), s.to(DEVICE)


def token_major(T, features, seed, kind):
    """x [T, features] as the k-grouped GEMM takes it: FP8 x^T with 1 x 128 scales along the tokens, or bf16
    x^T (scales None)."""
    if kind == "fp8":
        return token_major_quantized(T, features, seed)
    return random_input((T, features), torch.bfloat16, seed=seed, device="cpu").t().contiguous().to(DEVICE), None


K_GROUPED_KINDS = [pytest.param(kind, p.values[0], id=f"{kind}-{p.values[0]}", marks=p.marks)
                   for kind, op in (("fp8", "k_grouped_fp8_gemm"), ("bf16", "k_grouped_bf16_gemm"))
                   for p in backends_for(op)]


@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulate", "fresh"])
@pytest.mark.parametrize("segments", list(K_SEGMENTS))
@pytest.mark.parametrize("kind,backend", K_GROUPED_KINDS)
def test_k_grouped_weight_gradient_matches_the_loop(kind, backend, segments, accumulate):
    sizes = K_SEGMENTS[segments]
    G, T = len(sizes), sum(sizes)
    M, Nk = (576, 1024) if ON_GPU else (96, 160)  # dW [M, Nk] per expert: dy^T [M, T] @ x [T, Nk]
    (a, sa), (b, sb) = token_major(T, M, T + 1, kind), token_major(T, Nk, T + 2, kind)
    k_offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    base = random_input((G, M, Nk), torch.float32, seed=3)

    def run():
        out = base.clone()
        if kind == "bf16":
            return dskernels.k_grouped_bf16_gemm_nt_contiguous(a, b, k_offsets, out, accumulate=accumulate,
                                                               backend=backend)
        return dskernels.k_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, k_offsets, out, accumulate=accumulate,
                                                          backend=backend)
    out = run()
    assert torch.equal(out, run())  # deterministic
    start = 0
    for g, n in enumerate(sizes):
        seg, kb = slice(start, start + n), slice(start // 128, (start + n) // 128)
        start += n
        if n:
            want, mag = exact(kind, a[:, seg], None if sa is None else sa[:, kb], b[:, seg],
                              None if sb is None else sb[:, kb])
        else:
            want = mag = torch.zeros(M, Nk, dtype=torch.float64, device=DEVICE)
        if accumulate:
            want, mag = want + base[g].double(), mag + base[g].double().abs()
        assert_finite("out", out[g])
        if kind == "fp8":
            elem, whole, row = gemm_tier1_errors(out[g], want, mag, torch.float32, accumulation(backend))
            assert max(elem, whole, row) <= 1, f"group {g}: per element {elem:.3g}, whole {whole:.3g}, row {row:.3g}"
        else:  # bf16 products exact in fp32, fp32 sums of up to T terms
            assert bool(((out[g].double() - want).abs() <= 4 * T * 2.0 ** -24 * mag + 1e-30).all()), f"group {g}"


@pytest.mark.parametrize("backend", K_GROUPED_BACKENDS)
def test_k_grouped_broken_segments_come_back_nan(backend):
    """A segment not a multiple of 128 long, one running backwards, one past the end: those groups NaN, the
    others right."""
    T, M, Nk = 512, 64, 96
    (a, sa), (b, sb) = token_major_quantized(T, M, seed=4), token_major_quantized(T, Nk, seed=5)
    good = torch.tensor([0, 128, 256, 384, 512], dtype=torch.int32, device=DEVICE)
    want = dskernels.k_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, good, torch.zeros(4, M, Nk, device=DEVICE),
                                                      accumulate=False, backend=backend)
    for offsets, broken in [([0, 100, 256, 384, 512], [0, 1]), ([0, 128, 256, 200, 512], [2, 3]),
                            ([0, 128, 256, 384, 640], [3])]:
        out = dskernels.k_grouped_fp8_gemm_nt_contiguous(
            a, sa, b, sb, torch.tensor(offsets, dtype=torch.int32, device=DEVICE), torch.zeros(4, M, Nk, device=DEVICE),
            accumulate=False, backend=backend)
        for g in range(4):
            if g in broken:
                assert bool(torch.isnan(out[g]).all()), (offsets, g)
            else:
                assert torch.equal(out[g], want[g]), (offsets, g)


def test_k_grouped_bad_input_raises():
    T, M, Nk = 256, 64, 96
    (a, sa), (b, sb) = token_major_quantized(T, M, seed=6), token_major_quantized(T, Nk, seed=7)
    off = torch.tensor([0, 128, 256], dtype=torch.int32, device=DEVICE)
    out = torch.zeros(2, M, Nk, device=DEVICE)
    f = dskernels.k_grouped_fp8_gemm_nt_contiguous
    with pytest.raises(ValueError, match="b must have K_total = 256"):
        f(a, sa, b[:, :128].contiguous(), sb[:, :1].contiguous(), off, out)
    with pytest.raises(ValueError, match="b_scale must have shape"):
        f(a, sa, b, sb[:, :1], off, out)
    with pytest.raises(ValueError, match="out must have shape"):
        f(a, sa, b, sb, off, out[:1])
    with pytest.raises(TypeError, match="out must have dtype"):
        f(a, sa, b, sb, off, out.bfloat16())
    with pytest.raises(TypeError, match="k_offsets must have dtype"):
        f(a, sa, b, sb, off.long(), out)
    with pytest.raises(ValueError, match="k_offsets must be \\[G \\+ 1\\] with G >= 1"):
        f(a, sa, b, sb, off[:1], out)
    with pytest.raises(TypeError, match="accumulate must be a bool"):
        f(a, sa, b, sb, off, out, accumulate=1)
    with pytest.raises(ValueError, match="K_total .* must be a multiple of 128"):
        f(a[:, :100].contiguous(), sa[:, :1].contiguous(), b[:, :100].contiguous(), sb[:, :1].contiguous(), off, out)


CUDA_CONFIGS = [(layout, bm, bn, epilogue) for layout in ("contiguous", "masked", "k_grouped") for bm in (64, 128)
                for bn in (64, 128) for epilogue in (0, 1, 2)]  # epilogue: registers, overlap, TMA store


def cuda_config_supported(layout, bm, bn, epilogue):
    C = dskernels.backend._C
    return C is not None and C.fp8_grouped_gemm_config_supported(
        ("contiguous", "masked", "k_grouped").index(layout), bm, bn, epilogue)


@pytest.mark.parametrize("layout,bm,bn,epilogue", CUDA_CONFIGS,
                         ids=[f"{lay}-{m}x{n}-e{e}" for lay, m, n, e in CUDA_CONFIGS])
def test_every_compiled_cuda_config_matches_the_loop(layout, bm, bn, epilogue):
    """Each grouped CUDA kernel the heuristics can pick, forced, on a ragged problem (partial tiles, an
    empty expert or segment, padding rows), against the float64 loop: the automatic picks cover only some."""
    if "cuda" not in available(FP8_BACKENDS):
        pytest.skip("the CUDA backend does not run here")
    if not cuda_config_supported(layout, bm, bn, epilogue):
        pytest.skip("not compiled (the heuristics never pick it)")
    C, sms, stream = dskernels.backend._C, torch.cuda.get_device_properties(0).multi_processor_count, \
        torch.cuda.current_stream().cuda_stream
    config = (bm, bn, epilogue)
    if layout == "contiguous":
        counts = [70, 130, 0, 200, 5]
        m_indices = contiguous_layout(counts, pad_last=False)
        M, G = m_indices.shape[0], len(counts)
        (a, sa), (b, sb) = fp8_rows((M, K), seed=31), fp8_experts(G, seed=32)
        sa = mn_major(sa)
        for byte in POISONS:
            out = torch.empty((M, N), dtype=torch.bfloat16, device=DEVICE)
            out.view(torch.uint8).fill_(byte)
            C.m_grouped_fp8_gemm_contiguous(a.data_ptr(), sa.data_ptr(), sa.stride(1), b.data_ptr(), sb.data_ptr(),
                                            m_indices.data_ptr(), out.data_ptr(), M, N, K, G, sms, stream, config)
            assert bool((as_bytes(out[m_indices == -1]) == byte).all()), "padding rows written"
            for e in range(G):
                rows = (m_indices == e).nonzero().flatten()
                if rows.numel():
                    want, mag = exact("fp8", a[rows], sa[rows], b[e], sb[e])
                    check_rows("fp8", out[rows], want, mag, "cuda")
    elif layout == "masked":
        M_max, masked = 200, [0, 200, 37, 1, 64, 129]
        G = len(masked)
        masked_m = torch.tensor(masked, dtype=torch.int32, device=DEVICE)
        (a, sa), (b, sb) = fp8_rows((G, M_max, K), seed=33), fp8_experts(G, seed=34)
        flat = sa.reshape(G * M_max, -1).t().contiguous().t().view(G, M_max, -1)  # one MN-major array
        per_expert = sa.transpose(1, 2).contiguous().transpose(1, 2)  # MN-major per expert
        for scales in (flat, per_expert):
            out = torch.empty((G, M_max, N), dtype=torch.bfloat16, device=DEVICE)
            out.view(torch.uint8).fill_(POISONS[0])
            C.m_grouped_fp8_gemm_masked(a.data_ptr(), scales.data_ptr(), scales.stride(2), scales.stride(0),
                                        b.data_ptr(), sb.data_ptr(), masked_m.data_ptr(), out.data_ptr(), M_max, N, K,
                                        G, 40, sms, stream, config)
            for g, n in enumerate(masked):
                assert bool((as_bytes(out[g, n:]) == POISONS[0]).all()), "rows past masked_m written"
                if n:
                    want, mag = exact("fp8", a[g, :n], sa[g, :n], b[g], sb[g])
                    check_rows("fp8", out[g, :n], want, mag, "cuda")
    else:
        sizes = [256, 0, 128, 640, 0]
        G, T, M, Nk = len(sizes), sum(sizes), 200, 320  # M, N tails for every tile
        (a, sa), (b, sb) = token_major_quantized(T, M, seed=35), token_major_quantized(T, Nk, seed=36)
        sa, sb = mn_major(sa), mn_major(sb)
        k_offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
        base = random_input((G, M, Nk), torch.float32, seed=37)
        for accumulate in (True, False):
            out = base.clone()
            C.k_grouped_fp8_gemm(a.data_ptr(), sa.data_ptr(), sa.stride(1), b.data_ptr(), sb.data_ptr(), sb.stride(1),
                                 k_offsets.data_ptr(), out.data_ptr(), accumulate, M, Nk, T, G, sms, stream, config)
            start = 0
            for g, n in enumerate(sizes):
                seg, kb = slice(start, start + n), slice(start // 128, (start + n) // 128)
                start += n
                want = mag = torch.zeros(M, Nk, dtype=torch.float64, device=DEVICE)
                if n:
                    want, mag = exact("fp8", a[:, seg], sa[:, kb], b[:, seg], sb[:, kb])
                if accumulate:
                    want, mag = want + base[g].double(), mag + base[g].double().abs()
                elem, whole, row = gemm_tier1_errors(out[g], want, mag, torch.float32, accumulation("cuda"))
                assert max(elem, whole, row) <= 1, f"group {g}: {elem:.3g} {whole:.3g} {row:.3g}"


def test_only_cuda_calls_keep_a_plan():
    """The plan cache holds CUDA launches only: the other backends go through the checks every time."""
    m_indices = contiguous_layout([3, 0, 2])
    M = m_indices.shape[0]
    (a, sa), (b, sb) = fp8_rows((M, K), seed=44), fp8_experts(3, seed=45)
    sa = mn_major(sa)  # (the layout a CUDA plan would take as it is)
    gg._PLANS.clear()
    for backend in ["reference", *(["triton"] if "triton" in available(FP8_BACKENDS) else [])]:
        dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, backend=backend)
        dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, backend=backend)
    assert not gg._PLANS


def test_a_repeated_call_launches_from_its_cached_plan():
    """The second call with the same argument signature skips the checks (gg._PLANS) and still computes
    on the new data, and still refuses an operand that starts off the 16-byte alignment."""
    if "cuda" not in available(FP8_BACKENDS):
        pytest.skip("the CUDA backend does not run here")
    m_indices = contiguous_layout([40, 0, 200])
    M = m_indices.shape[0]
    (a, sa), (b, sb) = fp8_rows((M, K), seed=41), fp8_experts(3, seed=42)
    sa = mn_major(sa)
    gg._PLANS.clear()
    dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, backend="cuda")
    assert len(gg._PLANS) == 1
    (a2, sa2) = fp8_rows((M, K), seed=43)
    sa2 = mn_major(sa2)
    out = torch.full((M, N), 7.0, dtype=torch.bfloat16, device=DEVICE)
    got = dskernels.m_grouped_fp8_gemm_nt_contiguous(a2, sa2, b, sb, m_indices, out=out, backend="cuda")
    rows = m_indices != -1
    for e in range(3):
        r = (m_indices == e).nonzero().flatten()
        if r.numel():
            check_rows("fp8", got[r], *exact("fp8", a2[r], sa2[r], b[e], sb[e]), "cuda")
    assert bool((got[~rows] == 7.0).all())
    assert len(gg._PLANS) == 2  # (out= is part of the signature)
    shifted = torch.empty(M * K + 16, dtype=torch.uint8, device=DEVICE)[8:8 + M * K].view(torch.float8_e4m3fn)
    shifted = shifted.view(M, K).copy_(a2)
    with pytest.raises(ValueError, match="a must start at a 16-byte aligned address"):
        dskernels.m_grouped_fp8_gemm_nt_contiguous(shifted, sa2, b, sb, m_indices, backend="cuda")


@gpu_only
def test_masked_call_replays_from_a_cuda_graph():
    """masked_m is read on the device: a captured call replays right after masked_m changes in place."""
    backend = "auto"
    G, M_max = 4, 128
    (a, sa), (b, sb) = fp8_rows((G, M_max, K), seed=13), fp8_experts(G, seed=14)
    masked_m = torch.tensor([5, 0, 128, 77], dtype=torch.int32, device=DEVICE)
    out = torch.zeros(G, M_max, N, dtype=torch.bfloat16, device=DEVICE)
    dskernels.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, 64, out=out, backend=backend)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dskernels.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, 64, out=out, backend=backend)
    masked_m.copy_(torch.tensor([128, 3, 0, 60], dtype=torch.int32))
    out.zero_()
    graph.replay()
    want = dskernels.m_grouped_fp8_gemm_nt_masked(a, sa, b, sb, masked_m, 64, backend=backend)
    for g, n in enumerate([128, 3, 0, 60]):
        assert torch.equal(out[g, :n], want[g, :n]) and bool((out[g, n:] == 0).all())


def test_the_custom_op_passes_opcheck():
    m_indices = contiguous_layout([3, 0, 2])
    M = m_indices.shape[0]
    (a, sa), (b, sb) = fp8_rows((M, K), seed=15), fp8_experts(3, seed=16)
    out = torch.zeros(M, N, dtype=torch.bfloat16, device=DEVICE)
    # (opcheck's schema test cannot compare float8 tensors on the CPU: test_gemm.py's OPCHECK_TESTS)
    torch.library.opcheck(gg._grouped_op, (a, sa, b, sb, m_indices, out, False, 0, "reference"),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["reference", *(["auto"] if ON_GPU else [])])
def test_compiles_with_torch_compile_fullgraph(backend):
    m_indices = contiguous_layout([5, 0, 9])
    M = m_indices.shape[0]
    (a, sa), (b, sb) = fp8_rows((M, K), seed=19), fp8_experts(3, seed=20)
    masked_m = torch.tensor([5, 0, 9], dtype=torch.int32, device=DEVICE)

    def step(a, sa, b, sb):
        out = dskernels.m_grouped_fp8_gemm_nt_contiguous(a, sa, b, sb, m_indices, backend=backend)
        out[m_indices == -1] = 0
        masked = dskernels.m_grouped_fp8_gemm_nt_masked(a[:3 * 16].view(3, 16, K), sa[:48].view(3, 16, -1), b, sb,
                                                        masked_m, 8, out=torch.zeros(3, 16, N, dtype=torch.bfloat16,
                                                                                     device=DEVICE), backend=backend)
        return out, masked
    got = torch.compile(step, fullgraph=True, backend="eager")(a, sa, b, sb)
    want = step(a, sa, b, sb)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_bad_input_raises():
    m_indices = contiguous_layout([3, 5])
    M = m_indices.shape[0]
    (a, sa), (b, sb) = fp8_rows((M, K), seed=17), fp8_experts(2, seed=18)
    f = dskernels.m_grouped_fp8_gemm_nt_contiguous
    with pytest.raises(TypeError, match="a must have dtype"):
        f(a.float(), sa, b, sb, m_indices)
    with pytest.raises(ValueError, match="a must have K = "):
        f(a[:, :128].contiguous(), sa[:, :1].contiguous(), b, sb, m_indices)
    with pytest.raises(ValueError, match="a_scale must have shape"):
        f(a, sa[:, :1], b, sb, m_indices)
    with pytest.raises(ValueError, match="b_scale must have shape"):
        f(a, sa, b, sb[:, :, :1], m_indices)
    with pytest.raises(TypeError, match="m_indices must have dtype"):
        f(a, sa, b, sb, m_indices.long())
    with pytest.raises(ValueError, match="m_indices must have shape"):
        f(a, sa, b, sb, m_indices[1:])
    with pytest.raises(ValueError, match="out must have shape"):
        f(a, sa, b, sb, m_indices, out=torch.empty(M, N + 1, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="b must be 3-D"):
        f(a, sa, b[0], sb, m_indices)
    masked_a = a[:, :].reshape(1, M, K)
    with pytest.raises(ValueError, match="a must be \\[G, M_max, K\\] with G = 2"):
        dskernels.m_grouped_fp8_gemm_nt_masked(masked_a, sa.view(1, M, -1), b, sb,
                                               torch.zeros(2, dtype=torch.int32, device=DEVICE), 1)
    with pytest.raises(ValueError, match="expected_m must be >= 0"):
        dskernels.m_grouped_fp8_gemm_nt_masked(a.view(2, M // 2, K), sa.view(2, M // 2, -1), b, sb,
                                               torch.zeros(2, dtype=torch.int32, device=DEVICE), -1)
    with pytest.raises(ValueError, match="K must be a multiple of 128"):
        f(a[:, :100].contiguous(), sa[:, :1].contiguous(), b[:, :, :100].contiguous(), sb[:, :, :1].contiguous(),
          m_indices)
    with pytest.raises(ValueError, match="backend='cuda' cannot run m_grouped_bf16_gemm"):  # (BF16: Triton only)
        dskernels.m_grouped_bf16_gemm_nt_contiguous(a.bfloat16(), b.bfloat16(), m_indices, backend="cuda")
    if not ON_GPU:
        with pytest.raises(ValueError, match="backend='cuda' cannot run m_grouped_fp8_gemm"):
            f(a, sa, b, sb, m_indices, backend="cuda")


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_bf16_operands_by_their_strides(backend):
    """The BF16 grouped GEMMs read transposed and sliced views as they are (the MoE backward's w^T, dy^T,
    x^T, no copies): the Triton kernels give the bits of the same call on contiguous copies (contiguous,
    masked and k-grouped); the reference, torch's matmul, may take another kernel for a transposed operand
    on a GPU (cuBLAS: measured on the H200), so there within one bf16 rounding (fp32 for k-grouped) of it.
    FP8 operands must stay K-major."""
    def same(got, want):
        if backend != "reference" or not want.numel():
            return torch.equal(got, want)
        eps = 2.0 ** -7 if got.dtype == torch.bfloat16 else 2.0 ** -20
        return bool(((got.float() - want.float()).abs() <= eps * want.float().abs().max()).all())
    counts = [70, 0, 130, 5]
    G = len(counts)
    m_indices = contiguous_layout(counts)
    M = m_indices.shape[0]
    a = random_input((M, K), torch.bfloat16, seed=41)
    w = random_input((G, K, N), torch.bfloat16, seed=42, outliers=False)  # b = w^T: [G, N, K], K strided
    b = w.transpose(1, 2)
    got = dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b, m_indices, backend=backend)
    want = dskernels.m_grouped_bf16_gemm_nt_contiguous(a, b.contiguous(), m_indices, backend=backend)
    rows = m_indices != -1
    assert same(got[rows], want[rows])
    wide = random_input((G, 50, 2 * K), torch.bfloat16, seed=43)
    a3 = wide[:, :, ::2]  # every other column: strides (100 K, 2 K, 2)
    masked_m = torch.tensor([50, 0, 17, 1], dtype=torch.int32, device=DEVICE)
    got = dskernels.m_grouped_bf16_gemm_nt_masked(a3, b, masked_m, 20, backend=backend)
    want = dskernels.m_grouped_bf16_gemm_nt_masked(a3.contiguous(), b.contiguous(), masked_m, 20, backend=backend)
    for g, n in enumerate(masked_m.tolist()):
        assert same(got[g, :n], want[g, :n]), g
    sizes = [256, 0, 128]
    T = sum(sizes)
    k_offsets = torch.tensor([0, 256, 256, 384], dtype=torch.int32, device=DEVICE)
    dy, x = random_input((T, 96), torch.bfloat16, seed=44), random_input((T, 160), torch.bfloat16, seed=45)
    out = torch.empty(G - 1, 96, 160, device=DEVICE)
    got = dskernels.k_grouped_bf16_gemm_nt_contiguous(dy.t(), x.t(), k_offsets, out.clone(), accumulate=False,
                                                      backend=backend)
    want = dskernels.k_grouped_bf16_gemm_nt_contiguous(dy.t().contiguous(), x.t().contiguous(), k_offsets,
                                                       out.clone(), accumulate=False, backend=backend)
    assert same(got, want)
    (q, s), (bq, bs) = fp8_rows((M, K), seed=46), fp8_experts(G, seed=47)
    with pytest.raises(ValueError, match="b must be contiguous"):
        dskernels.m_grouped_fp8_gemm_nt_contiguous(q, s, bq.transpose(1, 2).contiguous().transpose(1, 2), bs,
                                                   m_indices, backend=backend)
