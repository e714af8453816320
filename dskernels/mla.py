"""MLA absorbed decode over a paged latent cache: the public API.

    q_latent = absorb_query(q_nope, wkv_b)                 [B, s, H, 128] -> [B, s, H, 512]
    cache_seqlens = append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope)
    metadata = get_mla_metadata(cache_seqlens, block_table, num_pages, s_q, H)  # once per decode step
    out, lse = mla_decode(q, cache, block_table, cache_seqlens, softmax_scale(), causal=True,
                          metadata=metadata)                                      # every layer
    o = absorb_output(out, wkv_b)                          [B, s, H, 512] -> [B, s, H, 128]

q = cat([q_latent, q_pe], -1) is [B, s_q, H, 576] bf16; cache [num_pages, 64, 1, 576] bf16;
block_table [B, max_pages] int32; cache_seqlens [B] int32 counts the cached tokens including the
s_q query tokens (append them first). The math is specified in dskernels.reference.mla.

Work is split flash-decoding style: the scheduler cuts every sequence into items of about `quota`
64-token blocks so that all items together fill the GPU about evenly, whatever the mix of lengths;
a batch of one item is finished by the split kernel, and a combine step merges the items of the
other batches by log-sum-exp. The work list depends only on the lengths, the block table and the
head count, so, as FlashMLA's get_mla_metadata, it is computed once per decode step
(`get_mla_metadata`: one CUDA launch, or `schedule`'s torch ops, on the device: no host sync,
CUDA-graph safe) and shared by all layers; mla_decode computes it itself when not given.

Values are checked on the host when validate=True (the default: one device-to-host sync): block
table entries inside the cache, cache_seqlens within what the table covers and >= s_q. With
validate=False (CUDA graphs, production) the kernels check on the device instead: an invalid page is
never read, and every output row of the offending batch becomes NaN.
"""
from typing import NamedTuple

import torch

from dskernels import backend as _backend
from dskernels.checks import check_shape, check_tensor
from dskernels.reference import mla as _ref
from dskernels.reference.mla import (CACHE_DIM, FP8_CACHE_BYTES, KV_LORA_RANK, PAGE_SIZE, ROPE_DIM,
                                     absorb_output, absorb_query, softmax_scale)

MIN_CAPABILITY = (8, 0)
IMPLEMENTED = ("reference", "triton", "cuda")
# The CUDA split kernel is Hopper-only (wgmma, TMA) and reads only the bf16 cache; Triton's runs from
# sm_80 and also reads the FP8 cache. Where CUDA runs, "auto" takes it: on an H100 (2026-11-27) it was
# as fast as Triton or faster on every benchmark shape (1.1x at 16 heads, 2.2x at 128).
CUDA_MIN_CAPABILITY = (9, 0)


def _cuda_unsupported(cache: torch.Tensor) -> str | None:
    if cache.dtype == torch.uint8:
        return "backend='cuda' reads the bf16 cache only; the FP8 cache (uint8, 656 bytes per token) runs on " \
               "backend='triton' or 'reference'"
    if cache.device.type == "cuda" and torch.cuda.get_device_capability(cache.device) < CUDA_MIN_CAPABILITY:
        return "backend='cuda' needs a Hopper GPU (compute capability 9.x) for mla_decode; use 'triton'"
    return None


def _auto_order(cache: torch.Tensor) -> tuple:
    return ("triton",) if _cuda_unsupported(cache) else ("cuda", "triton")


__all__ = ["absorb_query", "absorb_output", "softmax_scale", "append_to_cache", "get_mla_metadata", "mla_decode",
           "schedule", "MlaMetadata"]


class MlaMetadata(NamedTuple):
    """The work list of one decode step (see `schedule`) and the shape it was made for."""
    items: torch.Tensor         # [num_parts + B, 3] int32: (batch, first block, end block); batch -1 = unused
    item_offsets: torch.Tensor  # [B + 1] int32: batch b owns items item_offsets[b] .. item_offsets[b+1]-1
    bad: torch.Tensor           # [B] int32: 1 where the block table or length is invalid (output NaN)
    s_q: int
    num_heads: int


