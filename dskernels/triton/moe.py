"""The MoE layer's data movement in Triton: permute, combine and their backwards.

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


def _block(D: int, cap: int = 1024) -> int:
    return min(cap, triton.next_power_of_2(max(D, 16)))


@triton.jit
def _store_rounded(ptr, v, mask, EMULATE: tl.constexpr):
    """fp32 v into ptr's dtype (bf16 rounded to nearest even, exactly under the interpreter too)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, to_bf16(v, EMULATE), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _permute_kernel(x_ptr, tok_ptr, out_ptr, s_ptr, T, D, stride_x, stride_out, stride_sr, stride_sg,
                    FP8: tl.constexpr, POW2: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE: tl.constexpr):
    r = tl.program_id(0)
    t = tl.load(tok_ptr + r) + tl.zeros((BLOCK_D,), tl.int32)  # (a vector: the interpreter cannot & a scalar)
    valid = (t >= 0) & (t < T)
    bad = (t < -1) | (t >= T)
    src = x_ptr + tl.maximum(t, 0).to(tl.int64) * stride_x
    dst = out_ptr + r.to(tl.int64) * stride_out
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_row = d < D
        v = tl.load(src + d, mask=in_row & valid, other=0.0)
        v = tl.where(bad, float("nan"), v)
        if FP8:  # BLOCK_D == 128: one group
            f = v.to(tl.float32)
            a = tl.abs(f)
            a = tl.where(a != a, 0.0, a)  # NaN is left out of the amax (it quantizes to NaN on its own)
            scale = scale_from_amax(tl.max(a, axis=0), POW2)
            tl.store(dst + d, to_e4m3(f * tl.math.div_rn(1.0, scale), EMULATE), mask=in_row)
            tl.store(s_ptr + r.to(tl.int64) * stride_sr + (d0 // BLOCK_D) * stride_sg, scale)
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
                             *s_strides, FP8=fp8, POW2=pow2_scale, BLOCK_D=GROUP if fp8 else _block(D),
                             EMULATE=EMULATE_CASTS, num_warps=4)


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
