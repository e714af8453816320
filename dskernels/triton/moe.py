"""The MoE layer's routing choice, contiguous layout and data movement in Triton.

route: program of BLOCK_T tokens holds their affinities as [group, expert of the group] and picks the
groups, then the experts, by repeated max (ties to the lower index), counting each choice (integer
atomics: the same counts in any order). The weights are left to PyTorch ops on the chosen affinities
(dskernels.moe.route), so they are the reference's bits and autograd reaches the logits.
layout: three launches with no host sync: per block of 128 slots its experts' counts (and the rows
initialized to padding), one program per 16 experts scanning their counts over the blocks (each block's
offsets, each expert's total), per block each slot's row (its expert's segment start, which every program
works out from the totals, plus its rank among the block's slots of that expert: tokens ascending).

permute: program r copies row r of the expert-sorted layout from its token (zeros for padding rows),
optionally quantized on the way (1 x 128 groups, the bytes and scales of per_token_group_quant).
combine: program (t, block of D) sums token t's k rows, each times its weight (or unweighted: the
permute's backward), in fp32 in slot order, one rounding at the end.
combine's backward: program r writes row r's gradient (its slot's weight times the token's output
gradient, zeros for padding rows) and that slot's weight gradient (the row's dot product with the
output gradient, over D in a fixed order: deterministic, no atomics).
An index out of range (a layout not made by contiguous_layout) reads nothing: its row or token comes
back NaN.

The fp32 arithmetic is the reference's operation for operation (dskernels.reference.moe): the kernels
compile without floating-point contraction (enable_fp_fusion=False), so w * y + acc is a multiply and
an add, as in PyTorch, not a fused multiply-add.
"""
import triton
import triton.language as tl

from dskernels.triton.common import EMULATE_CASTS, scale_from_amax, to_bf16, to_e4m3

GROUP = 128  # the FP8 quantization group along D
_GROUP = tl.constexpr(GROUP)  # (the kernels' copy: compiled kernels read no other globals)


def _block(D: int, cap: int = 1024) -> int:
    return min(cap, triton.next_power_of_2(max(D, 16)))


def _groups(D: int) -> int:
    """128-column groups a row kernel takes per step: up to 1024 columns."""
    return min(8, triton.next_power_of_2(triton.cdiv(D, GROUP)))


