"""A DeepSeekMoE layer's routing, layout, permute and combine, the specification (plain PyTorch).

    topk_idx, topk_weights, counts = route(logits, bias, topk, n_group, topk_group, route_scale)
    layout = contiguous_layout(topk_idx, num_experts)         # rows sorted by expert, segments aligned
    x_rows = permute(x, layout)                               # [rows, D]: token rows in expert order
    y = combine(y_rows, layout, topk_weights)                 # [T, D]: each token's k results, weighted
    grad_rows, grad_weights = combine_backward(grad_y, y_rows, layout, topk_weights)
    update_bias(bias, counts, gamma)                          # auxiliary-loss-free balancing, in place

DeepSeek-V3's routing: affinities s = sigmoid(logits) (fp32); the bias steers the choice only: experts
are ranked by s + bias, first by group (each of n_group groups scored by the sum of its two best biased
affinities; the topk_group best groups stay eligible), then the topk best eligible experts. Ties go to
the lower index, groups and experts alike (a stable descending sort). The weights are the chosen
unbiased affinities normalized to sum 1, times route_scale. With score="softmax" the affinities are
softmax(logits) and the weights are not normalized (DeepSeek-V2). Gradients reach the logits through
the weights; the choice itself has none.

The contiguous layout is what the grouped GEMMs take (dskernels.grouped_gemm): expert e's rows form one
segment starting at a multiple of `alignment`, the tokens in ascending order, a token's slots in slot
order; padding rows (m_indices = -1) fill each segment up to the next multiple. Nothing is dropped, so
the layout is allocated for the worst case, T * k rows plus alignment - 1 padding rows per expert,
whatever the routing (no host sync decides a size). The masked layout (decode: the masked grouped GEMMs,
a [E, T, D] view of the rows) gives every expert a segment of T rows, expert e's at e * T, the same order
inside it: a token picks an expert at most once, so T rows always suffice.

The backwards: a permute's gradient is the unweighted combine of the rows' gradients (fp32 in slot
order, one rounding); a combine's gradient w.r.t. a row is its slot's weight times the token's output
gradient (fp32, rounded once; zero for padding rows), and w.r.t. a weight the fp32 dot product of the
token's output gradient with the slot's row (its summation order is not specified).
"""
from dataclasses import dataclass

import torch

from dskernels.reference.grouped_gemm import ALIGNMENT  # the grouped GEMMs' segment alignment


