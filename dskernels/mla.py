"""MLA absorbed decode over a paged latent cache: the public API.

    q_latent = absorb_query(q_nope, wkv_b)                 [B, s, H, 128] -> [B, s, H, 512]
    cache_seqlens = append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope)
    out, lse = mla_decode(q, cache, block_table, cache_seqlens, softmax_scale(), causal=True)
    o = absorb_output(out, wkv_b)                          [B, s, H, 512] -> [B, s, H, 128]

q = cat([q_latent, q_pe], -1) is [B, s_q, H, 576] bf16; cache [num_pages, 64, 1, 576] bf16;
block_table [B, max_pages] int32; cache_seqlens [B] int32 counts the cached tokens including the
s_q query tokens (append them first). The math is specified in dskernels.reference.mla.

Work is split flash-decoding style: `schedule` cuts every sequence into items of at most `quota`
64-token blocks so that all items together fill the GPU about evenly, whatever the mix of lengths,
and a combine step merges each batch's items by log-sum-exp. The schedule is computed with torch
ops on the device (no host sync, CUDA-graph safe) into a work list of fixed size.

Values are checked on the host when validate=True (the default: one device-to-host sync): block
table entries inside the cache, cache_seqlens within what the table covers and >= s_q. With
validate=False (CUDA graphs, production) the kernels check on the device instead: an invalid page is
never read, and every output row of the offending batch becomes NaN.
"""
import torch

from dskernels import backend as _backend
from dskernels.checks import check_shape, check_tensor
from dskernels.reference import mla as _ref
from dskernels.reference.mla import (CACHE_DIM, FP8_CACHE_BYTES, KV_LORA_RANK, PAGE_SIZE, ROPE_DIM,
                                     absorb_output, absorb_query, softmax_scale)

MIN_CAPABILITY = (8, 0)
IMPLEMENTED = ("reference", "triton", "cuda")
# CUDA reads only the bf16 cache. Under "auto" it runs wherever it was measured faster (H100,
# 2026-11-23): 1.1-1.4x Triton from 32 query rows (heads x s_q) per sequence up; Triton is 5-8 %
# faster with 16 rows (B=128, L=8k, H=16: 527 vs 572 us) and is the only kernel for the FP8 cache.
CUDA_MIN_ROWS = 32


def _auto_order(q: torch.Tensor, cache: torch.Tensor) -> tuple:
    if cache.dtype == torch.uint8:
        return ("triton",)
    if q.shape[1] * q.shape[2] < CUDA_MIN_ROWS:
        return ("triton", "cuda")
    return ("cuda", "triton")

__all__ = ["absorb_query", "absorb_output", "softmax_scale", "append_to_cache", "mla_decode", "schedule"]


def schedule(cache_seqlens: torch.Tensor, block_table: torch.Tensor, num_pages: int, s_q: int,
             num_parts: int):
    """Split the batch into at most num_parts + B work items of whole 64-token blocks.

    Returns items [num_parts + B, 3] int32 (batch, first block, end block; batch -1 for unused
    slots), item_offsets [B + 1] int32 (batch b owns items item_offsets[b]..item_offsets[b+1]-1) and
    bad [B] int32 (1 where the block table or length is invalid: that batch's output becomes NaN).
    """
    B, max_pages = block_table.shape
    dev = cache_seqlens.device
    L = cache_seqlens.long()
    blocks = ((L + PAGE_SIZE - 1) // PAGE_SIZE).clamp(0, max_pages)                     # [B]
    quota = ((blocks.sum() + num_parts - 1) // num_parts).clamp(min=1)
    n = ((blocks + quota - 1) // quota).clamp(min=1)                                    # items per batch
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), n.cumsum(0)])   # [B + 1]
    slot = torch.arange(num_parts + B, device=dev)
    b = torch.searchsorted(offsets[1:], slot, right=True)                              # batch of a slot
    used = b < B
    b = b.clamp(max=B - 1)
    chunk = (blocks[b] + n[b] - 1) // n[b]
    j = slot - offsets[b]
    start = (j * chunk).clamp(max=blocks[b])
    end = ((j + 1) * chunk).clamp(max=blocks[b])
    items = torch.stack([torch.where(used, b, -1), torch.where(used, start, 0), torch.where(used, end, 0)], 1)
    needed = torch.arange(max_pages, device=dev)[None, :] < blocks[:, None]
    bad_page = ((block_table < 0) | (block_table >= num_pages)) & needed
    bad = bad_page.any(dim=1) | (L > max_pages * PAGE_SIZE) | (L < s_q)
    return items.int(), offsets.int(), bad.int()