@triton.jit
def _store_rounded(ptr, v, mask, EMULATE: tl.constexpr):
    """fp32 v into ptr's dtype (bf16 rounded to nearest even, exactly under the interpreter too)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, to_bf16(v, EMULATE), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quant_groups(dst, f, mask, s_dst, s_mask, POW2: tl.constexpr, EMULATE: tl.constexpr):
    """1 x 128 groups, one per row of the tile f [G, 128] (fp32, zero where masked), quantized into dst
    (e4m3) and their scales into s_dst [G], as per_token_group_quant."""
    a = tl.abs(f)
    a = tl.where(a != a, 0.0, a)  # NaN is left out of the amax (it quantizes to NaN on its own)
    scale = scale_from_amax(tl.max(a, axis=1), POW2)
    tl.store(dst, to_e4m3(f * tl.math.div_rn(1.0, scale)[:, None], EMULATE), mask=mask)
    tl.store(s_dst, scale, mask=s_mask)


@triton.jit
def _permute_kernel(x_ptr, tok_ptr, out_ptr, s_ptr, T, D, stride_x, stride_out, stride_sr, stride_sg,
                    FP8: tl.constexpr, POW2: tl.constexpr, GROUPS: tl.constexpr, EMULATE: tl.constexpr):
    """Row r: x[token_of_row[r]] copied (or quantized) GROUPS x 128 columns at a time, a [GROUPS, 128] tile
    whose rows are the 1 x 128 quantization groups (each reduced within its warps, not across the CTA)."""
    r = tl.program_id(0)
    t = tl.load(tok_ptr + r) + tl.zeros((GROUPS, _GROUP), tl.int32)  # (a tile: the interpreter cannot & a scalar)
    valid = (t >= 0) & (t < T)
    bad = (t < -1) | (t >= T)
    src = x_ptr + tl.maximum(t, 0).to(tl.int64) * stride_x
    dst = out_ptr + r.to(tl.int64) * stride_out
    for d0 in range(0, D, GROUPS * _GROUP):
        grp = d0 // _GROUP + tl.arange(0, GROUPS)
        d = grp[:, None] * _GROUP + tl.arange(0, _GROUP)[None, :]
        in_row = d < D
        v = tl.load(src + d, mask=in_row & valid, other=0.0)
        v = tl.where(bad, float("nan"), v)
        if FP8:
            _quant_groups(dst + d, v.to(tl.float32), in_row, s_ptr + r.to(tl.int64) * stride_sr + grp * stride_sg,
                          grp * _GROUP < D, POW2, EMULATE)
        else:
            tl.store(dst + d, v, mask=in_row)


@triton.jit
def _combine_kernel(y_ptr, slot_ptr, w_ptr, out_ptr, R, D, stride_y, stride_out, K: tl.constexpr,
                    WEIGHTED: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr):
    t = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in tl.static_range(K):  # slot order
        row = tl.load(slot_ptr + t * K + j) + tl.zeros((BLOCK_D,), tl.int32)
        ok = (row >= 0) & (row < R)
        v = tl.load(y_ptr + row.to(tl.int64) * stride_y + d, mask=in_row & ok, other=0.0).to(tl.float32)
        v = tl.where(ok, v, float("nan"))
        if WEIGHTED:
            v = tl.load(w_ptr + t * K + j) * v
        acc = acc + v
    _store_rounded(out_ptr + t.to(tl.int64) * stride_out + d, acc, in_row, EMULATE)


@triton.jit
def _combine_backward_kernel(g_ptr, y_ptr, tok_ptr, slot_ptr, w_ptr, gy_ptr, gw_ptr, T, D, stride_g, stride_y,
                             stride_gy, K: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr):
    r = tl.program_id(0)
    t = tl.load(tok_ptr + r)
    valid = (t >= 0) & (t < T)
    tt = tl.where(valid, t, 0)
    w = tl.where((t < -1) | (t >= T), float("nan"), 0.0)
    j_of_row = 0
    for j in tl.static_range(K):  # the slot of token t that row r holds
        hit = valid & (tl.load(slot_ptr + tt * K + j, mask=valid, other=-1) == r)
        w = tl.where(hit, tl.load(w_ptr + tt * K + j, mask=hit, other=0.0), w)
        j_of_row = tl.where(hit, j, j_of_row)
    tv = t + tl.zeros((BLOCK_D,), tl.int32)  # (a vector: the interpreter cannot & a scalar)
    valid_v = (tv >= 0) & (tv < T)
    dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_row = d < D
        g = tl.load(g_ptr + tt.to(tl.int64) * stride_g + d, mask=in_row & valid_v, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + r.to(tl.int64) * stride_y + d, mask=in_row & valid_v, other=0.0).to(tl.float32)
        _store_rounded(gy_ptr + r.to(tl.int64) * stride_gy + d, w * g, in_row, EMULATE)
        dot = dot + g * y
    if valid:
        tl.store(gw_ptr + tt * K + j_of_row, tl.sum(dot, axis=0))


def permute(x, token_of_row, out, scale, pow2_scale):
    """out[r] = x[token_of_row[r]] (zeros where it is -1); FP8 (out e4m3, scale [rows, ceil(D/128)]) when
    scale is given. Arguments checked."""
    rows, D = out.shape
    fp8 = scale is not None
    s_strides = (scale.stride(0), scale.stride(1)) if fp8 else (0, 0)
    _permute_kernel[(rows,)](x, token_of_row, out, scale if fp8 else out, x.shape[0], D, x.stride(0), out.stride(0),
                             *s_strides, FP8=fp8, POW2=pow2_scale, GROUPS=_groups(D), EMULATE=EMULATE_CASTS,
                             num_warps=4)


def combine(y, row_of_slot, weights, out):
    """out[t] = sum_j weights[t, j] * y[row_of_slot[t, j]] (weights None: unweighted). Arguments checked."""
    T, K = row_of_slot.shape
    D = out.shape[1]
    block = _block(D)
    _combine_kernel[(T, triton.cdiv(D, block))](
        y, row_of_slot, y if weights is None else weights, out, y.shape[0], D, y.stride(0), out.stride(0), K=K,
        WEIGHTED=weights is not None, BLOCK_D=block, EMULATE=EMULATE_CASTS, num_warps=4, enable_fp_fusion=False)


def combine_backward(grad, y, token_of_row, row_of_slot, weights, grad_y, grad_weights):
    """grad_y [rows, D] and grad_weights [T, k] of combine, from its output gradient. Arguments checked."""
    rows, D = grad_y.shape
    _combine_backward_kernel[(rows,)](
        grad, y, token_of_row, row_of_slot, weights, grad_y, grad_weights, grad.shape[0], D, grad.stride(0),
        y.stride(0), grad_y.stride(0), K=row_of_slot.shape[1], BLOCK_D=_block(D), EMULATE=EMULATE_CASTS,
        num_warps=4, enable_fp_fusion=False)


# ---------------------------------------------------------------------------------------------
# Routing's choice and the contiguous layout.

@triton.jit
def _route_kernel(s_ptr, bias_ptr, idx_ptr, counts_ptr, T, E, PER, stride_s, HAS_BIAS: tl.constexpr,
                  N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr, BLOCK_T: tl.constexpr,
                  G_PAD: tl.constexpr, PER_PAD: tl.constexpr):
    """Tokens [BLOCK_T] x experts as [group, expert of the group]: the biased affinities, the TOPK_GROUP
    best groups (by the sum of their two best, or their best without a bias), then the TOPK best experts
    among them in descending order, ties to the lower index; counts += 1 per choice."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.arange(0, G_PAD)
    c = tl.arange(0, PER_PAD)
    eid = g[None, :, None] * PER + c[None, None, :]                       # [1, G_PAD, PER_PAD]
    ok = (g[None, :, None] < N_GROUP) & (c[None, None, :] < PER)
    t_ok = t < T
    choice = tl.load(s_ptr + t[:, None, None].to(tl.int64) * stride_s + eid, mask=t_ok[:, None, None] & ok,
                     other=float("-inf"))
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + eid, mask=ok, other=0.0)
    choice = tl.where(choice != choice, float("inf"), choice)  # NaN ranks first, as in the reference's sort
    choice = tl.where(ok, choice, float("-inf"))
    big = N_GROUP * PER_PAD
    if N_GROUP > 1:
        best = tl.max(choice, axis=2)                                      # [BLOCK_T, G_PAD]
        if HAS_BIAS:
            first = tl.min(tl.where(choice == best[:, :, None], c[None, None, :], PER_PAD), axis=2)
            second = tl.max(tl.where(c[None, None, :] == first[:, :, None], float("-inf"), choice), axis=2)
            score = best + second
        else:
            score = best
        score = tl.where(g[None, :] < N_GROUP, score, float("-inf"))
        keep = g[None, :] < 0                                              # [1, G_PAD], all False
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(score, axis=1)
            pick = tl.min(tl.where(score == top[:, None], g[None, :], G_PAD), axis=1)
            keep = keep | (g[None, :] == pick[:, None])
            score = tl.where(g[None, :] == pick[:, None], float("-inf"), score)
        choice = tl.where(keep[:, :, None] & ok, choice, float("-inf"))
    for i in tl.static_range(TOPK):
        top = tl.max(tl.max(choice, axis=2), axis=1)
        pick = tl.min(tl.min(tl.where((choice == top[:, None, None]) & ok, eid, big), axis=2), axis=1)
        tl.store(idx_ptr + t.to(tl.int64) * TOPK + i, pick, mask=t_ok)
        tl.atomic_add(counts_ptr + pick, 1, mask=t_ok & (pick < E))  # (integers: the same in any order)
        choice = tl.where(eid == pick[:, None, None], float("-inf"), choice)