def _stable_topk(x: torch.Tensor, k: int):
    """The k largest along the last dim, ties to the lower index (torch.topk promises no order)."""
    values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def route(logits: torch.Tensor, bias: torch.Tensor | None, topk: int, n_group: int = 1, topk_group: int = 1,
          route_scale: float = 1.0, score: str = "sigmoid"):
    """logits [T, E] -> topk_idx [T, topk] int32, topk_weights [T, topk] fp32 (differentiable w.r.t.
    logits), counts [E] int32 (tokens per expert, for the bias update)."""
    T, E = logits.shape
    s = logits.float().sigmoid() if score == "sigmoid" else logits.float().softmax(dim=-1)
    biased = (s + bias.float()) if bias is not None else s
    choice = biased.detach()
    if n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)
        group_score = _stable_topk(grouped, 2)[0].sum(dim=-1) if bias is not None else grouped.amax(dim=-1)
        keep = _stable_topk(group_score, topk_group)[1]                                   # [T, topk_group]
        eligible = torch.zeros(T, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        choice = choice.masked_fill(~eligible.repeat_interleave(E // n_group, dim=1), float("-inf"))
    idx = _stable_topk(choice, topk)[1]
    weights = s.gather(1, idx)
    if score == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights * route_scale
    return idx.to(torch.int32), weights, _counts(idx, E)


def _counts(idx: torch.Tensor, E: int) -> torch.Tensor:
    """Tokens per expert as int32, without the host sync of torch.bincount (which sizes its output)."""
    flat = idx.flatten().long()
    return torch.zeros(E, dtype=torch.int32, device=idx.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))


@dataclass
class Layout:
    """Where every (token, slot) goes in the expert-sorted rows, and back.

    m_indices [rows] int32: each row's expert, -1 for padding (the grouped GEMMs' input);
    token_of_row [rows] int32: each row's token, -1 for padding (the permute's gather);
    row_of_slot [T, k] int32: the row of token t's slot j (the combine's gather);
    segment_start [E] int32: where each expert's segment begins (multiples of the alignment, or e * T);
    counts [E] int32: each expert's rows (without padding; masked_m for the masked grouped GEMMs);
    masked: the masked layout (rows = E * T, expert e's segment at e * T) rather than the contiguous one."""
    m_indices: torch.Tensor
    token_of_row: torch.Tensor
    row_of_slot: torch.Tensor
    segment_start: torch.Tensor
    counts: torch.Tensor
    masked: bool = False


def layout_rows(T: int, k: int, num_experts: int, alignment: int = ALIGNMENT) -> int:
    """The worst-case row count a contiguous layout is allocated for (no token is ever dropped), rounded up
    to the alignment (so the rows are whole 128-row blocks, as the k-grouped weight gradient reduces)."""
    return -(-(T * k + num_experts * (alignment - 1)) // alignment) * alignment


def _sorted_layout(topk_idx: torch.Tensor, counts: torch.Tensor, segment_start: torch.Tensor, rows: int,
                   masked: bool) -> Layout:
    """The rows of each expert's segment from its start: tokens ascending, a token's slots in slot order.
    A masked segment holds T rows; a slot past them (only a token naming an expert twice makes one) gets no
    row (-1)."""
    T, k = topk_idx.shape
    device = topk_idx.device
    flat = topk_idx.flatten().long()                                                   # slot s = t * k + j
    order = torch.sort(flat, stable=True)[1]                        # by expert, then token, then slot
    rank = torch.arange(flat.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    row_of_slot = torch.empty_like(flat)
    row_of_slot[order] = torch.where(rank < T, segment_start[flat[order]] + rank, -1) if masked else \
        segment_start[flat[order]] + rank
    dest = torch.where(row_of_slot >= 0, row_of_slot, rows)  # a slot without a row writes a spare one
    m_indices = torch.full((rows + 1,), -1, dtype=torch.int32, device=device)
    token_of_row = torch.full((rows + 1,), -1, dtype=torch.int32, device=device)
    m_indices[dest] = flat.to(torch.int32)
    token_of_row[dest] = torch.div(torch.arange(flat.numel(), device=device), k, rounding_mode="floor").to(torch.int32)
    m_indices, token_of_row = m_indices[:rows], token_of_row[:rows]
    return Layout(m_indices, token_of_row, row_of_slot.view(T, k).to(torch.int32), segment_start.to(torch.int32),
                  counts.to(torch.int32), masked)


def contiguous_layout(topk_idx: torch.Tensor, num_experts: int, alignment: int = ALIGNMENT) -> Layout:
    T, k = topk_idx.shape
    counts = _counts(topk_idx, num_experts).long()
    padded = (counts + alignment - 1) // alignment * alignment
    return _sorted_layout(topk_idx, counts, torch.cumsum(padded, 0) - padded,
                          layout_rows(T, k, num_experts, alignment), False)


def masked_layout(topk_idx: torch.Tensor, num_experts: int) -> Layout:
    """The masked grouped GEMMs' layout: rows [num_experts * T] (a [num_experts, T, D] view), expert e's
    rows from e * T, counts its masked_m. A token's k experts must be distinct (route's are)."""
    T, _ = topk_idx.shape
    counts = _counts(topk_idx, num_experts).long()
    start = torch.arange(num_experts, device=topk_idx.device) * T
    return _sorted_layout(topk_idx, counts, start, num_experts * T, True)


def permute(x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """x [T, D] -> [rows, D] in the layout's order; padding rows are zero (the weight gradient sums over
    them: dskernels.grouped_gemm.k_grouped_fp8_gemm_nt_contiguous)."""
    rows = layout.token_of_row.long()
    if x.shape[0] == 0:  # no token: padding rows only
        return x.new_zeros(rows.shape[0], x.shape[1])
    return torch.where((rows >= 0)[:, None], x[rows.clamp(min=0)], torch.zeros((), dtype=x.dtype, device=x.device))


def combine(y: torch.Tensor, layout: Layout, topk_weights: torch.Tensor | None) -> torch.Tensor:
    """y [rows, D] -> out [T, D] = sum over the token's slots j, in slot order, of
    topk_weights[t, j] * y[row_of_slot[t, j]] (or y[row_of_slot[t, j]] alone when topk_weights is None:
    a permute's backward), in fp32, rounded once to y's dtype."""
    T, k = layout.row_of_slot.shape
    acc = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    for j in range(k):  # slot order: the sum's order is part of the specification
        v = y[layout.row_of_slot[:, j].long()].float()
        acc = acc + (v if topk_weights is None else topk_weights[:, j:j + 1].float() * v)
    return acc.to(y.dtype)


def combine_backward(grad: torch.Tensor, y: torch.Tensor, layout: Layout, topk_weights: torch.Tensor):
    """combine's gradients from grad [T, D]: grad_y [rows, D] in y's dtype (row_of_slot[t, j] gets
    topk_weights[t, j] * grad[t], padding rows zero) and grad_weights [T, k] fp32 (grad[t] . y[row])."""
    T, k = layout.row_of_slot.shape
    rows = layout.row_of_slot.long()
    g = grad.float()
    grad_y = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    grad_y[rows.flatten()] = (topk_weights.float()[:, :, None] * g[:, None, :]).reshape(T * k, y.shape[1])
    grad_weights = (g[:, None, :] * y[rows].float()).sum(dim=-1)
    return grad_y.to(y.dtype), grad_weights


def swiglu(h: torch.Tensor, token_of_row: torch.Tensor) -> torch.Tensor:
    """The expert MLP's activation: h [rows, 2I] (gate then up, the w13 GEMM's output) -> act [rows, I] fp32,
    silu(gate) * up computed in fp32 (silu(g) = g * sigmoid(g)); padding rows (token_of_row -1) zero, whatever
    h holds there (the grouped GEMM leaves them unwritten)."""
    I = h.shape[1] // 2
    g, u = h[:, :I].float(), h[:, I:].float()
    act = g * torch.sigmoid(g) * u
    return torch.where((token_of_row >= 0)[:, None], act, torch.zeros((), device=h.device))


def swiglu_backward(h: torch.Tensor, grad: torch.Tensor, token_of_row: torch.Tensor) -> torch.Tensor:
    """d act [rows, I] -> d h [rows, 2I] in h's dtype (fp32 math, one rounding): d gate = d act * up *
    sigmoid(g) * (1 + g * (1 - sigmoid(g))), d up = d act * silu(g); padding rows zero."""
    I = h.shape[1] // 2
    g, u, d = h[:, :I].float(), h[:, I:].float(), grad.float()
    sig = torch.sigmoid(g)
    dh = torch.cat([d * u * sig * (1 + g * (1 - sig)), d * g * sig], dim=1)
    return torch.where((token_of_row >= 0)[:, None], dh, torch.zeros((), device=h.device)).to(h.dtype)


def update_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """bias -= gamma * sign(load - mean load), in place and outside autograd: overloaded experts get
    picked less, underloaded ones more."""
    with torch.no_grad():
        load = counts.float()
        bias -= gamma * torch.sign(load - load.mean())
    return bias
