"""Grouped GEMMs of a mixture-of-experts layer, the specification: a loop over experts.

    contiguous  out[m] = a[m] @ b[e].T for every row m whose m_indices[m] = e >= 0
                a [M_total, K], b [G, N, K]; the rows of all experts stacked, expert e's segment starting
                at a multiple of the alignment (get_mk_alignment_for_contiguous_layout), padding rows
                (m_indices = -1) at the end of each segment: never written
    masked      out[g, m] = a[g, m] @ b[g].T for m < masked_m[g] (rows past it never written)
                a [G, M_max, K], b [G, N, K]
    k-grouped   out[g] (+)= a[:, seg_g] @ b[:, seg_g].T over group g's segment of the reduction,
                seg_g = [k_offsets[g], k_offsets[g + 1]), each a multiple of 128 long (zero allowed): the
                experts' weight gradients dW_g = dy_g^T x_g with a = dy^T [M, K_total] and b = x^T
                [N, K_total] quantized per 1 x 128 along tokens (per_token_group_quant_transposed), out
                [G, M, N] fp32. A group whose segment is not a non-negative multiple of 128 inside
                [0, K_total] comes back NaN.

FP8 ("fp8"): e4m3 operands with 1 x 128 scales for a (a_scale [rows, K/128]) and 128 x 128 block scales
for each expert's weight (b_scale [G, ceil(N/128), K/128]), promoted every 128 K as in
dskernels.reference.gemm. BF16 ("bf16"): bf16 operands, fp32 accumulation. Out is bf16.

A row whose m_indices entry is neither -1 nor the expert of its aligned segment (the largest valid id
among the segment's 128 rows) breaks the layout, as an id outside [-1, G) or a segment that does not
start on the alignment does: such rows are written as NaN, never as a number.
"""
import torch

from dskernels.reference import gemm as _gemm

ALIGNMENT = 128  # rows: the M block of the grouped kernels, and the 128-row scale block along tokens


def segment_experts(m_indices: torch.Tensor, G: int) -> torch.Tensor:
    """Per row, the expert of its aligned segment: the largest valid id (0 <= id < G) among the segment's
    rows, which is the segment's own expert when the layout holds; -1 for a segment without one."""
    M = m_indices.shape[0]
    pad = (-M) % ALIGNMENT
    ids = torch.nn.functional.pad(m_indices.long(), (0, pad), value=-1).view(-1, ALIGNMENT)
    ids = torch.where(ids < G, ids, -1)
    return ids.max(dim=1).values.repeat_interleave(ALIGNMENT)[:M]


def _expert_gemm(kind, a, a_scale, w, w_scale, accumulate_dtype):
    if kind == "fp8":
        return _gemm.fp8_gemm(a, a_scale, w, w_scale, accumulate_dtype, accumulate_dtype=accumulate_dtype)
    return a.to(accumulate_dtype) @ w.to(accumulate_dtype).t()


def m_grouped_gemm_contiguous(kind, a, a_scale, b, b_scale, m_indices, out_dtype=torch.bfloat16,
                              accumulate_dtype=torch.float32):
    """out [M_total, N]: the rows' products; padding rows 0 (a kernel leaves them unwritten), rows that
    break the layout NaN."""
    M, G, N = a.shape[0], b.shape[0], b.shape[1]
    out = torch.zeros(M, N, dtype=accumulate_dtype, device=a.device)
    ids = m_indices.long()
    seg = segment_experts(m_indices, G)
    ok = (ids >= 0) & (ids == seg) & (ids < G)
    for e in range(G):
        rows = (ok & (ids == e)).nonzero().flatten()
        if rows.numel():
            out[rows] = _expert_gemm(kind, a[rows], None if a_scale is None else a_scale[rows], b[e],
                                     None if b_scale is None else b_scale[e], accumulate_dtype)
    out[(ids != -1) & ~ok] = float("nan")
    return out.to(out_dtype)


def m_grouped_gemm_masked(kind, a, a_scale, b, b_scale, masked_m, out_dtype=torch.bfloat16,
                          accumulate_dtype=torch.float32):
    """out [G, M_max, N]: rows m < masked_m[g] of each expert's product; the others 0 (a kernel leaves
    them unwritten)."""
    G, M_max = a.shape[0], a.shape[1]
    out = torch.zeros(G, M_max, b.shape[1], dtype=accumulate_dtype, device=a.device)
    for g, n in enumerate(masked_m.tolist()):
        n = max(0, min(int(n), M_max))
        if n:
            out[g, :n] = _expert_gemm(kind, a[g, :n], None if a_scale is None else a_scale[g, :n], b[g],
                                      None if b_scale is None else b_scale[g], accumulate_dtype)
    return out.to(out_dtype)


def k_grouped_gemm(a, a_scale, b, b_scale, k_offsets, out, accumulate):
    """out [G, M, N] fp32, in place: out[g] = (out[g] if accumulate else 0) + the group's product: FP8 promoted
    (a_scale, b_scale given) or BF16 summed in fp32 (a_scale None)."""
    K_total = a.shape[1]
    offsets = [int(v) for v in k_offsets.tolist()]
    for g in range(len(offsets) - 1):
        start, end = offsets[g], offsets[g + 1]
        if start < 0 or end > K_total or end < start or start % ALIGNMENT or (end - start) % ALIGNMENT:
            out[g] = float("nan")
            continue
        base = out[g] if accumulate else torch.zeros_like(out[g])
        if end == start:
            out[g] = base
            continue
        k, kb = slice(start, end), slice(start // 128, end // 128)
        if a_scale is None:
            out[g] = base + a[:, k].float() @ b[:, k].float().t()
        else:
            out[g] = base + _gemm.fp8_gemm(a[:, k], a_scale[:, kb], b[:, k], b_scale[:, kb], torch.float32)
    return out