@triton.jit
def _layout_hist_kernel(idx_ptr, hist_ptr, mind_ptr, tok_ptr, S, E, ROWS, ROWS_PER_PROGRAM, BLOCK_S: tl.constexpr,
                        E_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """Block b of the slots: its experts' counts into hist[b, :]; and rows [b * ROWS_PER_PROGRAM, ...) of
    m_indices and token_of_row set to -1 (the scatter kernel then writes the data rows)."""
    b = tl.program_id(0)
    s = b * BLOCK_S + tl.arange(0, BLOCK_S)
    e = tl.load(idx_ptr + s, mask=s < S, other=-1)
    cols = tl.arange(0, E_PAD)
    hist = tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + b.to(tl.int64) * E + cols, hist, mask=cols < E)
    for r0 in range(0, ROWS_PER_PROGRAM, BLOCK_R):
        r = b * ROWS_PER_PROGRAM + r0 + tl.arange(0, BLOCK_R)
        m = (r < ROWS) & (r0 + tl.arange(0, BLOCK_R) < ROWS_PER_PROGRAM)
        tl.store(mind_ptr + r, tl.full((BLOCK_R,), -1, tl.int32), mask=m)
        tl.store(tok_ptr + r, tl.full((BLOCK_R,), -1, tl.int32), mask=m)


