"""The MoE layer's specification (dskernels.reference.moe) against brute force and invariants: group-limited
routing with ties, gradients through the weights only, the contiguous layout's rules, permute / grouped
GEMM / combine end to end against an fp32 loop over tokens and experts, combine's sum in slot order, and
the bias update moving load toward balance."""
import itertools

import pytest
import torch

import dskernels
from conformance.conftest import DEVICE, random_input
from dskernels.reference import moe
from dskernels.reference import quant as rq


def brute_force_route(logits, bias, topk, n_group, topk_group, route_scale):
    """Every token on its own: the best-scoring set of topk_group groups (the sum of each group's two best
    biased affinities; among equal sums the lexicographically smallest group set), then the best topk
    eligible experts by biased affinity (equal sums: the smallest index set)."""
    T, E = logits.shape
    per = E // n_group
    s = logits.float().sigmoid()
    b = s + bias.float()
    idx_all, w_all = [], []
    for t in range(T):
        group_score = [sorted(b[t, g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(n_group)]
        group_score = [x[0] + x[1] for x in group_score]
        groups = max(itertools.combinations(range(n_group), topk_group),
                     key=lambda c: (sum(group_score[g] for g in c), [-g for g in c]))
        eligible = [e for g in groups for e in range(g * per, (g + 1) * per)]
        chosen = max(itertools.combinations(sorted(eligible), topk),
                     key=lambda c: (sum(b[t, e].item() for e in c), [-e for e in c]))
        # the kernel's order: by biased affinity, ties to the lower index
        chosen = sorted(chosen, key=lambda e: (-b[t, e].item(), e))
        w = s[t, chosen]
        idx_all.append(chosen)
        w_all.append(w / w.sum() * route_scale)
    return torch.tensor(idx_all, dtype=torch.int32), torch.stack(w_all)


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_group_limited_routing_matches_brute_force(ties):
    g = torch.Generator().manual_seed(3)
    T, E, n_group, topk_group, topk = 40, 16, 4, 2, 4
    logits = torch.randn(T, E, generator=g)
    bias = 0.1 * torch.randn(E, generator=g)
    if ties:  # few distinct values: equal affinities, equal group scores
        logits, bias = (logits * 2).round() / 2, torch.zeros(E)
    idx, w, counts = moe.route(logits, bias, topk, n_group, topk_group, route_scale=2.5)
    want_idx, want_w = brute_force_route(logits, bias, topk, n_group, topk_group, 2.5)
    assert torch.equal(idx, want_idx)
    assert torch.allclose(w, want_w, rtol=1e-6, atol=0)
    assert torch.equal(counts, torch.bincount(want_idx.flatten().long(), minlength=E).int())
    again = moe.route(logits.clone(), bias.clone(), topk, n_group, topk_group, route_scale=2.5)
    assert torch.equal(again[0], idx) and torch.equal(again[1], w)  # deterministic


def test_the_gradient_reaches_the_logits_through_the_weights_only():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 8, generator=g, requires_grad=True)
    bias = torch.randn(8, generator=g)
    idx, w, _ = moe.route(logits, bias, 3, 2, 1, route_scale=1.7)
    c = torch.randn(9, 3, generator=g)
    (w * c).sum().backward()
    l64 = logits.detach().double().requires_grad_()
    s = l64.sigmoid().gather(1, idx.long())
    ((s / s.sum(-1, keepdim=True) * 1.7) * c.double()).sum().backward()
    assert torch.allclose(logits.grad.double(), l64.grad, rtol=1e-5, atol=1e-7)
    assert bias.grad is None


ROUTINGS = {"random": None, "skewed": "half on expert 3", "one_token": "T = 1", "empty_expert": "expert 5 unused"}


def routing(kind, E=8, k=3, T=37, seed=5):
    g = torch.Generator().manual_seed(seed)
    if kind == "one_token":
        T = 1
    scores = torch.rand(T, E, generator=g)
    if kind == "skewed":
        scores[: T // 2, 3] += 10
    if kind == "empty_expert":
        scores[:, 5] -= 10
    return moe._stable_topk(scores, k)[1].to(torch.int32)


@pytest.mark.parametrize("kind", list(ROUTINGS))
def test_contiguous_layout_rules(kind):
    E = 8
    idx = routing(kind, E)
    T, k = idx.shape
    lay = moe.contiguous_layout(idx, E)
    rows = lay.m_indices.shape[0]
    assert rows == moe.layout_rows(T, k, E) == -(-(T * k + E * (moe.ALIGNMENT - 1)) // 128) * 128
    r = lay.row_of_slot.long()
    assert r.unique().numel() == T * k                                        # every slot its own row
    assert torch.equal(lay.m_indices[r], idx) and torch.equal(lay.token_of_row[r], torch.arange(T)[:, None].expand(T, k).int())
    assert int((lay.m_indices >= 0).sum()) == T * k and bool(((lay.m_indices < 0) == (lay.token_of_row < 0)).all())
    assert torch.equal(lay.counts, torch.bincount(idx.flatten().long(), minlength=E).int())
    for e in range(E):
        start, n = int(lay.segment_start[e]), int(lay.counts[e])
        assert start % moe.ALIGNMENT == 0
        seg = lay.m_indices[start:start + n]
        assert bool((seg == e).all()) and bool((lay.m_indices[start + n:-(-(start + n) // 128) * 128] == -1).all())
        toks = lay.token_of_row[start:start + n]
        assert bool((toks[1:] >= toks[:-1]).all())                             # ascending tokens
    if kind == "empty_expert":
        assert int(lay.counts[5]) == 0


@pytest.mark.parametrize("kind", ["random", "skewed"])
def test_permute_experts_combine_equals_the_loop_over_tokens(kind):
    """The layout feeding the grouped GEMM (reference) and back: out[t] = sum_j w[t, j] x[t] W_e^T over the
    token's experts, against an fp32 loop (bf16 GEMM form, so only summation order differs)."""
    E, K, N = 8, 256, 64
    idx = routing(kind, E).to(DEVICE)
    T, k = idx.shape
    x = random_input((T, K), torch.bfloat16, seed=6)
    w = random_input((E, N, K), torch.bfloat16, seed=7, outliers=False)
    weights = torch.rand(T, k, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    lay = moe.contiguous_layout(idx, E)
    rows = moe.permute(x, lay)
    assert bool((rows[lay.token_of_row < 0] == 0).all())
    y = dskernels.m_grouped_bf16_gemm_nt_contiguous(rows, w, lay.m_indices, backend="reference")
    got = moe.combine(y, lay, weights)
    want = torch.zeros(T, N, dtype=torch.float64, device=DEVICE)
    for t in range(T):
        for j in range(k):
            e = int(idx[t, j])
            # the GEMM's bf16 output rounding, then the weighted sum
            want[t] += weights[t, j].double() * (x[t].double() @ w[e].double().t()).to(torch.bfloat16).double()
    err = (got.double() - want).abs()
    assert (err <= 2.0 ** -8 * want.abs() + 2.0 ** -14 * want.abs().max()).all()


def test_combine_sums_in_fp32_in_slot_order():
    """combine is its fp32 sum in slot order, rounded once: bit for bit the same as that sum written out, and
    within k fp32 roundings of the exact sum."""
    E, D = 4, 96
    idx = routing("random", E, k=4, T=19)
    lay = moe.contiguous_layout(idx, E)
    y = random_input((lay.m_indices.shape[0], D), torch.float32, seed=9, device="cpu")
    wts = torch.rand(19, 4, generator=torch.Generator().manual_seed(10))
    got = moe.combine(y, lay, wts)
    r = lay.row_of_slot.long()
    acc = torch.zeros(19, D)
    for j in range(4):
        acc = acc + wts[:, j:j + 1] * y[r[:, j]]
    assert torch.equal(got, acc)
    exact = sum(wts[:, j:j + 1].double() * y[r[:, j]].double() for j in range(4))
    assert ((got.double() - exact).abs() <= 8 * 2.0 ** -24 * (wts.double().abs() @ torch.ones(4, 1).double()) *
            y.double().abs().max()).all()


def test_bias_update_moves_load_toward_balance():
    """Logits that favour two experts: after bias updates the busiest expert's load drops and the spread
    shrinks; with gamma = 0 nothing moves (so the test can fail)."""
    g = torch.Generator().manual_seed(11)
    T, E, k = 512, 16, 2
    logits = torch.randn(T, E, generator=g)
    logits[:, :2] += 1.5
    for gamma, moves in [(0.0, False), (0.05, True)]:
        bias = torch.zeros(E)
        counts0 = moe.route(logits, bias, k)[2]
        counts = counts0
        for _ in range(20):
            moe.update_bias(bias, counts, gamma)
            counts = moe.route(logits, bias, k)[2]
        if moves:
            assert int(counts.max()) < int(counts0.max()) and float(counts.float().std()) < float(counts0.float().std())
            assert bias[:2].max() < 0 < bias[2:].max()
        else:
            assert torch.equal(counts, counts0) and bool((bias == 0).all())
