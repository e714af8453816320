"""MLA absorbed decode in Triton: split-KV (flash-decoding) over a paged latent cache.

A program takes one work item of the scheduler (a batch and a range of 64-token cache blocks, see
dskernels.reference.mla.schedule) and BLOCK_H query rows (row = i * H + h for query token i, head h). Each
cache block is loaded once as [64, 576] and used twice: all 576 dims for the scores and the first
512 as the values, so the latent cache is read once per head block and never up-projected (the FP8
cache is dequantized to bf16 in registers, exactly as the reference does it). Online
softmax in fp32 (exp2, log2(e) folded into the scale), P in bf16 for the P @ V product. A batch with
a single item is finished by its program (out and lse written directly); a second kernel merges the
items of the other batches by their log-sum-exps. Every program also checks its batch against the work
list's record (lengths, block-table fingerprint): a mismatch makes the batch's rows NaN (a NaN partial
lse marks it for the combine) and sets the metadata's error flag.
"""
import torch
import triton
import triton.language as tl

from dskernels.reference import mla as _ref_mla
from dskernels.triton.common import EMULATE_CASTS, dot_bf16, scale_from_amax, to_bf16, to_e4m3

LOG2E = 1.4426950408889634
ERROR_MISMATCH = tl.constexpr(_ref_mla.ERROR_MISMATCH)


@triton.jit
def _mul32(h, c: tl.constexpr):
    """h * c mod 2**32 for h in [0, 2**32) (int64), in halves so no product leaves int64."""
    return (((((h >> 16) * c) & 0xFFFF) << 16) + (h & 0xFFFF) * c) & 0xFFFFFFFF


@triton.jit
def _table_hash(bt_row, blocks):
    """dskernels.reference.mla.table_hash of one batch: its first `blocks` block-table entries."""
    acc = tl.zeros([128], dtype=tl.int64)
    for k0 in range(0, blocks, 128):
        k = k0 + tl.arange(0, 128)
        page = tl.load(bt_row + k, mask=k < blocks, other=0).to(tl.int64)
        h = (_mul32(page & 0xFFFFFFFF, 0x9E3779B1) + k.to(tl.int64)) & 0xFFFFFFFF
        h ^= h >> 16
        h = _mul32(h, 0x85EBCA6B)
        h ^= h >> 13
        h = _mul32(h, 0xC2B2AE35)
        h ^= h >> 16
        acc += tl.where(k < blocks, h, 0)
    return tl.sum(acc, axis=0) & 0xFFFFFFFF


