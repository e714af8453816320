"""Grouped GEMMs (contiguous and masked layouts, FP8 with promotion or BF16) in Triton.

One kernel for the four forms (constexprs FP8 and MASKED): the dense FP8 kernel's mainloop
(dskernels/triton/gemm.py) with the tile's expert found per program. Contiguous: a tile of rows lies in
one aligned segment (BLOCK_M divides the alignment, 128), whose expert is the largest valid id among its
128 rows (dskernels.reference.grouped_gemm.segment_experts); tiles of padding only return at once, rows that
break the layout are written as NaN. Masked: program (g, tile) returns at once past masked_m[g], so an
expert with no rows costs a launch slot and nothing else; no host sync either way. The k-grouped weight
gradient (_k_grouped_kernel, FP8 or BF16) reduces each group's token segment, read from k_offsets on the
device.
"""
import triton
import triton.language as tl

from dskernels.reference import grouped_gemm as _ref
from dskernels.triton.common import EMULATE_CASTS, dot_bf16, swizzled_tile, to_bf16

ALIGNMENT = tl.constexpr(_ref.ALIGNMENT)  # (a constexpr: compiled kernels read no other globals)


_SMALL = dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4)
_LARGE_FP8 = dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=4)
_LARGE_BF16 = dict(_LARGE_FP8, num_stages=3)
CONFIGS = (_SMALL, _LARGE_FP8, _LARGE_BF16)  # every config _config returns on a GPU (the compile check's list)


