"""dskernels.moe's permute, FP8 permute and combine, forward and backward, on every backend against the
specification (dskernels.reference.moe): bit for bit where the specification fixes every operation
(the copies, the quantization, combine's fp32 sum in slot order and its row gradients), within fp32
rounding for the weight gradient (a dot product whose order is free); routings random, skewed (half
the tokens on one expert), with an empty expert, one token and no token; outputs poisoned twice; the
gradients end to end against float64 autograd; bad arguments refused by name."""
import pytest
import torch

from conformance.conftest import DEVICE, available, backends_for, gpu_only, random_input, seed_of, twice_poisoned
from dskernels import moe
from dskernels.reference import moe as ref
from dskernels.reference import quant as rq

ROUTINGS = ["random", "skewed", "empty_expert", "one_token", "no_token"]


def routing(kind, E, k, T, seed):
    """topk_idx [T, k] int32 on DEVICE: k distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    T = {"one_token": 1, "no_token": 0}.get(kind, T)
    scores = torch.rand(T, E, generator=g)
    if kind == "skewed":
        scores[: T // 2, E // 2] += 10
    if kind == "empty_expert":
        scores[:, 1] -= 10
    return ref._stable_topk(scores, k)[1].to(torch.int32).to(DEVICE)


def case(kind, E=4, k=3, T=45, D=200, dtype=torch.bfloat16, seed=0):
    idx = routing(kind, E, k, T, seed)
    layout = moe.contiguous_layout(idx, E)
    x = random_input((idx.shape[0], D), dtype, seed=seed + 1) if idx.shape[0] else torch.empty(0, D, dtype=dtype,
                                                                                                device=DEVICE)
    weights = torch.rand(idx.shape[0], k, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    return idx, layout, x, weights


@pytest.mark.parametrize("backend", backends_for("moe_permute"))
@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("D,dtype", [(200, torch.bfloat16), (128, torch.float32), (7, torch.bfloat16)],
                         ids=["bf16-200", "fp32-128", "bf16-7"])
def test_permute_copies_rows_and_zeros_padding(backend, kind, D, dtype):
    _, layout, x, _ = case(kind, D=D, dtype=dtype, seed=seed_of("permute", kind, D))
    got = twice_poisoned(lambda: moe.permute(x, layout, backend=backend))
    assert torch.equal(got, ref.permute(x, layout))
    assert bool((got[layout.token_of_row < 0] == 0).all())


@pytest.mark.parametrize("backend", backends_for("moe_permute_fp8"))
@pytest.mark.parametrize("kind", ["random", "skewed", "one_token", "no_token"])
@pytest.mark.parametrize("D,pow2,scale_layout", [(256, False, "row"), (384, True, "col"), (200, False, "col")])
def test_permute_fp8_is_the_quantized_permute(backend, kind, D, pow2, scale_layout):
    _, layout, x, _ = case(kind, D=D, seed=seed_of("permute_fp8", kind, D))
    q, s = twice_poisoned(lambda: moe.permute_fp8(x, layout, pow2_scale=pow2, scale_layout=scale_layout,
                                                  backend=backend))
    want_q, want_s = rq.per_token_group_quant(ref.permute(x, layout), pow2)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(s, want_s)
    if scale_layout == "col" and s.shape[0] > 1:
        assert s.stride(0) == 1
    assert bool((q[layout.token_of_row < 0].view(torch.uint8) == 0).all())


@pytest.mark.parametrize("backend", backends_for("moe_combine"))
@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("k,D,dtype", [(3, 200, torch.bfloat16), (8, 64, torch.float32), (1, 130, torch.bfloat16)])
def test_combine_forward_and_backward_match_the_specification(backend, kind, k, D, dtype):
    _, layout, _, weights = case(kind, E=max(4, k), k=k, seed=seed_of("combine", kind, k, D))
    rows = layout.token_of_row.shape[0]
    y = random_input((rows, D), dtype, seed=seed_of("y", kind, k, D))
    T = weights.shape[0]
    out = twice_poisoned(lambda: moe.combine(y, layout, weights, backend=backend))
    assert torch.equal(out, ref.combine(y, layout, weights))  # the same fp32 operations, in slot order

    grad = random_input((T, D), dtype, seed=seed_of("grad", kind, k, D))

    def backward():
        yy, ww = y.clone().requires_grad_(), weights.clone().requires_grad_()
        moe.combine(yy, layout, ww, backend=backend).backward(grad)
        return yy.grad, ww.grad
    grad_y, grad_w = twice_poisoned(backward)
    want_y, want_w = ref.combine_backward(grad, y, layout, weights)
    assert torch.equal(grad_y, want_y)
    assert bool((grad_y[layout.token_of_row < 0] == 0).all())
    # the dot product's order is free: within fp32 rounding of the exact one
    exact = (grad.double()[:, None, :] * y.double()[layout.row_of_slot.long()]).sum(-1)
    mag = (grad.double().abs()[:, None, :] * y.double().abs()[layout.row_of_slot.long()]).sum(-1)
    assert grad_w.dtype == torch.float32 and bool(((grad_w.double() - exact).abs() <= D * 2.0 ** -23 * mag).all())
    assert bool(((want_w.double() - exact).abs() <= D * 2.0 ** -23 * mag).all())


@pytest.mark.parametrize("backend", backends_for("moe_permute"))
@pytest.mark.parametrize("kind", ["random", "skewed", "one_token"])
def test_permute_backward_is_the_unweighted_combine(backend, kind):
    _, layout, x, _ = case(kind, D=136, seed=seed_of("permute_bwd", kind))
    g_rows = random_input((layout.token_of_row.shape[0], 136), torch.bfloat16, seed=seed_of("g_rows", kind))

    def backward():
        xx = x.clone().requires_grad_()
        moe.permute(xx, layout, backend=backend).backward(g_rows)
        return xx.grad
    got = twice_poisoned(backward)
    assert torch.equal(got, ref.combine(g_rows, layout, None))


@pytest.mark.parametrize("backend", backends_for("moe_combine"))
def test_gradients_end_to_end_against_float64(backend):
    """route -> layout -> permute -> a per-expert map -> combine, backward to x and the logits, against the
    same layer written token by token in float64 autograd."""
    T, E, k, D, n_group, topk_group = 33, 8, 2, 64, 4, 2
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(T, E, generator=g).to(DEVICE).requires_grad_()
    bias = (0.1 * torch.randn(E, generator=g)).to(DEVICE)
    x = random_input((T, D), torch.float32, seed=22, outliers=False).requires_grad_()
    scale = (torch.rand(E, D, generator=g) + 0.5).to(DEVICE)
    idx, w, _ = moe.route(logits, bias, k, n_group=n_group, topk_group=topk_group, route_scale=2.0)
    layout = moe.contiguous_layout(idx, E)
    rows = moe.permute(x, layout, backend=backend)
    expert = layout.m_indices.long().clamp(min=0)
    y = rows * scale[expert] * (layout.m_indices >= 0)[:, None]  # expert e scales its rows by scale[e]
    out = moe.combine(y, layout, w, backend=backend)
    c = torch.randn(T, D, generator=g).to(DEVICE)
    (out * c).sum().backward()

    l64, x64 = logits.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    s = l64.sigmoid().gather(1, idx.long())
    w64 = s / s.sum(-1, keepdim=True) * 2.0
    out64 = sum(w64[:, j:j + 1] * x64 * scale.double()[idx[:, j].long()] for j in range(k))
    (out64 * c.double()).sum().backward()
    assert torch.allclose(out.double(), out64, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logits.grad.double(), l64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", backends_for("moe_combine"))
def test_repeated_calls_give_the_same_bits(backend):
    _, layout, _, weights = case("skewed", k=4, seed=31)
    y = random_input((layout.token_of_row.shape[0], 512), torch.bfloat16, seed=32)
    grad = random_input((weights.shape[0], 512), torch.bfloat16, seed=33)
    results = []
    for _ in range(2):
        yy, ww = y.clone().requires_grad_(), weights.clone().requires_grad_()
        out = moe.combine(yy, layout, ww, backend=backend)
        out.backward(grad)
        results.append((out, yy.grad, ww.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [p for p in backends_for("moe_combine") if p.values[0] == "triton"])
def test_a_corrupted_layout_reads_nothing_out_of_bounds(backend):
    """An index past the end turns its token's output NaN instead of reading outside y (or x)."""
    _, layout, x, weights = case("random", seed=41)
    rows = layout.token_of_row.shape[0]
    bad = ref.Layout(layout.m_indices, layout.token_of_row.clone(), layout.row_of_slot.clone(), None, None)
    bad.row_of_slot[3, 1] = rows + 1000
    bad.token_of_row[int(layout.row_of_slot[5, 0])] = 10 ** 6
    y = random_input((rows, x.shape[1]), torch.bfloat16, seed=42)
    out = moe.combine(y, bad, weights, backend=backend)
    assert bool(out[3].isnan().all()) and bool(out[4].isfinite().all())
    got = moe.permute(x, bad, backend=backend)
    assert bool(got[int(layout.row_of_slot[5, 0])].isnan().all())


