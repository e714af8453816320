"""MLA absorbed decode in Triton: split-KV (flash-decoding) over a paged latent cache.

A program takes one work item of the scheduler (a batch and a range of 64-token cache blocks, see
dskernels.mla.schedule) and BLOCK_H query rows (row = i * H + h for query token i, head h). Each
cache block is loaded once as [64, 576] and used twice: all 576 dims for the scores and the first
512 as the values, so the latent cache is read once per head block and never up-projected (the FP8
cache is dequantized to bf16 in registers, exactly as the reference does it). Online
softmax in fp32 (exp2, log2(e) folded into the scale), P in bf16 for the P @ V product. A batch with
a single item is finished by its program (out and lse written directly); a second kernel merges the
items of the other batches by their log-sum-exps.
"""
import torch
import triton
import triton.language as tl

from dskernels.triton.common import EMULATE_CASTS, dot_bf16, to_bf16

LOG2E = 1.4426950408889634


@triton.jit
def _store_final(out_ptr, lse_out_ptr, bad_ptr, b, r, r_ok, out, lse, rows, H, S_Q, EMULATE: tl.constexpr):
    """A batch's finished rows r: out [B, rows, 512] bf16, lse [B, H, S_Q]; NaN where the scheduler
    flagged the batch (bad)."""
    bad = tl.load(bad_ptr + b) != 0
    out = tl.where(bad, float("nan"), out)
    lse = tl.where(bad, float("nan"), lse)
    c = tl.arange(0, 512)
    tl.store(out_ptr + (b * rows + r).to(tl.int64)[:, None] * 512 + c[None, :], to_bf16(out, EMULATE),
             mask=r_ok[:, None])
    tl.store(lse_out_ptr + (b * H + r % H) * S_Q + r // H, lse, mask=r_ok)


@triton.jit
def _mla_split_kernel(q_ptr, cache_ptr, bt_ptr, seqlens_ptr, items_ptr, offsets_ptr, bad_ptr, o_ptr, lse_ptr,
                      out_ptr, lse_out_ptr, num_pages, page_stride, bt_stride, rows, H, S_Q, scale_log2,
                      CAUSAL: tl.constexpr, FP8_CACHE: tl.constexpr, BLOCK_H: tl.constexpr, EMULATE: tl.constexpr):
    item, hb = tl.program_id(0), tl.program_id(1)
    b = tl.load(items_ptr + item * 3)
    used = b >= 0  # unused slots of the fixed-size work list have b = -1 and no blocks
    b = tl.where(used, b, 0)
    blk0 = tl.load(items_ptr + item * 3 + 1)
    blk1 = tl.load(items_ptr + item * 3 + 2)
    L = tl.load(seqlens_ptr + b)
    r = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    r_ok = r < tl.where(used, rows, 0)
    if CAUSAL:
        limit = L - S_Q + r // H + 1          # query token i = r // H sees positions < limit
    else:
        limit = tl.zeros([BLOCK_H], dtype=tl.int32) + L
    c = tl.arange(0, 512)
    d = tl.arange(0, 64)
    g = tl.arange(0, 4)
    q_row = q_ptr + (b * rows + r).to(tl.int64) * 576
    q_lat = tl.load(q_row[:, None] + c[None, :], mask=r_ok[:, None], other=0.0)        # [BH, 512]
    q_pe = tl.load(q_row[:, None] + 512 + d[None, :], mask=r_ok[:, None], other=0.0)  # [BH, 64]

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, 512], dtype=tl.float32)
    t_off = tl.arange(0, 64)
    for blk in range(blk0, blk1):
        page = tl.load(bt_ptr + b.to(tl.int64) * bt_stride + blk)
        # An invalid page (a bad block table) is read as page 0: memory stays safe, and the
        # combine kernel turns the batch's output into NaN (the scheduler flagged it).
        page = tl.where((page >= 0) & (page < num_pages), page, 0)
        t = blk * 64 + t_off
        t_ok = t < L
        if FP8_CACHE:  # 656 bytes a token: 512 e4m3, 4 fp32 scales (one per 128), 64 bf16 RoPE dims
            tok = cache_ptr + page.to(tl.int64) * page_stride + t_off[:, None] * 656
            raw = tl.load(tok + c[None, :], mask=t_ok[:, None], other=0)
            scale = tl.load((tok + 512).to(tl.pointer_type(tl.float32)) + g[None, :], mask=t_ok[:, None],
                            other=0.0)                                                  # [64, 4]
            k = tl.reshape(raw.to(tl.float8e4nv, bitcast=True).to(tl.float32), (64, 4, 128))
            k_lat = to_bf16(tl.reshape(k * scale[:, :, None], (64, 512)), EMULATE)      # [64, 512]
            k_pe = tl.load((tok + 528).to(tl.pointer_type(tl.bfloat16)) + d[None, :], mask=t_ok[:, None],
                           other=0.0)                                                  # [64, 64]
        else:
            tok = cache_ptr + page.to(tl.int64) * page_stride + t_off[:, None] * 576
            k_lat = tl.load(tok + c[None, :], mask=t_ok[:, None], other=0.0)           # [64, 512]
            k_pe = tl.load(tok + 512 + d[None, :], mask=t_ok[:, None], other=0.0)      # [64, 64]
        s = dot_bf16(q_lat, tl.trans(k_lat), EMULATE) + dot_bf16(q_pe, tl.trans(k_pe), EMULATE)  # [BH, 64]
        s = tl.where(t[None, :] < limit[:, None], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot_bf16(to_bf16(p, EMULATE), k_lat, EMULATE)
        m = m_new

    seen = l > 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, l, 1.0))) / 1.4426950408889634, float("-inf"))
    if tl.load(offsets_ptr + b + 1) - tl.load(offsets_ptr + b) == 1:  # the batch's only item: finished
        _store_final(out_ptr, lse_out_ptr, bad_ptr, b, r, r_ok, out, lse, rows, H, S_Q, EMULATE)
    else:
        o_row = (item * rows + r).to(tl.int64)
        tl.store(o_ptr + o_row[:, None] * 512 + c[None, :], out, mask=r_ok[:, None])
        tl.store(lse_ptr + o_row, lse, mask=r_ok)


