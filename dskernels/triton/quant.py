"""FP8 quantization and dequantization in Triton.

One kernel serves the three quantization layouts: a program loads a [BLOCK_R, 128] tile through
arbitrary strides (so x.T is read in place: Triton coalesces each load and store along whichever
dim is contiguous), reduces amax per row (1 x 128 groups) or over the whole tile (128 x 128 blocks),
and writes e4m3 plus one scale per group.
"""
import torch
import triton
import triton.language as tl

from dskernels.triton.common import EMULATE_CASTS, from_e4m3, scale_from_amax, to_bf16, to_e4m3

BLOCK = 128


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, R, C, stride_xr, stride_xc, stride_qr, stride_sr, stride_sc,
                  POW2: tl.constexpr, WHOLE_TILE: tl.constexpr, BLOCK_R: tl.constexpr,
                  EMULATE: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * 128 + tl.arange(0, 128)
    mask = (r < R)[:, None] & (c < C)[None, :]
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_xr + c[None, :].to(tl.int64) * stride_xc, mask=mask,
                other=0.0).to(tl.float32)
    a = tl.abs(x)
    a = tl.where(a != a, 0.0, a)  # NaN is left out of the amax (it quantizes to NaN on its own)
    if WHOLE_TILE:
        scale = scale_from_amax(tl.max(tl.max(a, axis=1), axis=0), POW2)
        q = to_e4m3(x * tl.math.div_rn(1.0, scale), EMULATE)
        tl.store(s_ptr + pid_r * stride_sr + pid_c * stride_sc, scale)
    else:
        scale = scale_from_amax(tl.max(a, axis=1), POW2)
        q = to_e4m3(x * tl.math.div_rn(1.0, scale)[:, None], EMULATE)
        tl.store(s_ptr + r * stride_sr + pid_c * stride_sc, scale, mask=r < R)
    tl.store(q_ptr + r[:, None].to(tl.int64) * stride_qr + c[None, :], q, mask=mask)


@triton.jit
def _quant_both_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, K_out, M_out, stride_xm, stride_qm, stride_sm,
                       stride_sg, stride_qtk, stride_stk, stride_stg, POW2: tl.constexpr, EMULATE: tl.constexpr):
    """One 128 x 128 tile of x, quantized both ways: per row (groups along K, into q [M, K_out]) and per
    column (groups along M, into q_t [K, M_out]); the padding columns (K .. K_out - 1, M .. M_out - 1)
    get the zeros the masked load supplies."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    m = pid_m * 128 + tl.arange(0, 128)
    k = pid_k * 128 + tl.arange(0, 128)
    x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_xm + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :],
                other=0.0).to(tl.float32)
    a = tl.abs(x)
    a = tl.where(a != a, 0.0, a)  # NaN is left out of the amax (it quantizes to NaN on its own)
    row_scale = scale_from_amax(tl.max(a, axis=1), POW2)
    q = to_e4m3(x * tl.math.div_rn(1.0, row_scale)[:, None], EMULATE)
    tl.store(q_ptr + m[:, None].to(tl.int64) * stride_qm + k[None, :], q, mask=(m < M)[:, None] & (k < K_out)[None, :])
    tl.store(s_ptr + m * stride_sm + pid_k * stride_sg, row_scale, mask=m < M)
    col_scale = scale_from_amax(tl.max(a, axis=0), POW2)
    q_t = to_e4m3(x * tl.math.div_rn(1.0, col_scale)[None, :], EMULATE)
    tl.store(qt_ptr + k[None, :].to(tl.int64) * stride_qtk + m[:, None], q_t,
             mask=(m < M_out)[:, None] & (k < K)[None, :])
    tl.store(st_ptr + k * stride_stk + pid_m * stride_stg, col_scale, mask=k < K)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, R, C, stride_qr, stride_sr, stride_sc, stride_or,
                    SCALE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, EMULATE: tl.constexpr):
    pid_r, pid_c = tl.program_id(0), tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * 128 + tl.arange(0, 128)
    mask = (r < R)[:, None] & (c < C)[None, :]
    q = tl.load(q_ptr + r[:, None].to(tl.int64) * stride_qr + c[None, :], mask=mask, other=0.0)
    s = tl.load(s_ptr + (r // SCALE_ROWS) * stride_sr + pid_c * stride_sc, mask=r < R, other=0.0)
    y = from_e4m3(q, EMULATE) * s[:, None]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        y = to_bf16(y, EMULATE)
    tl.store(out_ptr + r[:, None].to(tl.int64) * stride_or + c[None, :], y, mask=mask)


def _quant(x, q, scale, pow2_scale, whole_tile, block_r):
    R, C = x.shape
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, BLOCK))
    _quant_kernel[grid](x, q, scale, R, C, x.stride(0), x.stride(1), q.stride(0), scale.stride(0),
                        scale.stride(1), POW2=pow2_scale, WHOLE_TILE=whole_tile, BLOCK_R=block_r,
                        EMULATE=EMULATE_CASTS, num_warps=4)


def per_token_group_quant(x, q, scale, pow2_scale):
    _quant(x, q, scale, pow2_scale, whole_tile=False, block_r=16)


def per_token_group_quant_transposed(x, q_t, scale, pow2_scale):
    # x.T read in place: 64 rows of x.T are 64 consecutive elements of a row of x (coalesced)
    _quant(x.t(), q_t, scale, pow2_scale, whole_tile=False, block_r=64)


def per_token_group_quant_both(x, q, scale, q_t, scale_t, pow2_scale):
    M, K = x.shape
    grid = (triton.cdiv(M, BLOCK), triton.cdiv(K, BLOCK))
    _quant_both_kernel[grid](x, q, scale, q_t, scale_t, M, K, q.shape[1], q_t.shape[1], x.stride(0), q.stride(0),
                             scale.stride(0), scale.stride(1), q_t.stride(0), scale_t.stride(0), scale_t.stride(1),
                             POW2=pow2_scale, EMULATE=EMULATE_CASTS, num_warps=8)


def per_block_quant(w, q, scale, pow2_scale):
    _quant(w, q, scale, pow2_scale, whole_tile=True, block_r=BLOCK)


def dequant(q, scale, block_rows, out):
    R, C = q.shape
    block_r = 16
    grid = (triton.cdiv(R, block_r), triton.cdiv(C, BLOCK))
    _dequant_kernel[grid](q, scale, out, R, C, q.stride(0), scale.stride(0), scale.stride(1),
                          out.stride(0), SCALE_ROWS=block_rows, BLOCK_R=block_r,
                          EMULATE=EMULATE_CASTS, num_warps=4)