def test_bad_arguments_are_refused_by_name():
    _, layout, x, weights = case("random", seed=51)
    y = random_input((layout.token_of_row.shape[0], x.shape[1]), torch.bfloat16, seed=52)
    with pytest.raises(TypeError, match="layout must be a dskernels.moe.Layout"):
        moe.permute(x, (layout.token_of_row, layout.row_of_slot))
    with pytest.raises(TypeError, match="x must have dtype"):
        moe.permute(x.to(torch.int32), layout)
    with pytest.raises(ValueError, match="one row per token of x"):
        moe.permute(x[:-1], layout)
    with pytest.raises(ValueError, match="y must have the layout's"):
        moe.combine(y[:-1], layout, weights)
    with pytest.raises(ValueError, match="topk_weights must have shape"):
        moe.combine(y, layout, weights[:, :-1].contiguous())
    with pytest.raises(TypeError, match="layout.row_of_slot must have dtype"):
        moe.combine(y, ref.Layout(None, layout.token_of_row, layout.row_of_slot.long(), None, None), weights)
    with pytest.raises(ValueError, match="scale_layout must be one of"):
        moe.permute_fp8(x, layout, scale_layout="mn")
    logits = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="n_group must divide"):
        moe.route(logits, None, 2, n_group=3)
    with pytest.raises(ValueError, match="topk must be <= the experts of the kept groups"):
        moe.route(logits, None, 5, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="backend='cuda' cannot run moe_combine"):
        moe.combine(y, layout, weights, backend="cuda")