@triton.jit
def _append_kernel(cache_ptr, bt_ptr, seqlens_ptr, kv_ptr, pe_ptr, page_stride, bt_stride, S):
    b, j = tl.program_id(0), tl.program_id(1)
    pos = tl.load(seqlens_ptr + b) + j
    page = tl.load(bt_ptr + b.to(tl.int64) * bt_stride + pos // 64)
    dst = cache_ptr + page.to(tl.int64) * page_stride + (pos % 64) * 576
    src = (b * S + j).to(tl.int64)
    c = tl.arange(0, 512)
    d = tl.arange(0, 64)
    tl.store(dst + c, tl.load(kv_ptr + src * 512 + c).to(cache_ptr.dtype.element_ty))
    tl.store(dst + 512 + d, tl.load(pe_ptr + src * 64 + d).to(cache_ptr.dtype.element_ty))


def append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope):
    B, S, _ = kv_latent.shape
    _append_kernel[(B, S)](cache, block_table, cache_seqlens, kv_latent, k_rope, cache.stride(0),
                           block_table.stride(0), S, num_warps=4)


@triton.jit
def _mla_combine_kernel(o_ptr, lse_ptr, offsets_ptr, bad_ptr, out_ptr, lse_out_ptr, rows, H, S_Q,
                        BLOCK_R: tl.constexpr, EMULATE: tl.constexpr):
    b, rb = tl.program_id(0), tl.program_id(1)
    first = tl.load(offsets_ptr + b)
    last = tl.load(offsets_ptr + b + 1)
    if last - first > 1:  # a batch of one item was finished by the split kernel
        r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < rows
        c = tl.arange(0, 512)
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        for it in range(first, last):
            m = tl.maximum(m, tl.load(lse_ptr + it * rows + r, mask=r_ok, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        den = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, 512], dtype=tl.float32)
        for it in range(first, last):
            w = tl.exp(tl.load(lse_ptr + it * rows + r, mask=r_ok, other=float("-inf")) - m_safe)
            den += w
            o = tl.load(o_ptr + (it * rows + r).to(tl.int64)[:, None] * 512 + c[None, :], mask=r_ok[:, None],
                        other=0.0)
            acc += w[:, None] * o
        seen = den > 0
        out = acc / tl.where(seen, den, 1.0)[:, None]
        lse = tl.where(seen, m_safe + tl.log(tl.where(seen, den, 1.0)), float("-inf"))
        _store_final(out_ptr, lse_out_ptr, bad_ptr, b, r, r_ok, out, lse, rows, H, S_Q, EMULATE)


def head_block(rows: int) -> int:
    """Query rows per program. 64 rows (8 warps) lower the dots to wgmma and read each cache block
    once per 64 rows; fewer rows waste less on small head counts (ptxas, sm_90a: 16 and 32 rows
    without spills, 64 rows with 88 bytes)."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def mla_decode(q, cache, block_table, cache_seqlens, softmax_scale, causal, work, out, lse):
    """Fills out [B, s_q, H, 512] bf16 and lse [B, H, s_q]; work = the scheduler's
    (items, item_offsets, bad, o_partial, lse_partial)."""
    items, offsets, bad, o_part, lse_part = work
    B, s_q, H, _ = q.shape
    rows = s_q * H
    block_h = head_block(rows)
    _mla_split_kernel[(items.shape[0], triton.cdiv(rows, block_h))](
        q, cache, block_table, cache_seqlens, items, offsets, bad, o_part, lse_part, out, lse, cache.shape[0],
        cache.stride(0), block_table.stride(0), rows, H, s_q, softmax_scale * LOG2E, CAUSAL=causal,
        FP8_CACHE=cache.dtype == torch.uint8, BLOCK_H=block_h,
        EMULATE=EMULATE_CASTS, num_warps=8, num_stages=2)
    block_r = 16
    _mla_combine_kernel[(B, triton.cdiv(rows, block_r))](
        o_part, lse_part, offsets, bad, out, lse, rows, H, s_q, BLOCK_R=block_r, EMULATE=EMULATE_CASTS,
        num_warps=4)