@triton.jit
def _layout_scan_kernel(hist_ptr, offs_ptr, counts_ptr, NB, E, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """Experts [pid * BLOCK_E, ...), each a column of hist scanned on its own: offs[b, e] = the rows of
    expert e in the blocks before b, counts[e] = all of them."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    carry = tl.zeros((BLOCK_E,), tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        m = (b < NB)[:, None] & (e < E)[None, :]
        h = tl.load(hist_ptr + b[:, None].to(tl.int64) * E + e[None, :], mask=m, other=0)
        tl.store(offs_ptr + b[:, None].to(tl.int64) * E + e[None, :], tl.cumsum(h, axis=0) - h + carry[None, :],
                 mask=m)
        carry += tl.sum(h, axis=0)
    tl.store(counts_ptr + e, carry, mask=e < E)


@triton.jit
def _segment_starts(counts_ptr, E, STRIDE, ALIGN: tl.constexpr, E_PAD: tl.constexpr):
    """[E_PAD] int32: expert e's first row, the sum of the earlier experts' counts each rounded up to ALIGN
    (contiguous, STRIDE 0) or e * STRIDE (masked)."""
    cols = tl.arange(0, E_PAD)
    padded = (tl.load(counts_ptr + cols, mask=cols < E, other=0) + ALIGN - 1) // ALIGN * ALIGN
    return tl.where(STRIDE > 0, cols * STRIDE, tl.cumsum(padded, axis=0) - padded)


@triton.jit
def _layout_scatter_kernel(idx_ptr, offs_ptr, counts_ptr, start_ptr, row_of_slot_ptr, mind_ptr, tok_ptr, S, E, K,
                           STRIDE, ALIGN: tl.constexpr, BLOCK_S: tl.constexpr, E_PAD: tl.constexpr):
    """Block b of the slots: each slot's row = its expert's segment start + the expert's rows in earlier
    blocks + its rank among this block's slots of that expert (slot order: tokens ascending). A masked
    segment (STRIDE > 0) holds STRIDE rows: a slot past them (a token naming an expert twice) gets none.
    Every program works out the segment starts from the counts (E values); the first one stores them."""
    b = tl.program_id(0)
    s = b * BLOCK_S + tl.arange(0, BLOCK_S)
    e = tl.load(idx_ptr + s, mask=s < S, other=-1)
    valid = (s < S) & (e >= 0) & (e < E)
    cols = tl.arange(0, E_PAD)
    starts = _segment_starts(counts_ptr, E, STRIDE, ALIGN, E_PAD)
    tl.store(start_ptr + cols, starts, mask=(cols < E) & (cols * 0 + b == 0))  # (a vector mask: the interpreter)
    hot = ((e[:, None] == cols[None, :]) & valid[:, None]).to(tl.int32)
    rank = tl.sum(tl.cumsum(hot, axis=0) * hot, axis=1) - 1
    ee = tl.where(valid, e, 0)
    rank = tl.load(offs_ptr + b.to(tl.int64) * E + ee, mask=valid, other=0) + rank  # within the expert's rows
    valid = valid & (rank < STRIDE + (STRIDE == 0) * (1 << 30))  # (contiguous: unbounded)
    row = tl.sum(tl.where(cols[None, :] == ee[:, None], starts[None, :], 0), axis=1) + rank
    tl.store(row_of_slot_ptr + s, tl.where(valid, row, -1), mask=s < S)
    tl.store(mind_ptr + row, e, mask=valid)
    tl.store(tok_ptr + row, s // K, mask=valid)


ROUTE_ELEMENTS, ROUTE_WARPS = 4096, 4  # affinities a route program holds (tokens x padded experts), its warps


def route_choice(s, bias, topk, n_group, topk_group, idx, counts):
    """idx [T, topk] int32 (the choice) and counts [E] int32 (zeroed here, then added to) from the affinities
    s [T, E] fp32 and bias [E] fp32 or None. Arguments checked."""
    T, E = s.shape
    per = E // n_group
    g_pad, per_pad = triton.next_power_of_2(n_group), triton.next_power_of_2(per)
    block_t = max(1, min(64, ROUTE_ELEMENTS // (g_pad * per_pad)))
    counts.zero_()
    if T:
        _route_kernel[(triton.cdiv(T, block_t),)](s, s if bias is None else bias, idx, counts, T, E, per, s.stride(0),
                                                  HAS_BIAS=bias is not None, N_GROUP=n_group, TOPK_GROUP=topk_group,
                                                  TOPK=topk, BLOCK_T=block_t, G_PAD=g_pad, PER_PAD=per_pad,
                                                  num_warps=ROUTE_WARPS)


LAYOUT_BLOCK = 128  # slots per program of the layout kernels


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def layout(topk_idx, num_experts, alignment, stride, m_indices, token_of_row, row_of_slot, segment_start, counts,
           workspace):
    """The layout's five tensors from topk_idx [T, k] int32 (contiguous), in three launches: the contiguous
    layout (stride 0) or the masked one (expert e's segment at e * stride); workspace: int32 [2, blocks,
    num_experts] (each block's per-expert counts, then their exclusive prefix). Arguments checked."""
    S, E, rows = topk_idx.numel(), num_experts, m_indices.shape[0]
    blocks = max(1, triton.cdiv(S, LAYOUT_BLOCK))
    e_pad = triton.next_power_of_2(E)
    hist, offs = workspace[0], workspace[1]
    _layout_hist_kernel[(blocks,)](topk_idx, hist, m_indices, token_of_row, S, E, rows, triton.cdiv(rows, blocks),
                                   BLOCK_S=LAYOUT_BLOCK, E_PAD=e_pad, BLOCK_R=256, num_warps=4)
    block_e = min(16, e_pad)
    _layout_scan_kernel[(triton.cdiv(E, block_e),)](hist, offs, counts, blocks, E, BLOCK_B=min(256, _pow2(blocks)),
                                                    BLOCK_E=block_e, num_warps=4)
    # (with no slots one program still stores the segment starts)
    _layout_scatter_kernel[(blocks,)](topk_idx, offs, counts, segment_start, row_of_slot, m_indices, token_of_row, S,
                                      E, max(1, topk_idx.shape[1]), stride, ALIGN=alignment, BLOCK_S=LAYOUT_BLOCK,
                                      E_PAD=e_pad, num_warps=4)


# ---------------------------------------------------------------------------------------------
# The expert MLP's activation: SwiGLU, with its output quantized (FP8) or rounded (bf16), and its backward.

@triton.jit
def _gate_up(h_ptr, r, stride_h, I, c, valid):
    """Row r's gate and up values at columns c (fp32; zeros past I and on padding rows), with the row's
    validity as a vector of c's shape."""
    m = c < I
    row = h_ptr + r.to(tl.int64) * stride_h
    g = tl.load(row + c, mask=m & valid, other=0.0).to(tl.float32)
    u = tl.load(row + I + c, mask=m & valid, other=0.0).to(tl.float32)
    return g, u, m


@triton.jit
def _silu_parts(g):
    """sigmoid(g) and silu(g) = g * sigmoid(g), in fp32."""
    sig = 1.0 / (1.0 + tl.exp(-g))
    return sig, g * sig


@triton.jit
def _swiglu_kernel(h_ptr, tok_ptr, out_ptr, s_ptr, I, stride_h, stride_out, stride_sr, stride_sg,
                   FP8: tl.constexpr, POW2: tl.constexpr, GROUPS: tl.constexpr, EMULATE: tl.constexpr):
    """Row r: act = silu(gate) * up, GROUPS x 128 columns at a time (one scale per 128 when FP8); zeros for
    padding rows."""
    r = tl.program_id(0)
    valid = tl.load(tok_ptr + r) + tl.zeros((GROUPS, _GROUP), tl.int32) >= 0  # (a tile: see _permute_kernel)
    dst = out_ptr + r.to(tl.int64) * stride_out
    for c0 in range(0, I, GROUPS * _GROUP):
        grp = c0 // _GROUP + tl.arange(0, GROUPS)
        c = grp[:, None] * _GROUP + tl.arange(0, _GROUP)[None, :]
        g, u, m = _gate_up(h_ptr, r, stride_h, I, c, valid)
        sig, silu = _silu_parts(g)
        act = silu * u
        if FP8:
            _quant_groups(dst + c, act, m, s_ptr + r.to(tl.int64) * stride_sr + grp * stride_sg, grp * _GROUP < I,
                          POW2, EMULATE)
        else:
            _store_rounded(dst + c, act, m, EMULATE)


@triton.jit
def _swiglu_backward_kernel(h_ptr, d_ptr, tok_ptr, dh_ptr, I, stride_h, stride_d, stride_dh, BLOCK: tl.constexpr,
                            EMULATE: tl.constexpr):
    r = tl.program_id(0)
    valid = tl.load(tok_ptr + r) + tl.zeros((BLOCK,), tl.int32) >= 0
    dst = dh_ptr + r.to(tl.int64) * stride_dh
    for c0 in range(0, I, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        g, u, m = _gate_up(h_ptr, r, stride_h, I, c, valid)
        d = tl.load(d_ptr + r.to(tl.int64) * stride_d + c, mask=m & valid, other=0.0).to(tl.float32)
        sig, silu = _silu_parts(g)
        _store_rounded(dst + c, d * u * sig * (1.0 + g * (1.0 - sig)), m, EMULATE)
        _store_rounded(dst + I + c, d * silu, m, EMULATE)


def swiglu(h, token_of_row, out, scale, pow2_scale):
    """out [rows, I] = silu(h[:, :I]) * h[:, I:] (bf16), or e4m3 with scale [rows, ceil(I/128)] when scale is
    given; padding rows zero. Arguments checked."""
    rows, I = out.shape
    fp8 = scale is not None
    s_strides = (scale.stride(0), scale.stride(1)) if fp8 else (0, 0)
    _swiglu_kernel[(rows,)](h, token_of_row, out, scale if fp8 else out, I, h.stride(0), out.stride(0), *s_strides,
                            FP8=fp8, POW2=pow2_scale, GROUPS=_groups(I), EMULATE=EMULATE_CASTS, num_warps=4)


def swiglu_backward(h, grad, token_of_row, grad_h):
    rows, two_i = grad_h.shape
    _swiglu_backward_kernel[(rows,)](h, grad, token_of_row, grad_h, two_i // 2, h.stride(0), grad.stride(0),
                                     grad_h.stride(0), BLOCK=_block(two_i // 2), EMULATE=EMULATE_CASTS, num_warps=4)