@gpu_only
def test_routing_layout_permute_combine_make_no_host_sync():
    T, E, k, D = 256, 64, 6, 256
    logits = torch.randn(T, E, device=DEVICE)
    bias = torch.zeros(E, device=DEVICE)
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
    moe.combine(moe.permute(x, moe.contiguous_layout(moe.route(logits, bias, k, n_group=8, topk_group=4)[0], E)),
                moe.contiguous_layout(moe.route(logits, bias, k, n_group=8, topk_group=4)[0], E),
                torch.ones(T, k, device=DEVICE))  # warm: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx, w, counts = moe.route(logits, bias, k, n_group=8, topk_group=4)
        layout = moe.contiguous_layout(idx, E)
        q, s = moe.permute_fp8(x, layout)
        out = moe.combine(moe.permute(x, layout), layout, w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (T, D) and q.shape[0] == moe.layout_rows(T, k, E)


ROUTE_CASES = {  # E, topk, n_group, topk_group, bias, score
    "v3_like": (16, 4, 4, 2, True, "sigmoid"),
    "groups_without_bias": (16, 3, 4, 2, False, "sigmoid"),
    "no_groups": (8, 2, 1, 1, True, "sigmoid"),
    "softmax": (8, 3, 1, 1, False, "softmax"),
    "groups_of_5": (20, 6, 4, 3, True, "sigmoid"),   # neither E nor the group a power of two
    "one_expert": (1, 1, 1, 1, True, "sigmoid"),
}


@pytest.mark.parametrize("backend", backends_for("moe_route"))
@pytest.mark.parametrize("case_name", list(ROUTE_CASES))
@pytest.mark.parametrize("T,ties", [(37, False), (50, True), (1, False), (0, False)], ids=["T37", "ties", "T1", "T0"])
def test_route_matches_the_specification(backend, case_name, T, ties):
    E, topk, n_group, topk_group, has_bias, score = ROUTE_CASES[case_name]
    g = torch.Generator().manual_seed(seed_of("route", case_name, T, ties))
    logits = torch.randn(T, E, generator=g)
    bias = 0.1 * torch.randn(E, generator=g) if has_bias else None
    if ties:  # few distinct values: equal affinities and equal group scores
        logits = (logits * 2).round() / 2
        bias = torch.zeros(E) if has_bias else None
    logits = logits.to(DEVICE)
    bias = None if bias is None else bias.to(DEVICE)
    idx, w, counts = twice_poisoned(lambda: moe.route(logits, bias, topk, n_group=n_group, topk_group=topk_group,
                                                      route_scale=2.5, score=score, backend=backend))
    want_idx, want_w, want_counts = ref.route(logits, bias, topk, n_group, topk_group, 2.5, score)
    assert torch.equal(idx, want_idx) and torch.equal(counts, want_counts)
    assert torch.equal(w, want_w)  # the same operations on the same chosen affinities


@pytest.mark.parametrize("backend", backends_for("moe_route"))
def test_route_weights_carry_the_gradient_to_the_logits(backend):
    g = torch.Generator().manual_seed(61)
    logits = torch.randn(21, 16, generator=g).to(DEVICE).requires_grad_()
    bias = (0.1 * torch.randn(16, generator=g)).to(DEVICE)
    c = torch.randn(21, 4, generator=g).to(DEVICE)
    idx, w, _ = moe.route(logits, bias, 4, n_group=4, topk_group=2, route_scale=1.5, backend=backend)
    (w * c).sum().backward()
    l64 = logits.detach().double().requires_grad_()
    s = l64.sigmoid().gather(1, idx.long())
    ((s / s.sum(-1, keepdim=True) * 1.5) * c.double()).sum().backward()
    assert torch.allclose(logits.grad.double(), l64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", backends_for("moe_layout"))
@pytest.mark.parametrize("kind", ROUTINGS)
@pytest.mark.parametrize("E,k,T", [(4, 3, 45), (8, 8, 300), (1, 1, 7)], ids=["E4", "E8k8", "E1"])
@pytest.mark.parametrize("masked", [False, True], ids=["contiguous", "masked"])
def test_layout_matches_the_specification(backend, kind, E, k, T, masked):
    if kind == "empty_expert" and E < 3 or kind == "skewed" and E < 2:
        pytest.skip("needs more experts")
    idx = routing(kind, E, k, T, seed_of("layout", kind, E, k, T))
    make, make_ref = (moe.masked_layout, ref.masked_layout) if masked else (moe.contiguous_layout,
                                                                           ref.contiguous_layout)
    names = ("m_indices", "token_of_row", "row_of_slot", "segment_start", "counts")
    got = twice_poisoned(lambda: [getattr(make(idx, E, backend=backend), n) for n in names])
    want = make_ref(idx, E)
    assert want.masked == masked and make(idx, E, backend=backend).masked == masked
    for name, tensor in zip(names, got):
        assert torch.equal(tensor, getattr(want, name)), name
    if masked:  # the specification's own rule: expert e's rows from e * T, in token order
        T = idx.shape[0]
        assert torch.equal(want.segment_start.cpu(), torch.arange(E, dtype=torch.int32) * T)
        assert want.m_indices.shape[0] == E * T
        for e in range(E):
            seg = want.token_of_row[e * T:(e + 1) * T].cpu()
            n = int(want.counts[e])
            assert torch.equal(seg[:n], (idx.cpu() == e).any(1).nonzero().flatten().to(torch.int32))
            assert bool((seg[n:] == -1).all())


@pytest.mark.parametrize("backend", backends_for("moe_layout"))
def test_a_masked_layout_gives_a_repeated_expert_no_row_past_its_segment(backend):
    """A token naming an expert twice (route never does) overfills the expert's T masked rows: the slots
    past them get no row and nothing is written out of bounds (the backends agree; with the bound removed
    the kernel writes the slot into the next expert's segment and fails this)."""
    idx = torch.tensor([[0, 0], [1, 0], [2, 0]], dtype=torch.int32, device=DEVICE)
    names = ("m_indices", "token_of_row", "row_of_slot", "segment_start", "counts")
    got = twice_poisoned(lambda: [getattr(moe.masked_layout(idx, 3, backend=backend), n) for n in names])
    want = ref.masked_layout(idx, 3)
    for name, tensor in zip(names, got):
        assert torch.equal(tensor, getattr(want, name)), name
    assert want.row_of_slot.tolist() == [[0, 1], [3, 2], [6, -1]]  # expert 0: four slots, three rows
    if backend == "triton":  # (the kernels read a row -1 as NaN; the specification takes a valid layout)
        lay = moe.masked_layout(idx, 3, backend=backend)
        y = random_input((lay.m_indices.shape[0], 64), torch.bfloat16, seed=73)
        out = moe.combine(y, lay, torch.ones(3, 2, device=DEVICE), backend=backend)
        assert bool(out[:2].isfinite().all()) and bool(out[2].isnan().all())


@pytest.mark.parametrize("backend", [p for p in backends_for("moe_layout") if p.values[0] == "triton"])
def test_layout_gives_an_expert_id_out_of_range_no_row(backend):
    idx = routing("random", 4, 2, 30, 71)
    idx[3, 1] = 4
    idx[7, 0] = -2
    lay = moe.contiguous_layout(idx, 4, backend=backend)
    assert int(lay.row_of_slot[3, 1]) == -1 and int(lay.row_of_slot[7, 0]) == -1
    assert int((lay.m_indices >= 0).sum()) == idx.numel() - 2 and int(lay.counts.sum()) == idx.numel() - 2
    y = random_input((lay.m_indices.shape[0], 64), torch.bfloat16, seed=72)
    out = moe.combine(y, lay, torch.ones(30, 2, device=DEVICE), backend=backend)
    assert bool(out[3].isnan().all()) and bool(out[7].isnan().all()) and bool(out[4].isfinite().all())


# --- the expert MLP ------------------------------------------------------------------------------------

def swiglu_case(rows_kind, I, seed):
    """h [rows, 2I] bf16 and token_of_row with padding rows (-1) whose h is NaN (the GEMM leaves them)."""
    rows = {"some": 300, "one": 1}[rows_kind]
    h = random_input((rows, 2 * I), torch.bfloat16, seed=seed, outliers=False)
    tok = torch.arange(rows, dtype=torch.int32, device=DEVICE)
    tok[::3] = -1
    h[tok < 0] = float("nan")
    return h, tok


@pytest.mark.parametrize("backend", backends_for("moe_swiglu"))
@pytest.mark.parametrize("rows_kind,I", [("some", 256), ("some", 200), ("one", 128)])
def test_swiglu_and_its_backward_match_the_specification(backend, rows_kind, I):
    h, tok = swiglu_case(rows_kind, I, seed_of("swiglu", rows_kind, I))
    act = twice_poisoned(lambda: moe.swiglu(h, tok, backend=backend))
    want = ref.swiglu(h, tok)
    # fp32 math with the platform's exp, rounded once to bf16: within one bf16 rounding of the specification
    assert bool(((act.float() - want).abs() <= 2.0 ** -8 * want.abs() + 1e-30).all())
    assert bool((act[tok < 0] == 0).all())
    grad = random_input((h.shape[0], I), torch.bfloat16, seed=seed_of("swiglu_grad", rows_kind, I))
    got = twice_poisoned(lambda: moe._run_swiglu_backward(h, grad, tok, backend))
    want_h = ref.swiglu_backward(h.float(), grad, tok)
    assert bool(((got.float() - want_h).abs() <= 2.0 ** -8 * want_h.abs() + 2.0 ** -20).all())
    assert bool((got[tok < 0] == 0).all())


@pytest.mark.parametrize("backend", backends_for("moe_swiglu_fp8"))
@pytest.mark.parametrize("rows_kind,I", [("some", 256), ("one", 128)])
def test_swiglu_fp8_is_within_e4m3_rounding(backend, rows_kind, I):
    h, tok = swiglu_case(rows_kind, I, seed_of("swiglu_fp8", rows_kind, I))
    q, s = twice_poisoned(lambda: moe.swiglu(h, tok, fp8=True, backend=backend))
    act = ref.swiglu(h, tok).double()
    scale = s.double().repeat_interleave(128, dim=1)[:, :I]
    deq = q.double() * scale
    assert bool(((deq - act).abs() <= 2.0 ** -4 * act.abs() + 2.0 ** -10 * scale).all())
    assert bool((q[tok < 0].view(torch.uint8) == 0).all())
    want_s = rq.per_token_group_quant(ref.swiglu(h, tok), False)[1]
    assert torch.allclose(s, want_s, rtol=2.0 ** -20, atol=0)  # amax / 448 of (nearly) the same act


def expert_mlp_float64(x, idx, weights, w13, w2):
    """The routed layer token by token in float64: sum_j w[t, j] * w2[e] (silu(g) * u), [g; u] = w13[e] x[t]."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    I = w2.shape[2]
    out = torch.zeros_like(x)
    for j in range(idx.shape[1]):
        e = idx[:, j].long()
        h = torch.einsum("tnd,td->tn", w13[e], x)
        act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        out = out + weights[:, j:j + 1].double() * torch.einsum("tdi,ti->td", w2[e], act)
    return out


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backend", backends_for("moe_swiglu"))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("kind", ["random", "skewed", "empty_expert"])
def test_experts_forward_and_gradients_against_float64(backend, fp8, kind):
    if fp8 and backend not in available(backends_for("moe_swiglu_fp8")):
        pytest.skip("no FP8 here")
    E, k, T, D, I = 4, 2, 37, 128, 128
    idx, layout, x, weights = case(kind, E=E, k=k, T=T, D=D, seed=seed_of("experts", kind))
    g = torch.Generator().manual_seed(81)
    w13 = (torch.randn(E, 2 * I, D, generator=g) * D ** -0.5).to(DEVICE).requires_grad_()
    w2 = (torch.randn(E, D, I, generator=g) * I ** -0.5).to(DEVICE).requires_grad_()
    xx = x.clone().requires_grad_()
    y = moe.combine(moe.experts(xx, layout, w13, w2, fp8=fp8, backend=backend), layout, weights, backend=backend)
    c = random_input((T, D), torch.float32, seed=82, outliers=False)
    (y.float() * c).sum().backward()
    x64, w13_64, w2_64 = (t.detach().double().requires_grad_() for t in (x, w13, w2))
    want = expert_mlp_float64(x64, idx, weights, w13_64, w2_64)
    (want * c.double()).sum().backward()
    # e4m3 keeps 3 mantissa bits (about 3.6 % rms per rounding), bf16 8: the forward meets two roundings (x,
    # act) and the weights', a gradient four more (dy, dh and the transposed weights) and the forward's h
    fwd, grads = (0.08, 0.15) if fp8 else (0.01, 0.015)
    assert rel(y, want) <= fwd
    assert rel(xx.grad, x64.grad) <= grads
    for e in range(E):  # expert by expert: an expert's gradient lost or swapped fails
        if int(layout.counts[e]):
            assert rel(w13.grad[e], w13_64.grad[e]) <= grads and rel(w2.grad[e], w2_64.grad[e]) <= grads, e
        else:
            assert float(w13.grad[e].abs().max()) == 0 and float(w2.grad[e].abs().max()) == 0, e


@pytest.mark.parametrize("backend", backends_for("moe_swiglu"))
def test_moe_layer_trains_and_balances(backend):
    """The layer end to end: gradients reach the gate, both expert weights and the shared MLP; FP8 and BF16
    layers with the same weights agree to FP8's precision; update_bias lowers the busiest expert's bias; the
    FP8 copies follow an in-place weight update."""
    torch.manual_seed(91)
    bf16 = moe.MoE(128, 128, 4, 2, n_shared_experts=1, route_scale=2.0,
                   backend=backend, device=DEVICE)
    x = random_input((20, 128), torch.bfloat16, seed=92, outliers=False).requires_grad_()
    y = bf16(x)
    y.float().sum().backward()
    for name, p in bf16.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    counts = bf16.last_counts.clone()
    before = bf16.bias.clone()
    bf16.update_bias(gamma=0.01)
    busiest = int(counts.argmax())
    assert float(bf16.bias[busiest]) < float(before[busiest]) and int(counts.sum()) == 20 * 2
    if backend not in available(backends_for("moe_swiglu_fp8")):
        return
    fp8 = moe.MoE(128, 128, 4, 2, n_shared_experts=1, route_scale=2.0,
                  fp8=True, backend=backend, device=DEVICE)
    fp8.load_state_dict(bf16.state_dict())
    with torch.no_grad():
        assert rel(fp8(x), bf16(x)) <= 0.08
        first = fp8(x)
        fp8.w2.mul_(2.0)  # in place: a new version, so new FP8 copies
        fresh = moe.MoE(128, 128, 4, 2, n_shared_experts=1, route_scale=2.0,
                        fp8=True, backend=backend, device=DEVICE)
        fresh.load_state_dict(fp8.state_dict())
        again = fp8(x)
        assert torch.equal(again, fresh(x)) and not torch.equal(again, first)


@pytest.mark.parametrize("backend", backends_for("moe_route"))
def test_route_ranks_nan_first_as_the_specification_does(backend):
    """A NaN logit (a diverged step) picks as torch's sort ranks it, first; the kernel never writes out of
    bounds for it."""
    logits = torch.randn(6, 16, generator=torch.Generator().manual_seed(95)).to(DEVICE)
    logits[1] = float("nan")
    logits[4, 3] = float("nan")
    bias = torch.zeros(16, device=DEVICE)
    idx, _, counts = moe.route(logits, bias, 3, n_group=4, topk_group=2, backend=backend)
    want_idx, _, want_counts = ref.route(logits, bias, 3, 4, 2)
    assert torch.equal(idx, want_idx) and torch.equal(counts, want_counts)


def graded_weights(E, I, D, seed):
    """w13 [E, 2I, D] and w2 [E, D, I] fp32 whose magnitude differs by expert (x0.5 ... x4) and by 128 x 128
    block (x1 ... x3): a scale taken from the wrong expert or block shows."""
    g = torch.Generator().manual_seed(seed)
    ws = []
    for shape, fan_in in (((E, 2 * I, D), D), ((E, D, I), I)):
        w = torch.randn(shape, generator=g) * fan_in ** -0.5
        w *= (2.0 ** torch.arange(-1, E - 1)).clamp(max=4.0)[:, None, None]
        w *= 1 + (torch.arange(shape[1])[:, None] // 128 + 2 * (torch.arange(shape[2])[None, :] // 128)) % 3
        ws.append(w.to(DEVICE).requires_grad_())
    return ws


@pytest.mark.parametrize("backend", [p for p in backends_for("moe_swiglu_fp8") if p.values[0] != "reference"])
def test_experts_fp8_tier1_against_the_reference_recipe(backend):
    """Tier 1: the FP8 expert MLP of a backend against the reference backend's, the same recipe step by step
    (permute and quantization bit for bit; the GEMMs' fp32 sums in another order, whose bf16 roundings can
    move an e4m3 rounding of the next operand), forward and every gradient, expert by expert, at shapes of
    two K blocks each way with a skewed routing and an empty expert."""
    E, k, T, D, I = 4, 2, 300, 256, 256
    g = torch.Generator().manual_seed(102)
    scores = torch.rand(T, E, generator=g)
    scores[: T // 2, 0] += 10  # half the tokens on expert 0, none on expert 1
    scores[:, 1] -= 10
    idx = ref._stable_topk(scores, k)[1].to(torch.int32).to(DEVICE)
    x = random_input((T, D), torch.bfloat16, seed=103)
    x = (x.float() * torch.tensor([1.0, 8.0], device=DEVICE).repeat_interleave(128)).to(torch.bfloat16)
    weights = torch.rand(T, k, generator=g).to(DEVICE)
    c = random_input((T, D), torch.float32, seed=104, outliers=False)
    results = []
    for b in (backend, "reference"):
        layout = moe.contiguous_layout(idx, E, backend=b)
        w13, w2 = graded_weights(E, I, D, 105)
        xx = x.clone().requires_grad_()
        y = moe.combine(moe.experts(xx, layout, w13, w2, fp8=True, backend=b), layout, weights, backend=b)
        (y.float() * c).sum().backward()
        results.append((y, xx.grad, w13.grad, w2.grad, layout.counts))
    (y, dx, dw13, dw2, counts), (y_ref, dx_ref, dw13_ref, dw2_ref, _) = results
    # measured on the H200: 2.8e-3 forward, 3.1e-3 dx, at most 1.5e-3 for an expert's weight gradient (the
    # tensor cores' truncating in-block sums against the reference's fp32; under the interpreter 1e-7);
    # FP8 against float64 is 6 % (the module test)
    assert rel(y, y_ref) <= 6e-3 and rel(dx, dx_ref) <= 1e-2
    for e in range(E):
        if int(counts[e]):
            assert rel(dw13[e], dw13_ref[e]) <= 1e-2 and rel(dw2[e], dw2_ref[e]) <= 1e-2, e
        else:
            assert float(dw13[e].abs().max()) == 0 and float(dw2[e].abs().max()) == 0, e


@pytest.mark.parametrize("backend", backends_for("moe_swiglu"))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("T", [1, 5, 37])
def test_experts_over_a_masked_layout_match_the_contiguous_one(backend, fp8, T):
    """Decode's path: the masked layout through the masked grouped GEMMs gives each token what the
    contiguous layout gives it, and both are near float64; the masked layout refuses a backward."""
    if fp8 and backend not in available(backends_for("moe_swiglu_fp8")):
        pytest.skip("no FP8 here")
    E, k, D, I = 8, 3, 256, 256  # two K blocks each way: the masked views of the column-major scales
    idx = routing("skewed", E, k, T, seed_of("masked", T))
    x = random_input((T, D), torch.bfloat16, seed=seed_of("masked x", T))
    weights = torch.rand(T, k, generator=torch.Generator().manual_seed(111)).to(DEVICE)
    w13, w2 = graded_weights(E, I, D, 112)
    with torch.no_grad():
        ys = []
        for make in (moe.masked_layout, moe.contiguous_layout):
            layout = make(idx, E, backend=backend)
            ys.append(moe.combine(moe.experts(x, layout, w13, w2, fp8=fp8, backend=backend), layout, weights,
                                  backend=backend))
        want = expert_mlp_float64(x, idx, weights, w13, w2)
    assert rel(ys[0], ys[1]) <= (2e-2 if fp8 else 4e-3)
    assert rel(ys[0], want) <= (0.08 if fp8 else 0.01)
    with pytest.raises(ValueError, match="a masked layout runs the forward only"):
        moe.experts(x, moe.masked_layout(idx, E, backend=backend), w13, w2, fp8=fp8, backend=backend)
    with pytest.raises(ValueError, match="layout must be made for w13's 8 experts"):
        moe.experts(x, moe.contiguous_layout(idx, E + 1, backend=backend), w13, w2, fp8=fp8, backend=backend)


def moe_layer_float64(layer, x, topk_idx):
    """The MoE module's output in float64 from its parameters, for the choice topk_idx it made (the choice
    has no gradient; the weights are the normalized sigmoid affinities of the float64 logits)."""
    x = x.double()
    s = (x @ layer.gate.weight.double().T).sigmoid().gather(1, topk_idx.long())
    weights = s / s.sum(-1, keepdim=True) * layer.route_scale
    y = expert_mlp_float64(x, topk_idx, weights, layer.w13, layer.w2)
    g, u = (x @ layer.shared["w13"].weight.double().T).chunk(2, dim=-1)
    return y + (torch.nn.functional.silu(g) * u) @ layer.shared["w2"].weight.double().T


@pytest.mark.parametrize("backend", backends_for("moe_swiglu"))
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_moe_module_forward_and_gradients_against_float64(backend, fp8):
    """The module end to end (group-limited routing, shared expert) against float64 from its own
    parameters: the output, the input's gradient and every parameter's, the gate's included; and
    moe_forward, the functional form, gives the module's bits."""
    if fp8 and backend not in available(backends_for("moe_swiglu_fp8")):
        pytest.skip("no FP8 here")
    torch.manual_seed(121)
    T, D, I, E, k = 50, 128, 128, 8, 2
    layer = moe.MoE(D, I, E, k, n_shared_experts=1, n_expert_groups=4, n_limited_groups=2, route_scale=2.0,
                    fp8=fp8, backend=backend, device=DEVICE)
    with torch.no_grad():
        layer.bias.copy_(0.05 * torch.randn(E))
    # unit rows, as after the RMSNorm before a layer (rows 100x larger saturate the fp32 sigmoid, whose
    # derivative there keeps no digit: a property of fp32 routing, DeepSeek-V3's, not of the kernels)
    g = torch.Generator().manual_seed(122)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16).to(DEVICE).requires_grad_()
    c = torch.randn(T, D, generator=g).to(DEVICE)
    y = layer(x)
    (y.float() * c).sum().backward()
    topk_idx = layer.route(x.detach())[0]
    params = dict(layer.named_parameters())
    copies = {n: p.detach().double().requires_grad_() for n, p in params.items()}
    x64 = x.detach().double().requires_grad_()
    ref_layer = type("Params", (), {})()  # the float64 copies under the module's attribute names
    ref_layer.gate = type("G", (), {"weight": copies["gate.weight"]})()
    ref_layer.w13, ref_layer.w2, ref_layer.route_scale = copies["w13"], copies["w2"], layer.route_scale
    ref_layer.shared = {n: type("L", (), {"weight": copies[f"shared.{n}.weight"]})() for n in ("w13", "w2")}
    want = moe_layer_float64(ref_layer, x64, topk_idx)
    (want * c.double()).sum().backward()
    fwd, grads = (0.08, 0.11) if fp8 else (0.01, 0.01)  # measured: 6.3 % / 6-7.5 % (FP8), 0.5 % / 0.5 % (bf16)
    assert rel(y, want) <= fwd
    assert rel(x.grad, x64.grad) <= grads
    for name, p in params.items():
        assert rel(p.grad, copies[name].grad) <= grads, name
    with torch.no_grad():
        y_fn, counts = moe.moe_forward(x, layer.gate.weight, layer.bias, layer.w13, layer.w2, k,
                                       shared_w13=layer.shared["w13"].weight, shared_w2=layer.shared["w2"].weight,
                                       n_group=4, topk_group=2, route_scale=2.0, fp8=fp8, backend=backend)
        assert torch.equal(y_fn, layer(x)) and torch.equal(counts, layer.last_counts)


@pytest.mark.parametrize("backend", backends_for("moe_swiglu_fp8"))
def test_fp8_expert_copies_follow_every_optimizer_step(backend):
    """The FP8 module's cached e4m3 experts are made again after each optimizer step, the fused and
    foreach AdamW's too (the fused one updates the parameters without advancing their version counters): after
    every step the module's output is that of a new module holding the stepped weights."""
    torch.manual_seed(131)
    T, D, I, E, k = 64, 128, 128, 4, 2
    layer = moe.MoE(D, I, E, k, n_shared_experts=0, fp8=True, backend=backend, device=DEVICE)
    x = torch.randn(T, D).to(torch.bfloat16).to(DEVICE)
    layer(x)
    for opt in (torch.optim.SGD(layer.parameters(), lr=0.5), torch.optim.AdamW(layer.parameters(), lr=0.05, fused=True),
                torch.optim.AdamW(layer.parameters(), lr=0.05, foreach=True)):
        layer(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        fresh = moe.MoE(D, I, E, k, n_shared_experts=0, fp8=True, backend=backend, device=DEVICE)
        fresh.load_state_dict(layer.state_dict())
        with torch.no_grad():
            assert torch.equal(layer(x), fresh(x)), f"the {type(opt).__name__} step was not picked up"