def _num_parts(device: torch.device, head_blocks: int) -> int:
    """Items to aim for: enough that items x head blocks fill the SMs about once."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, sms // head_blocks)


def _triton_decode(q, cache, block_table, cache_seqlens, scale, causal, out, lse):
    from dskernels.triton import mla as tm  # imported lazily: triton is optional
    work = _work(q, cache, block_table, cache_seqlens, tm.head_block(q.shape[1] * q.shape[2]))
    tm.mla_decode(q, cache, block_table, cache_seqlens, scale, causal, work, out, lse)


def _work(q, cache, block_table, cache_seqlens, head_rows):
    """The scheduler's work list for this call and the partial-result buffers it needs."""
    B, s_q, H, _ = q.shape
    rows = s_q * H
    items, offsets, bad = schedule(cache_seqlens, block_table, cache.shape[0], s_q,
                                   _num_parts(q.device, -(-rows // head_rows)))
    o_part = torch.empty(items.shape[0], rows, KV_LORA_RANK, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(items.shape[0], rows, dtype=torch.float32, device=q.device)
    return items, offsets, bad, o_part, lse_part


def _cuda_decode(q, cache, block_table, cache_seqlens, scale, causal, out, lse):
    B, s_q, H, _ = q.shape
    items, offsets, bad, o_part, lse_part = _work(q, cache, block_table, cache_seqlens, 64)
    C, st = _backend._C, _backend.stream(q)
    C.mla_decode_split(q.data_ptr(), cache.data_ptr(), cache.shape[0], cache.stride(0), block_table.data_ptr(),
                       block_table.stride(0), cache_seqlens.data_ptr(), items.data_ptr(), items.shape[0], B, s_q,
                       H, scale, causal, o_part.data_ptr(), lse_part.data_ptr(), st)
    C.mla_decode_combine(o_part.data_ptr(), lse_part.data_ptr(), offsets.data_ptr(), B, s_q, H, out.data_ptr(),
                         lse.data_ptr(), st)
    # the device-side check: a batch the scheduler flagged comes back NaN (no host sync)
    flagged = bad.bool()
    out.masked_fill_(flagged.view(B, 1, 1, 1), float("nan"))
    lse.masked_fill_(flagged.view(B, 1, 1), float("nan"))


def _reference_decode(q, cache, block_table, cache_seqlens, scale, causal, out, lse):
    o, l = _ref.mla_decode(q, cache, block_table, cache_seqlens.cpu(), scale, causal)
    out.copy_(o)
    lse.copy_(l)


_DECODE = {"reference": _reference_decode, "triton": _triton_decode, "cuda": _cuda_decode}


@torch.library.custom_op("dskernels::mla_decode", mutates_args=())
def _mla_decode_op(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                   cache_seqlens: torch.Tensor, softmax_scale: float, causal: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, s_q, H, _ = q.shape
    out = _backend.empty((B, s_q, H, KV_LORA_RANK), q.dtype, q.device)
    lse = _backend.empty((B, H, s_q), torch.float32, q.device)
    with _backend.on_device(q):
        _DECODE[backend](q, cache.view(cache.shape[0], PAGE_SIZE, cache.shape[-1]), block_table,
                         cache_seqlens, softmax_scale, causal, out, lse)
    return out, lse


@_mla_decode_op.register_fake
def _(q, cache, block_table, cache_seqlens, softmax_scale, causal, backend):
    B, s_q, H, _ = q.shape
    return (q.new_empty((B, s_q, H, KV_LORA_RANK)), q.new_empty((B, H, s_q), dtype=torch.float32))


def _check_cache(cache, block_table, cache_seqlens, B):
    check_tensor("cache", cache, dtypes=(torch.bfloat16, torch.uint8), ndim=4)
    width = CACHE_DIM if cache.dtype == torch.bfloat16 else FP8_CACHE_BYTES
    if tuple(cache.shape[1:]) != (PAGE_SIZE, 1, width):
        raise ValueError(f"cache must be [num_pages, {PAGE_SIZE}, 1, {CACHE_DIM}] bf16 (pages of {PAGE_SIZE} tokens "
                         f"of {KV_LORA_RANK} latent + {ROPE_DIM} RoPE dims) or [num_pages, {PAGE_SIZE}, 1, "
                         f"{FP8_CACHE_BYTES}] uint8 (the FP8 cache), got {tuple(cache.shape)} {cache.dtype}")
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, device=cache.device)
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, device=cache.device)
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must have one row per sequence (B = {B}), got {tuple(block_table.shape)}")
    check_shape("cache_seqlens", cache_seqlens, (B,))


def _validate_values(cache, block_table, cache_seqlens, s_q):
    """Host check of the index values (one device-to-host copy)."""
    L = cache_seqlens.cpu().long()
    bt = block_table.cpu()
    max_pages = bt.shape[1]
    if (L > max_pages * PAGE_SIZE).any():
        b = int((L > max_pages * PAGE_SIZE).nonzero()[0])
        raise ValueError(f"cache_seqlens[{b}] = {int(L[b])} is more than block_table covers "
                         f"({max_pages} pages x {PAGE_SIZE} tokens)")
    if (L < s_q).any():
        b = int((L < s_q).nonzero()[0])
        raise ValueError(f"cache_seqlens[{b}] = {int(L[b])} is less than s_q = {s_q}: the query tokens must "
                         f"be in the cache (append them first)")
    needed = torch.arange(max_pages)[None, :] < ((L + PAGE_SIZE - 1) // PAGE_SIZE)[:, None]
    bad = ((bt < 0) | (bt >= cache.shape[0])) & needed
    if bad.any():
        b, p = bad.nonzero()[0].tolist()
        raise ValueError(f"block_table[{b}, {p}] = {int(bt[b, p])} points outside the cache "
                         f"({cache.shape[0]} pages)")


def mla_decode(q, cache, block_table, cache_seqlens, softmax_scale: float, causal: bool = True, *,
               validate: bool = True, backend: str = "auto"):
    """Absorbed MLA attention of q [B, s_q, H, 576] bf16 over the paged latent cache (bf16, or the
    FP8 cache that append_to_cache fills when cache is uint8 [num_pages, 64, 1, 656]).

    Returns out [B, s_q, H, 512] bf16 (softmax-weighted latents: apply absorb_output) and
    lse [B, H, s_q] fp32 (natural-log sum-exp of the scaled scores). causal masks later query tokens
    among the s_q (speculative decoding). See the module docstring for layouts and validate.
    """
    q = _backend.as_tensor("q", q)
    cache, block_table = _backend.as_tensor("cache", cache), _backend.as_tensor("block_table", block_table)
    cache_seqlens = _backend.as_tensor("cache_seqlens", cache_seqlens)
    check_tensor("q", q, dtypes=(torch.bfloat16,), ndim=4)
    B, s_q, H, D = q.shape
    if D != CACHE_DIM:
        raise ValueError(f"q must be [B, s_q, H, {CACHE_DIM}] ({KV_LORA_RANK} absorbed-latent + {ROPE_DIM} "
                         f"RoPE dims), got {tuple(q.shape)}")
    _check_cache(cache, block_table, cache_seqlens, B)
    if cache.device != q.device:
        raise ValueError(f"cache must be on {q.device} (like q), got {cache.device}")
    name = _backend.resolve(backend, q.device, MIN_CAPABILITY, IMPLEMENTED, _auto_order(q, cache))
    if name == "cuda" and cache.dtype == torch.uint8:
        raise ValueError("backend='cuda' reads the bf16 cache only; the FP8 cache (uint8, 656 bytes per token) "
                         "runs on backend='triton' or 'reference'")
    if validate or name == "reference":
        _validate_values(cache, block_table, cache_seqlens, s_q)
    return _mla_decode_op(q, cache, block_table, cache_seqlens, float(softmax_scale), causal, name)


def append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope, *, validate: bool = True,
                    backend: str = "auto"):
    """Write the new tokens' latents kv_latent [B, s, 512] and RoPE keys k_rope [B, s, 64] (bf16)
    at positions cache_seqlens[b] .. + s - 1, in place: prefill (s = prompt length) and decode (s = 1
    or the speculative tokens). A uint8 cache is the FP8 cache: each token's latent is quantized
    per 128 dims (dskernels.reference.mla.quantize_cache_rows; torch ops on every backend).
    Returns cache_seqlens + s."""
    kv_latent, k_rope = _backend.as_tensor("kv_latent", kv_latent), _backend.as_tensor("k_rope", k_rope)
    check_tensor("kv_latent", kv_latent, dtypes=(torch.bfloat16,), ndim=3)
    B, s, _ = kv_latent.shape
    check_shape("kv_latent", kv_latent, (B, s, KV_LORA_RANK))
    check_tensor("k_rope", k_rope, dtypes=(torch.bfloat16,), ndim=3, device=kv_latent.device)
    check_shape("k_rope", k_rope, (B, s, ROPE_DIM))
    _check_cache(cache, block_table, cache_seqlens, B)
    name = _backend.resolve(backend, cache.device, MIN_CAPABILITY, ("reference", "triton"))
    if validate or name == "reference":
        _validate_values(cache, block_table, cache_seqlens + s, s)
    with _backend.on_device(cache):
        if name == "triton" and cache.dtype == torch.bfloat16:
            from dskernels.triton import mla as tm
            tm.append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope)
            return cache_seqlens + s
        return _ref.append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope)