def _config(rows: int, fp8: bool) -> dict:
    """The tile and pipeline for a problem whose groups hold about `rows` rows each: chosen by rule, not
    autotuned, so that a new token count costs no tuning pass inside an eager training step and the
    choice (hence the bits) cannot change from one run to the next."""
    if EMULATE_CASTS:  # the CPU interpreter: small tiles
        return dict(BLOCK_M=32, BLOCK_N=32, GROUP_M=4, num_warps=4, num_stages=1)
    if rows <= 64:  # decode-sized groups: half-height tiles waste less of each expert's tile
        return _SMALL
    return _LARGE_FP8 if fp8 else _LARGE_BF16


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, rows_ptr, M, N, K, G,
                         stride_sa_g, stride_sa_m, stride_sa_k, stride_ag, stride_am, stride_ak, stride_bg, stride_bn,
                         stride_bk, FP8: tl.constexpr, MASKED: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                         EMULATE: tl.constexpr):
    # M: rows of the problem (contiguous: M_total; masked: M_max per expert). BLOCK_K: 128 for FP8 (one
    # scale block), 64 for BF16 (shared memory). a and b by their strides (BF16: transposed views too;
    # FP8's are K-major), out contiguous.
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    g = 0
    if MASKED:  # programs of expert g, then g + 1, ...
        g = pid // (grid_m * grid_n)
        pid = pid % (grid_m * grid_n)
    pid_m, pid_n = swizzled_tile(pid, grid_m, grid_n, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    if MASKED:
        valid = tl.minimum(tl.load(rows_ptr + g), M)
        if pid_m * BLOCK_M >= valid:
            return
        row_ok = rm < valid
        bad = rm < 0  # (none)
        e = g
        row_base = g.to(tl.int64) * M  # out [G, M, N]
        a_base = g.to(tl.int64) * stride_ag
        sa_base = g.to(tl.int64) * stride_sa_g  # a_scale [G, M, Kb]
    else:
        seg = (pid_m * BLOCK_M) // ALIGNMENT * ALIGNMENT + tl.arange(0, ALIGNMENT)
        seg_ids = tl.load(rows_ptr + seg, mask=seg < M, other=-1)
        e = tl.max(tl.where(seg_ids < G, seg_ids, -1), axis=0)  # the largest valid id of the segment
        ids = tl.load(rows_ptr + rm, mask=rm < M, other=-1)
        row_ok = (rm < M) & (ids == e) & (ids < G)  # (ids < G: e < G on these rows, as a vector)
        bad = (rm < M) & (ids != -1) & ((ids != e) | (ids >= G))
        if e < 0:  # no valid id in the segment: its other non-padding rows NaN, nothing else written
            if tl.max(bad.to(tl.int32), axis=0) > 0:
                nan_ptrs = out_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
                tl.store(nan_ptrs, tl.full((BLOCK_M, BLOCK_N), float("nan"), tl.bfloat16),
                         mask=bad[:, None] & n_ok[None, :])
            return
        row_base = 0
        a_base = 0
        sa_base = 0
    rows = row_base + rm.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_base + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = (b_ptr + e.to(tl.int64) * stride_bg + rn[None, :].to(tl.int64) * stride_bn
              + rk[:, None] * stride_bk)  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FP8:
        kb_count = K // BLOCK_K
        sa_ptrs = sa_ptr + sa_base + rm.to(tl.int64) * stride_sa_m
        sb_ptrs = sb_ptr + e.to(tl.int64) * tl.cdiv(N, 128) * kb_count + (rn // 128) * kb_count
        for kb in range(0, kb_count):
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            sa = tl.load(sa_ptrs + kb * stride_sa_k, mask=row_ok, other=0.0)
            sb = tl.load(sb_ptrs + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]  # <= 128 K-elements, then promoted
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
    else:
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc += dot_bf16(a, b, EMULATE)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    out_ptrs = out_ptr + rows[:, None] * N + rn[None, :]
    acc = tl.where(bad[:, None], float("nan"), acc)
    tl.store(out_ptrs, to_bf16(acc, EMULATE), mask=(row_ok | bad)[:, None] & n_ok[None, :])


def grouped_gemm(a, a_scale, b, b_scale, rows, out, masked, hint_m):
    """Fills out (bf16, contiguous): contiguous (rows = m_indices [M_total]) or masked (rows = masked_m
    [G]); FP8 when a_scale is given (a_scale [rows, K/128] or [G, M_max, K/128], any strides; b_scale [G,
    ceil(N/128), K/128] contiguous), else BF16; a and b with any strides. Arguments checked."""
    G, N, K = b.shape
    M = a.shape[1] if masked else a.shape[0]
    fp8 = a_scale is not None
    if fp8:
        strides = (a_scale.stride(0), a_scale.stride(1), a_scale.stride(2)) if masked else \
            (0, a_scale.stride(0), a_scale.stride(1))
    else:
        a_scale = b_scale = a  # (unused)
        strides = (0, 0, 0)

    cfg = _config(hint_m if masked else M // G, fp8)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    a_strides = a.stride() if masked else (0, *a.stride())
    _grouped_gemm_kernel[(tiles * G if masked else tiles,)](
        a, b, out, a_scale, b_scale, rows, M, N, K, G, *strides, *a_strides, *b.stride(), FP8=fp8, MASKED=masked,
        BLOCK_K=128 if fp8 else 64, EMULATE=EMULATE_CASTS, **cfg)


@triton.jit
def _k_grouped_kernel(a_ptr, b_ptr, out_ptr, sa_ptr, sb_ptr, off_ptr, M, N, K_TOTAL, stride_sa_m,
                      stride_sa_k, stride_sb_n, stride_sb_k, stride_am, stride_ak, stride_bn, stride_bk,
                      ACCUMULATE: tl.constexpr, FP8: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                      EMULATE: tl.constexpr):
    # Program (g, tile): out[g] tile (+)= a[:, seg] @ b[:, seg].T over group g's 128-aligned token segment:
    # FP8 operands with 1 x 128 scales along the reduction (1D1D), promoted every 128 (BLOCK_K 128), or
    # BF16 ones summed in fp32 (BLOCK_K 64); a and b by their strides (BF16: transposed views too).
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    g = pid // (grid_m * grid_n)
    pid_m, pid_n = swizzled_tile(pid % (grid_m * grid_n), grid_m, grid_n, GROUP_M)
    start = tl.load(off_ptr + g)
    end = tl.load(off_ptr + g + 1)
    broken = (start < 0) | (end > K_TOTAL) | (end < start) | (start % ALIGNMENT != 0) | ((end - start) % ALIGNMENT != 0)
    start = tl.multiple_of(tl.where(broken, 0, start), ALIGNMENT)  # aligned: the loads can be pipelined
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    blocks = tl.where(broken, 0, (end - start) // BLOCK_K)  # a broken segment reads nothing
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + (start + rk[None, :]).to(tl.int64) * stride_ak
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + (start + rk[:, None]).to(tl.int64) * stride_bk
    sa_ptrs = sa_ptr + rm * stride_sa_m + (start // 128) * stride_sa_k
    sb_ptrs = sb_ptr + rn * stride_sb_n + (start // 128) * stride_sb_k
    for kb in range(0, blocks):
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        if FP8:
            sa = tl.load(sa_ptrs + kb * stride_sa_k, mask=m_ok, other=0.0)
            sb = tl.load(sb_ptrs + kb * stride_sb_k, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            acc += dot_bf16(a, b, EMULATE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_ptrs = out_ptr + g.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    acc += tl.where(broken, float("nan"), 0.0)  # a broken segment's group comes back NaN
    tl.store(out_ptrs, acc, mask=mask)


def k_grouped_gemm(a, a_scale, b, b_scale, k_offsets, out, accumulate):
    """out [G, M, N] fp32 (+)= per group's segment of a [M, K_total] @ b [N, K_total].T: FP8 with a_scale and
    b_scale, else BF16 (a_scale None); arguments checked."""
    G, M, N = out.shape
    fp8 = a_scale is not None
    cfg = _config(min(M, N), fp8)
    grid = (G * triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    sa, sb = (a_scale, b_scale) if fp8 else (a, b)  # (unused)
    _k_grouped_kernel[grid](a, b, out, sa, sb, k_offsets, M, N, a.shape[1], sa.stride(0), sa.stride(1), sb.stride(0),
                            sb.stride(1), *a.stride(), *b.stride(), ACCUMULATE=accumulate, FP8=fp8, BLOCK_K=128 if fp8 else 64,
                            EMULATE=EMULATE_CASTS, **cfg)