def schedule(cache_seqlens: torch.Tensor, block_table: torch.Tensor, num_pages: int, s_q: int,
             num_parts: int):
    """Split the batch into at most num_parts + B work items of whole 64-token blocks.

    quota = ceil(total blocks / num_parts); a sequence gets round(blocks / quota) items (at least 1)
    of near-equal length. Rounding rather than ceil lets an item hold up to 1.5 x quota but keeps
    uniform batches in whole waves: B = 32, L = 16k, 128 heads gets 2 items of 128 blocks per
    sequence (128 CTAs, one wave on 132 SMs) instead of 3 of 86 (192 CTAs, 1.45 waves).

    Returns items [num_parts + B, 3] int32 (batch, first block, end block; batch -1 for unused
    slots), item_offsets [B + 1] int32 (batch b owns items item_offsets[b]..item_offsets[b+1]-1) and
    bad [B] int32 (1 where the block table or length is invalid: that batch's output becomes NaN).
    """
    B, max_pages = block_table.shape
    dev = cache_seqlens.device
    L = cache_seqlens.long()
    blocks = ((L + PAGE_SIZE - 1) // PAGE_SIZE).clamp(0, max_pages)                     # [B]
    quota = ((blocks.sum() + num_parts - 1) // num_parts).clamp(min=1)
    n = ((blocks + quota // 2) // quota).clamp(min=1)                                  # items per batch
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


def num_parts(device: torch.device, rows: int) -> int:
    """Items to aim for: enough that items x 64-row head blocks fill the SMs about once."""
    if device.type != "cuda":
        return 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, sms // -(-rows // 64))


def _cuda_schedule(cache_seqlens, block_table, num_pages, s_q, parts):
    B, max_pages = block_table.shape
    items = torch.empty(parts + B, 3, dtype=torch.int32, device=block_table.device)
    offsets = torch.empty(B + 1, dtype=torch.int32, device=block_table.device)
    bad = torch.empty(B, dtype=torch.int32, device=block_table.device)
    with _backend.on_device(block_table):
        _backend._C.mla_decode_schedule(cache_seqlens.data_ptr(), block_table.data_ptr(), block_table.stride(0), B,
                                        max_pages, num_pages, s_q, parts, items.data_ptr(), offsets.data_ptr(),
                                        bad.data_ptr(), _backend.stream(block_table))
    return items, offsets, bad


_SCHEDULE = {"reference": schedule, "cuda": _cuda_schedule}


def get_mla_metadata(cache_seqlens, block_table, num_pages: int, s_q: int, num_heads: int, *,
                     backend: str = "auto") -> MlaMetadata:
    """The work list of a decode step, for every mla_decode call (layer) that reads the same
    cache_seqlens [B] int32 and block_table [B, max_pages] int32 with s_q query tokens of num_heads
    heads: one CUDA launch ("cuda", any GPU the extension runs on) or `schedule`'s torch ops
    ("reference"). Computed on the device from the current values: no host sync, CUDA-graph safe.
    Recompute it whenever the lengths or the block table change (every step)."""
    cache_seqlens = _backend.as_tensor("cache_seqlens", cache_seqlens)
    block_table = _backend.as_tensor("block_table", block_table)
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, contiguous=False)
    if block_table.stride(1) != 1:
        raise ValueError(f"block_table must have unit stride along pages, got strides {block_table.stride()}")
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, device=block_table.device)
    check_shape("cache_seqlens", cache_seqlens, (block_table.shape[0],))
    for name, value in (("num_pages", num_pages), ("s_q", s_q), ("num_heads", num_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    name = _backend.resolve(backend, block_table.device, MIN_CAPABILITY, ("reference", "cuda"), ("cuda",))
    parts = num_parts(block_table.device, s_q * num_heads)
    items, offsets, bad = _SCHEDULE[name](cache_seqlens, block_table, num_pages, s_q, parts)
    return MlaMetadata(items, offsets, bad, s_q, num_heads)


def _check_metadata(metadata, B, s_q, H, device):
    if not isinstance(metadata, MlaMetadata):
        raise TypeError(f"metadata must be the MlaMetadata of get_mla_metadata, got {type(metadata).__name__}")
    if (metadata.s_q, metadata.num_heads) != (s_q, H):
        raise ValueError(f"metadata was made for s_q = {metadata.s_q}, num_heads = {metadata.num_heads}; this "
                         f"call has s_q = {s_q}, num_heads = {H}")
    check_tensor("metadata.items", metadata.items, dtypes=(torch.int32,), ndim=2, device=device)
    if metadata.items.shape[1] != 3 or metadata.items.shape[0] < B:
        raise ValueError(f"metadata.items must be [num_parts + B, 3] with B = {B}, got "
                         f"{tuple(metadata.items.shape)}")
    check_tensor("metadata.item_offsets", metadata.item_offsets, dtypes=(torch.int32,), ndim=1, device=device)
    check_shape("metadata.item_offsets", metadata.item_offsets, (B + 1,))
    check_tensor("metadata.bad", metadata.bad, dtypes=(torch.int32,), ndim=1, device=device)
    check_shape("metadata.bad", metadata.bad, (B,))


def _partials(q, items):
    """Per-item partial outputs and log-sum-exps the split pass writes and the combine reads."""
    rows = q.shape[1] * q.shape[2]
    o_part = torch.empty(items.shape[0], rows, KV_LORA_RANK, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(items.shape[0], rows, dtype=torch.float32, device=q.device)
    return o_part, lse_part


def _triton_decode(q, cache, block_table, cache_seqlens, scale, causal, items, offsets, bad, out, lse):
    from dskernels.triton import mla as tm  # imported lazily: triton is optional
    tm.mla_decode(q, cache, block_table, cache_seqlens, scale, causal,
                  (items, offsets, bad, *_partials(q, items)), out, lse)


def _cuda_decode(q, cache, block_table, cache_seqlens, scale, causal, items, offsets, bad, out, lse):
    B, s_q, H, _ = q.shape
    o_part, lse_part = _partials(q, items)
    C, st = _backend._C, _backend.stream(q)
    # a batch the scheduler flagged (bad) comes back NaN: the device-side check, no host sync. Batches
    # of one item are finished by the split pass, the others by the combine.
    C.mla_decode_split(q.data_ptr(), cache.data_ptr(), cache.shape[0], cache.stride(0), block_table.data_ptr(),
                       block_table.stride(0), cache_seqlens.data_ptr(), items.data_ptr(), offsets.data_ptr(),
                       bad.data_ptr(), items.shape[0], B, s_q, H, scale, causal, o_part.data_ptr(),
                       lse_part.data_ptr(), out.data_ptr(), lse.data_ptr(), st)
    C.mla_decode_combine(o_part.data_ptr(), lse_part.data_ptr(), offsets.data_ptr(), bad.data_ptr(), B, s_q, H,
                         out.data_ptr(), lse.data_ptr(), st)


def _reference_decode(q, cache, block_table, cache_seqlens, scale, causal, items, offsets, bad, out, lse):
    o, l = _ref.mla_decode(q, cache, block_table, cache_seqlens.cpu(), scale, causal)
    out.copy_(o)
    lse.copy_(l)


_DECODE = {"reference": _reference_decode, "triton": _triton_decode, "cuda": _cuda_decode}


@torch.library.custom_op("dskernels::mla_decode", mutates_args=())
def _mla_decode_op(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                   cache_seqlens: torch.Tensor, items: torch.Tensor, item_offsets: torch.Tensor,
                   bad: torch.Tensor, softmax_scale: float, causal: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, s_q, H, _ = q.shape
    out = _backend.empty((B, s_q, H, KV_LORA_RANK), q.dtype, q.device)
    lse = _backend.empty((B, H, s_q), torch.float32, q.device)
    with _backend.on_device(q):
        _DECODE[backend](q, cache.view(cache.shape[0], PAGE_SIZE, cache.shape[-1]), block_table,
                         cache_seqlens, softmax_scale, causal, items, item_offsets, bad, out, lse)
    return out, lse


@_mla_decode_op.register_fake
def _(q, cache, block_table, cache_seqlens, items, item_offsets, bad, softmax_scale, causal, backend):
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
               metadata: MlaMetadata | None = None, validate: bool = True, backend: str = "auto"):
    """Absorbed MLA attention of q [B, s_q, H, 576] bf16 over the paged latent cache (bf16, or the
    FP8 cache that append_to_cache fills when cache is uint8 [num_pages, 64, 1, 656]).

    Returns out [B, s_q, H, 512] bf16 (softmax-weighted latents: apply absorb_output) and
    lse [B, H, s_q] fp32 (natural-log sum-exp of the scaled scores). causal masks later query tokens
    among the s_q (speculative decoding). metadata: get_mla_metadata of this step's cache_seqlens
    and block_table (computed here when None). See the module docstring for layouts and validate.
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
    name = _backend.resolve(backend, q.device, MIN_CAPABILITY, IMPLEMENTED, _auto_order(cache))
    if name == "cuda" and _cuda_unsupported(cache):
        raise ValueError(_cuda_unsupported(cache))
    if validate or name == "reference":
        _validate_values(cache, block_table, cache_seqlens, s_q)
    if metadata is None:
        metadata = get_mla_metadata(cache_seqlens, block_table, cache.shape[0], s_q, H)
    else:
        _check_metadata(metadata, B, s_q, H, q.device)
    return _mla_decode_op(q, cache, block_table, cache_seqlens, metadata.items, metadata.item_offsets,
                          metadata.bad, float(softmax_scale), causal, name)


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