@triton.jit
def _store_final(out_ptr, lse_out_ptr, bad, b, r, r_ok, out, lse, rows, H, S_Q, EMULATE: tl.constexpr):
    """A batch's finished rows r: out [B, rows, 512] bf16, lse [B, H, S_Q]; NaN in the rows where
    `bad` (per row: the scheduler flagged the batch, or its inputs differ from the record)."""
    out = tl.where(bad[:, None], float("nan"), out)
    lse = tl.where(bad, float("nan"), lse)
    c = tl.arange(0, 512)
    tl.store(out_ptr + (b * rows + r).to(tl.int64)[:, None] * 512 + c[None, :], to_bf16(out, EMULATE),
             mask=r_ok[:, None])
    tl.store(lse_out_ptr + (b * H + r % H) * S_Q + r // H, lse, mask=r_ok)


@triton.jit
def _mla_split_kernel(q_ptr, cache_ptr, bt_ptr, seqlens_ptr, items_ptr, offsets_ptr, bad_ptr, made_seqlens_ptr,
                      made_hash_ptr, error_ptr, o_ptr, lse_ptr, out_ptr, lse_out_ptr, num_pages, page_stride,
                      bt_stride, max_pages, rows, H, S_Q, scale_log2, CAUSAL: tl.constexpr,
                      FP8_CACHE: tl.constexpr, BLOCK_H: tl.constexpr, EMULATE: tl.constexpr):
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
    # Inputs other than those the work list was made from: NaN rows and the error flag.
    blocks = tl.minimum((tl.maximum(L, 0) + 63) // 64, max_pages)
    made_hash = tl.load(made_hash_ptr + b).to(tl.int64) & 0xFFFFFFFF
    mismatch = used & ((L != tl.load(made_seqlens_ptr + b)) |
                       (_table_hash(bt_ptr + b.to(tl.int64) * bt_stride, blocks) != made_hash))
    tl.atomic_or(error_ptr, ERROR_MISMATCH, mask=mismatch)
    tl.atomic_min(error_ptr + 1, b, mask=mismatch)
    if tl.load(offsets_ptr + b + 1) - tl.load(offsets_ptr + b) == 1:  # the batch's only item: finished
        poisoned = (r < 0) | (tl.load(bad_ptr + b) != 0) | mismatch  # per row, all alike
        _store_final(out_ptr, lse_out_ptr, poisoned, b, r, r_ok, out, lse, rows, H, S_Q, EMULATE)
    else:
        o_row = (item * rows + r).to(tl.int64)
        tl.store(o_ptr + o_row[:, None] * 512 + c[None, :], out, mask=r_ok[:, None])
        tl.store(lse_ptr + o_row, tl.where(mismatch, float("nan"), lse), mask=r_ok)


@triton.jit
def _append_kernel(cache_ptr, bt_ptr, seqlens_ptr, kv_ptr, pe_ptr, num_pages, page_stride, bt_stride, max_pages, S,
                   FP8_CACHE: tl.constexpr, EMULATE: tl.constexpr):
    """Token j of batch b to position cache_seqlens[b] + j; positions outside the table or the cache are
    skipped. The FP8 cache's 656-byte row: 512 e4m3 (one scale per 128 dims, amax / 448), the 4 fp32
    scales, the 64 bf16 RoPE dims (dskernels.reference.mla.quantize_cache_rows)."""
    b, j = tl.program_id(0), tl.program_id(1)
    pos = tl.load(seqlens_ptr + b) + j
    blk = tl.minimum(tl.maximum(pos // 64, 0), max_pages - 1)  # a table entry that exists, also when unused
    page = tl.load(bt_ptr + b.to(tl.int64) * bt_stride + blk)
    ok = (pos >= 0) & (pos < max_pages * 64) & (page >= 0) & (page < num_pages)
    src = (b * S + j).to(tl.int64)
    c = tl.arange(0, 512)
    d = tl.arange(0, 64)
    g = tl.arange(0, 4)
    kv = tl.load(kv_ptr + src * 512 + c)
    pe = tl.load(pe_ptr + src * 64 + d)
    # Masks as element counts (0 where the position is skipped): the interpreter rejects a scalar mask.
    if FP8_CACHE:
        dst = cache_ptr + page.to(tl.int64) * page_stride + (pos % 64) * 656
        x = tl.reshape(kv.to(tl.float32), (4, 128))
        a = tl.abs(x)
        scale = scale_from_amax(tl.max(tl.where(a != a, 0.0, a), axis=1), False)                  # [4]
        q = to_e4m3(x * tl.math.div_rn(1.0, scale)[:, None], EMULATE)
        tl.store(dst + c, tl.reshape(q, (512,)).to(tl.uint8, bitcast=True), mask=c < tl.where(ok, 512, 0))
        tl.store((dst + 512).to(tl.pointer_type(tl.float32)) + g, scale, mask=g < tl.where(ok, 4, 0))
        tl.store((dst + 528).to(tl.pointer_type(tl.bfloat16)) + d, pe, mask=d < tl.where(ok, 64, 0))
    else:
        dst = cache_ptr + page.to(tl.int64) * page_stride + (pos % 64) * 576
        tl.store(dst + c, kv, mask=c < tl.where(ok, 512, 0))
        tl.store(dst + 512 + d, pe, mask=d < tl.where(ok, 64, 0))


def append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope):
    B, S, _ = kv_latent.shape
    _append_kernel[(B, S)](cache, block_table, cache_seqlens, kv_latent, k_rope, cache.shape[0], cache.stride(0),
                           block_table.stride(0), block_table.shape[1], S, FP8_CACHE=cache.dtype == torch.uint8,
                           EMULATE=EMULATE_CASTS, num_warps=4)


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
        nan_partial = r < 0  # all false; a NaN partial lse is the split kernel's mark of a mismatch
        for it in range(first, last):
            part = tl.load(lse_ptr + it * rows + r, mask=r_ok, other=float("-inf"))
            nan_partial |= part != part
            m = tl.maximum(m, part)
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
        poisoned = (tl.load(bad_ptr + b) != 0) | nan_partial
        _store_final(out_ptr, lse_out_ptr, poisoned, b, r, r_ok, out, lse, rows, H, S_Q, EMULATE)


def head_block(rows: int) -> int:
    """Query rows per program. 64 rows (8 warps) lower the dots to wgmma and read each cache block
    once per 64 rows; fewer rows waste less on small head counts (ptxas, sm_90a: 16 and 32 rows
    without spills, 64 rows with 88 bytes)."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def mla_decode(q, cache, block_table, cache_seqlens, softmax_scale, causal, metadata, partials, out, lse):
    """Fills out [B, s_q, H, 512] bf16 and lse [B, H, s_q]; metadata = the work list's tensors (items,
    item_offsets, bad, made_seqlens, table_hash, error), partials = (o_partial, lse_partial)."""
    items, offsets, bad, made_seqlens, table_hash, error = metadata
    o_part, lse_part = partials
    B, s_q, H, _ = q.shape
    rows = s_q * H
    block_h = head_block(rows)
    _mla_split_kernel[(items.shape[0], triton.cdiv(rows, block_h))](
        q, cache, block_table, cache_seqlens, items, offsets, bad, made_seqlens, table_hash, error, o_part, lse_part,
        out, lse, cache.shape[0], cache.stride(0), block_table.stride(0), block_table.shape[1], rows, H, s_q,
        softmax_scale * LOG2E, CAUSAL=causal,
        FP8_CACHE=cache.dtype == torch.uint8, BLOCK_H=block_h,
        EMULATE=EMULATE_CASTS, num_warps=8, num_stages=2)
    block_r = 16
    _mla_combine_kernel[(B, triton.cdiv(rows, block_r))](
        o_part, lse_part, offsets, bad, out, lse, rows, H, s_q, BLOCK_R=block_r, EMULATE=EMULATE_CASTS,
        num_warps=4)
