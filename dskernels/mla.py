"""MLA absorbed decode over a paged latent cache: the public API.

    q_latent = absorb_query(q_nope, wkv_b)                 [B, s, H, 128] -> [B, s, H, 512]
    cache_seqlens = append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope)
    md = get_mla_metadata(cache_seqlens, block_table, num_pages, s_q, H)   # once per decode step
    out, lse = mla_decode(q, cache, block_table, cache_seqlens, softmax_scale(), metadata=md)  # every layer
    md.check()                                             # when convenient: raises if any call went wrong
    o = absorb_output(out, wkv_b)                          [B, s, H, 512] -> [B, s, H, 128]

q = cat([q_latent, q_pe], -1) is [B, s_q, H, 576] bf16; cache [num_pages, 64, 1, 576] bf16;
block_table [B, max_pages] int32; cache_seqlens [B] int32 counts the cached tokens including the
s_q query tokens (append them first). The math is specified in dskernels.reference.mla.

Work is split flash-decoding style: the work list cuts every sequence into items of about `quota`
64-token blocks so that all items together fill the GPU about evenly, whatever the mix of lengths;
a batch of one item is finished by the split kernel, and a combine step merges the items of the
other batches by log-sum-exp. The work list depends only on the lengths, the block table and the
head count, so, as FlashMLA's get_mla_metadata, it is made once per decode step and shared by all
layers (mla_decode makes it itself when not given one: one more small launch).

The metadata contract. The work list records what it was made from: the lengths, a fingerprint of
each batch's block table (dskernels.reference.mla.table_hash), the page count, s_q and the head
count. Every decode call checks its own inputs against that record: the shapes and counts on the
host (a ValueError at once), the lengths and block tables on the device (no sync: a batch that differs
comes back NaN and the metadata's error flag is set). A batch whose block table or length is invalid
(pages outside the cache, a length past the table or below s_q) is never read out of bounds and also
comes back NaN with the flag set. `md.check()` reads the flag (one sync) and raises a ValueError that
says what went wrong; `get_mla_metadata(..., validate=True)` instead checks the values on the host
first and raises naming the entry. Nothing else syncs.
"""
import functools
from typing import NamedTuple

import torch

from dskernels import backend as _backend
from dskernels.checks import check_bool, check_int, check_real, check_shape, check_tensor
from dskernels.reference import mla as _ref
from dskernels.reference.mla import (CACHE_DIM, ERROR_INVALID, ERROR_MISMATCH, FP8_CACHE_BYTES, KV_LORA_RANK,
                                     PAGE_SIZE, QK_NOPE_DIM, ROPE_DIM, V_HEAD_DIM)

__all__ = ["absorb_query", "absorb_output", "softmax_scale", "append_to_cache", "get_mla_metadata", "mla_decode",
           "MlaMetadata"]

FLOATS = (torch.bfloat16, torch.float16, torch.float32)


class MlaMetadata(NamedTuple):
    """The work list of one decode step and the record of what it was made from (the module docstring
    has the contract). Tensors are int32 on the lengths' device."""
    items: torch.Tensor            # [num_parts + B, 3]: (batch, first block, end block); batch -1 = unused
    item_offsets: torch.Tensor     # [B + 1]: batch b owns items item_offsets[b] .. item_offsets[b+1]-1
    bad: torch.Tensor              # [B]: 1 where the block table or length was invalid (output NaN)
    cache_seqlens: torch.Tensor    # [B]: the lengths it was made from (a copy)
    table_hash: torch.Tensor       # [B]: the fingerprint of each batch's block table
    error: torch.Tensor            # [2]: (flags, first batch concerned); set by get_mla_metadata and decodes
    num_pages: int
    max_pages: int
    s_q: int
    num_heads: int

    def check(self):
        """Raise ValueError if the lengths or block tables were invalid, or if a decode call with this
        metadata had lengths or block tables other than those it was made from. Reads the error flag:
        one device-to-host sync, so call it after a step (or while debugging), not per layer."""
        flags, batch = self.error.tolist()
        problems = []
        if flags & ERROR_INVALID:
            problems.append("a batch's block_table or cache_seqlens was invalid when get_mla_metadata ran (a "
                            f"page outside the cache's {self.num_pages} pages, a length past what the "
                            f"{self.max_pages} block-table columns cover, or one below s_q = {self.s_q}); "
                            "get_mla_metadata(..., validate=True) names the entry")
        if flags & ERROR_MISMATCH:
            problems.append("mla_decode was called with cache_seqlens or a block_table other than those "
                            "get_mla_metadata made this metadata from (make it again after every change)")
        if problems:
            raise ValueError(f"MLA decode: {'; and '.join(problems)}. Those batches' outputs are NaN; the first "
                             f"is batch {batch}.")


# ---------------------------------------------------------------------------------------------
# Plain helpers around the specification, with their arguments checked.

def absorb_query(q_nope, wkv_b):
    """q_nope [B, s, H, 128] -> q_latent [B, s, H, 512] = q_nope @ W_UK per head. wkv_b is
    DeepSeek-V3's kv_b_proj weight [H * 256, 512] (W_UK rows then W_UV rows per head), same dtype and
    device as q_nope (bf16, fp16 or fp32)."""
    return _ref.absorb_query(*_checked_absorption("q_nope", q_nope, QK_NOPE_DIM, wkv_b))


def absorb_output(o_latent, wkv_b):
    """o_latent [B, s, H, 512] (mla_decode's out) -> [B, s, H, 128] = o_latent @ W_UV^T per head;
    wkv_b as for absorb_query, same dtype and device as o_latent."""
    return _ref.absorb_output(*_checked_absorption("o_latent", o_latent, KV_LORA_RANK, wkv_b))


def _checked_absorption(name, x, dim, wkv_b):
    """x [B, s, H, dim] and wkv_b [H * 256, 512] of x's dtype and device, as tensors."""
    x, wkv_b = _backend.as_tensor(name, x), _backend.as_tensor("wkv_b", wkv_b)
    check_tensor(name, x, dtypes=FLOATS, ndim=4, contiguous=False)
    if x.shape[-1] != dim:
        raise ValueError(f"{name} must be [B, s, H, {dim}], got {tuple(x.shape)}")
    check_tensor("wkv_b", wkv_b, dtypes=(x.dtype,), ndim=2, device=x.device)
    H = x.shape[2]
    if tuple(wkv_b.shape) != (H * (QK_NOPE_DIM + V_HEAD_DIM), KV_LORA_RANK):
        raise ValueError(f"wkv_b must be [H * {QK_NOPE_DIM + V_HEAD_DIM}, {KV_LORA_RANK}] = "
                         f"[{H * (QK_NOPE_DIM + V_HEAD_DIM)}, {KV_LORA_RANK}] for H = {H} heads, got "
                         f"{tuple(wkv_b.shape)}")
    return x, wkv_b


def softmax_scale(qk_head_dim: int = _ref.QK_HEAD_DIM, rope_factor: float = 1.0, mscale: float = 1.0) -> float:
    """DeepSeek-V3's attention scale: qk_head_dim ** -0.5 (192: 128 + 64 RoPE dims), times YaRN's
    mscale^2 = (0.1 * mscale * ln(rope_factor) + 1)^2 when the context is stretched (rope_factor > 1,
    40 in DeepSeek-V3)."""
    check_int("qk_head_dim", qk_head_dim, minimum=1)
    check_real("rope_factor", rope_factor, positive=True)
    check_real("mscale", mscale)
    return _ref.softmax_scale(int(qk_head_dim), float(rope_factor), float(mscale))


# ---------------------------------------------------------------------------------------------
# The work list.

def num_parts(device: torch.device, rows: int) -> int:
    """Items to aim for: enough that items x 64-row head blocks fill the SMs about once."""
    if device.type != "cuda":
        return 4
    return max(1, _sm_count(device.index) // -(-rows // 64))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _metadata_sizes(B, parts):
    """The int32 counts of the work list's six arrays, in their order (see _metadata_tensors)."""
    return [3 * (parts + B), B + 1, B, B, B, 2]


def _launch_schedule(cache_seqlens, block_table, num_pages, s_q, parts, md_ptrs):
    """The work list's one launch, on the current device, into the six arrays at md_ptrs."""
    B, max_pages = block_table.shape
    _backend._C.mla_decode_schedule(cache_seqlens.data_ptr(), block_table.data_ptr(), block_table.stride(0), B,
                                    max_pages, num_pages, s_q, parts, *md_ptrs, _backend.stream(block_table))


def _metadata_tensors(B, parts, device, shared=False):
    """items [parts + B, 3], item_offsets [B + 1], bad, cache_seqlens, table_hash [B] and error [2], int32.
    shared: views of one allocation (one allocator call and one split instead of six: host time), for
    eager calls; a custom op's outputs may not alias each other."""
    sizes = _metadata_sizes(B, parts)
    if not shared:
        return (_backend.empty((parts + B, 3), torch.int32, device),
                *(_backend.empty((n,), torch.int32, device) for n in sizes[1:]))
    items, *rest = _backend.empty((sum(sizes),), torch.int32, device).split(sizes)
    return (items.view(parts + B, 3), *rest)


def _cuda_schedule(cache_seqlens, block_table, num_pages, s_q, parts, shared):
    out = _metadata_tensors(block_table.shape[0], parts, block_table.device, shared)
    with _backend.on_device(block_table):
        _launch_schedule(cache_seqlens, block_table, num_pages, s_q, parts, [t.data_ptr() for t in out])
    return out


def _reference_schedule(cache_seqlens, block_table, num_pages, s_q, parts, shared):
    out = _metadata_tensors(block_table.shape[0], parts, block_table.device, shared)
    for dst, src in zip(out, _ref.schedule(cache_seqlens, block_table, num_pages, s_q, parts)):
        dst.copy_(src)
    return out


_SCHEDULE = {"reference": _reference_schedule, "cuda": _cuda_schedule}


def _schedule(cache_seqlens, block_table, num_pages, s_q, parts, backend, shared=False):
    return _SCHEDULE[backend](cache_seqlens, block_table, num_pages, s_q, parts, shared)


# torch.library ops for torch.compile, export and fake tensors; plain eager calls skip the dispatcher
# (backend.eager) and run the same implementations directly.
@torch.library.custom_op("dskernels::get_mla_metadata", mutates_args=())
def _metadata_op(cache_seqlens: torch.Tensor, block_table: torch.Tensor, num_pages: int, s_q: int, parts: int,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor]:
    return _schedule(cache_seqlens, block_table, num_pages, s_q, parts, backend)


@_metadata_op.register_fake
def _(cache_seqlens, block_table, num_pages, s_q, parts, backend):
    return _metadata_tensors(block_table.shape[0], parts, block_table.device)


def _check_lengths_and_table(cache_seqlens, block_table):
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, contiguous=False)
    if block_table.stride(1) != 1:
        raise ValueError(f"block_table must have unit stride along pages, got strides {block_table.stride()}")
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, device=block_table.device)
    check_shape("cache_seqlens", cache_seqlens, (block_table.shape[0],))


def get_mla_metadata(cache_seqlens, block_table, num_pages: int, s_q: int, num_heads: int, *,
                     validate: bool = False, backend: str = "auto") -> MlaMetadata:
    """The work list of a decode step for every mla_decode call (layer) that reads the same
    cache_seqlens [B] int32 and block_table [B, max_pages] int32 (unit stride along pages) with s_q
    query tokens of num_heads heads, over a cache of num_pages pages: one CUDA launch ("cuda", sm_90)
    or the specification's torch ops ("reference"), on the device, no host sync, CUDA-graph safe. Make
    it again whenever the lengths or the block table change (every step).

    validate=True first checks the values on the host (one sync) and raises ValueError naming the first
    invalid entry; without it an invalid batch comes back NaN and md.check() raises."""
    cache_seqlens = _backend.as_tensor("cache_seqlens", cache_seqlens)
    block_table = _backend.as_tensor("block_table", block_table)
    _check_lengths_and_table(cache_seqlens, block_table)
    num_pages = check_int("num_pages", num_pages, minimum=1)
    s_q = check_int("s_q", s_q, minimum=1)
    num_heads = check_int("num_heads", num_heads, minimum=1)
    check_bool("validate", validate)
    name = _backend.resolve("get_mla_metadata", backend, block_table.device)
    if validate:
        _validate_values(num_pages, block_table, cache_seqlens, s_q)
    return _metadata(cache_seqlens, block_table, num_pages, s_q, num_heads, name)


def _metadata(cache_seqlens, block_table, num_pages, s_q, num_heads, backend):
    """get_mla_metadata's work once its arguments are checked (the backend resolved)."""
    parts = num_parts(block_table.device, s_q * num_heads)
    if _backend.eager(cache_seqlens, block_table):
        tensors = _schedule(cache_seqlens, block_table, num_pages, s_q, parts, backend, shared=True)
    else:
        tensors = _metadata_op(cache_seqlens, block_table, num_pages, s_q, parts, backend)
    return MlaMetadata(*tensors, num_pages=num_pages, max_pages=block_table.shape[1], s_q=s_q, num_heads=num_heads)


def _validate_values(num_pages, block_table, cache_seqlens, s_q):
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
    bad = ((bt < 0) | (bt >= num_pages)) & needed
    if bad.any():
        b, p = bad.nonzero()[0].tolist()
        raise ValueError(f"block_table[{b}, {p}] = {int(bt[b, p])} points outside the cache ({num_pages} pages)")


# ---------------------------------------------------------------------------------------------
# The decode.

def _partials(q, items):
    """Per-item partial outputs and log-sum-exps the split pass writes and the combine reads."""
    rows = q.shape[1] * q.shape[2]
    return (_backend.empty((items.shape[0], rows, KV_LORA_RANK), torch.float32, q.device),
            _backend.empty((items.shape[0], rows), torch.float32, q.device))


def _triton_decode(q, cache, block_table, cache_seqlens, scale, causal, md, out, lse):
    from dskernels.triton import mla as tm  # imported lazily: triton is optional
    tm.mla_decode(q, cache, block_table, cache_seqlens, scale, causal, md, _partials(q, md[0]), out, lse)


def _workspace(q, n_items, ints=0):
    """One fp32 allocation for the split pass's partial outputs [n_items, rows, 512] and log-sum-exps
    [n_items, rows] and, after them, `ints` int32 words (a work list made on the fly): the tensor that owns
    it and the three regions' addresses (the partial outputs at the allocation's 16-byte aligned start)."""
    rows = q.shape[1] * q.shape[2]
    n_o, n_l = n_items * rows * KV_LORA_RANK, n_items * rows
    buf = _backend.empty((n_o + n_l + ints,), torch.float32, q.device)
    p = buf.data_ptr()
    return buf, p, p + 4 * n_o, p + 4 * (n_o + n_l)


def _launch_decode(q, cache, block_table, cache_seqlens, scale, causal, n_items, md_ptrs, o_part, lse_part, out, lse):
    """The split and combine launches on the current device; md_ptrs: the addresses of the work list's
    items, item_offsets, bad, cache_seqlens, table_hash and error."""
    items, offsets, bad, made_seqlens, table_hash, error = md_ptrs
    B, s_q, H, _ = q.shape
    C, st = _backend._C, _backend.stream(q)
    # Batches the scheduler flagged (bad) and batches whose inputs differ from the record come back NaN:
    # the device-side checks, no host sync. Single-item batches are finished by the split pass, the
    # others by the combine.
    C.mla_decode_split(q.data_ptr(), cache.data_ptr(), cache.shape[0], cache.stride(0), block_table.data_ptr(),
                       block_table.stride(0), block_table.shape[1], cache_seqlens.data_ptr(), items, offsets, bad,
                       made_seqlens, table_hash, error, n_items, B, s_q, H, scale, causal, o_part, lse_part,
                       out.data_ptr(), lse.data_ptr(), st)
    C.mla_decode_combine(o_part, lse_part, offsets, bad, B, s_q, H, out.data_ptr(), lse.data_ptr(), st)


def _cuda_decode(q, cache, block_table, cache_seqlens, scale, causal, md, out, lse):
    ws, o_part, lse_part, _ = _workspace(q, md[0].shape[0])
    _launch_decode(q, cache, block_table, cache_seqlens, scale, causal, md[0].shape[0], [t.data_ptr() for t in md],
                   o_part, lse_part, out, lse)


def _cuda_decode_default(q, cache, block_table, cache_seqlens, scale, causal):
    """mla_decode without metadata on the CUDA backend in plain eager mode: the work list is made into
    the allocation of the partial outputs (no tensors of its own), so the call costs one launch more than
    a call with metadata and no allocation more."""
    B, s_q, H, _ = q.shape
    parts = num_parts(q.device, s_q * H)
    n_items = parts + B
    sizes = _metadata_sizes(B, parts)
    ws, o_part, lse_part, p = _workspace(q, n_items, sum(sizes))
    md_ptrs = []
    for n in sizes:
        md_ptrs.append(p)
        p += 4 * n
    out = _backend.empty((B, s_q, H, KV_LORA_RANK), q.dtype, q.device)
    lse = _backend.empty((B, H, s_q), torch.float32, q.device)
    with _backend.on_device(q):
        _launch_schedule(cache_seqlens, block_table, cache.shape[0], s_q, parts, md_ptrs)
        _launch_decode(q, cache, block_table, cache_seqlens, scale, causal, n_items, md_ptrs, o_part, lse_part, out,
                       lse)
    return out, lse


def _reference_decode(q, cache, block_table, cache_seqlens, scale, causal, md, out, lse):
    """The specification's attention, independent of the work list, with the same match check."""
    _, _, bad, made_seqlens, table_hash, error = md
    mismatch = _ref.mismatched(cache_seqlens, block_table, made_seqlens, table_hash)
    first = torch.where(mismatch, torch.arange(len(mismatch), device=mismatch.device), 2**31 - 1).min()
    error[0] |= mismatch.any().int() * ERROR_MISMATCH
    error[1] = torch.minimum(error[1], first.int())
    cache = cache.view(cache.shape[0], PAGE_SIZE, cache.shape[-1])
    o, l = _ref.mla_decode(q, cache, block_table, cache_seqlens.cpu(), scale, causal,
                           skip=((bad != 0) | mismatch).cpu())
    out.copy_(o)
    lse.copy_(l)


_DECODE = {"reference": _reference_decode, "triton": _triton_decode, "cuda": _cuda_decode}


def _decode(q, cache, block_table, cache_seqlens, items, item_offsets, bad, made_seqlens, table_hash, error,
            softmax_scale, causal, backend):
    B, s_q, H, _ = q.shape
    out = _backend.empty((B, s_q, H, KV_LORA_RANK), q.dtype, q.device)
    lse = _backend.empty((B, H, s_q), torch.float32, q.device)
    md = (items, item_offsets, bad, made_seqlens, table_hash, error)
    with _backend.on_device(q):
        _DECODE[backend](q, cache, block_table, cache_seqlens, softmax_scale, causal, md, out, lse)
    return out, lse


@torch.library.custom_op("dskernels::mla_decode", mutates_args=("error",))
def _mla_decode_op(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                   items: torch.Tensor, item_offsets: torch.Tensor, bad: torch.Tensor, made_seqlens: torch.Tensor,
                   table_hash: torch.Tensor, error: torch.Tensor, softmax_scale: float, causal: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _decode(q, cache, block_table, cache_seqlens, items, item_offsets, bad, made_seqlens, table_hash, error,
                   softmax_scale, causal, backend)


@_mla_decode_op.register_fake
def _(q, cache, block_table, cache_seqlens, items, item_offsets, bad, made_seqlens, table_hash, error,
      softmax_scale, causal, backend):
    B, s_q, H, _ = q.shape
    return q.new_empty((B, s_q, H, KV_LORA_RANK)), q.new_empty((B, H, s_q), dtype=torch.float32)


def _check_cache(cache, block_table, cache_seqlens, B):
    check_tensor("cache", cache, dtypes=(torch.bfloat16, torch.uint8), ndim=4)
    width = CACHE_DIM if cache.dtype == torch.bfloat16 else FP8_CACHE_BYTES
    if tuple(cache.shape[1:]) != (PAGE_SIZE, 1, width):
        raise ValueError(f"cache must be [num_pages, {PAGE_SIZE}, 1, {CACHE_DIM}] bf16 (pages of {PAGE_SIZE} tokens "
                         f"of {KV_LORA_RANK} latent + {ROPE_DIM} RoPE dims) or [num_pages, {PAGE_SIZE}, 1, "
                         f"{FP8_CACHE_BYTES}] uint8 (the FP8 cache), got {tuple(cache.shape)} {cache.dtype}")
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, device=cache.device, contiguous=False)
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must have one row per sequence (B = {B}), got {tuple(block_table.shape)}")
    _check_lengths_and_table(cache_seqlens, block_table)


def _check_metadata(md, B, max_pages, num_pages, s_q, H, device):
    if not isinstance(md, MlaMetadata):
        raise TypeError(f"metadata must be the MlaMetadata of get_mla_metadata, got {type(md).__name__}")
    made = (md.item_offsets.shape[0] - 1, md.max_pages, md.num_pages, md.s_q, md.num_heads)
    if made != (B, max_pages, num_pages, s_q, H):
        raise ValueError(f"metadata was made for B = {made[0]}, max_pages = {made[1]}, num_pages = {made[2]}, "
                         f"s_q = {made[3]}, num_heads = {made[4]}; this call has B = {B}, max_pages = {max_pages}, "
                         f"num_pages = {num_pages}, s_q = {s_q}, num_heads = {H}")
    if md.items.device != device:
        raise ValueError(f"metadata must be on {device} (like q), got {md.items.device}")


def mla_decode(q, cache, block_table, cache_seqlens, softmax_scale: float, causal: bool = True, *,
               metadata: MlaMetadata | None = None, backend: str = "auto"):
    """Absorbed MLA attention of q [B, s_q, H, 576] bf16 over the paged latent cache: bf16
    [num_pages, 64, 1, 576], or the FP8 cache that append_to_cache fills, uint8 [num_pages, 64, 1, 656].

    Returns out [B, s_q, H, 512] bf16 (softmax-weighted latents: apply absorb_output) and
    lse [B, H, s_q] fp32 (natural-log sum-exp of the scaled scores). softmax_scale: a finite number
    > 0 (softmax_scale()). causal masks later query tokens among the s_q (speculative decoding).
    metadata: get_mla_metadata of this step's cache_seqlens and block_table, shared by all layers (made
    here when None). The module docstring has the checks (host and device) and what NaN rows mean.
    backend: "cuda" (sm_90, bf16 cache), "triton" (sm_80+, the FP8 cache from sm_89), "reference" or
    "auto" (CUDA where it runs, else Triton)."""
    # In plain eager mode the checks' verdict is cached per argument signature (as fp8_gemm does).
    md = metadata
    direct = (md is None or isinstance(md, MlaMetadata)) and \
        _backend.eager(q, cache, block_table, cache_seqlens, *(() if md is None else md[:6]))
    key = plan = None
    if direct:
        try:
            key = (q.shape, q.stride(), q.dtype, q.device, cache.shape, cache.stride(), cache.dtype, cache.device,
                   block_table.shape, block_table.stride(), block_table.dtype, block_table.device,
                   cache_seqlens.shape, cache_seqlens.stride(), cache_seqlens.dtype, cache_seqlens.device,
                   type(softmax_scale), softmax_scale, type(causal), causal, backend, type(md),
                   None if md is None else (md.items.shape, md.items.dtype, md.items.device, md.item_offsets.shape,
                                            md.num_pages, md.max_pages, md.s_q, md.num_heads))
            plan = _DECODE_PLANS.get(key)
        except (TypeError, AttributeError):  # unhashable or malformed arguments: the checks below name them
            key = None
    if plan is None:
        q, cache, block_table, cache_seqlens, md, *plan = _checked_decode(q, cache, block_table, cache_seqlens,
                                                                          softmax_scale, causal, md, backend)
        if key is not None:
            if len(_DECODE_PLANS) > 4096:
                _DECODE_PLANS.clear()
            _DECODE_PLANS[key] = plan
        direct = _backend.eager(q, cache, block_table, cache_seqlens, *(() if md is None else md[:6]))
    scale, name = plan
    if md is None and direct and name == "cuda":
        return _cuda_decode_default(q, cache, block_table, cache_seqlens, scale, causal)
    if md is None:  # the lengths and the table were checked with the decode's arguments
        md = _metadata(cache_seqlens, block_table, cache.shape[0], q.shape[1], q.shape[2],
                       _backend.resolve("get_mla_metadata", "auto", q.device))
    return (_decode if direct else _mla_decode_op)(q, cache, block_table, cache_seqlens, *md[:6], scale, causal,
                                                   name)


_DECODE_PLANS = {}  # argument signature -> (softmax scale, backend name), for arguments _checked_decode passed


def _checked_decode(q, cache, block_table, cache_seqlens, softmax_scale, causal, metadata, backend):
    """Every argument rule of mla_decode (raising naming the argument), foreign arrays as tensors."""
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
    scale = check_real("softmax_scale", softmax_scale, positive=True)
    check_bool("causal", causal)
    op = "mla_decode_fp8_cache" if cache.dtype == torch.uint8 else "mla_decode"
    name = _backend.resolve(op, backend, q.device)
    if metadata is not None:
        _check_metadata(metadata, B, block_table.shape[1], cache.shape[0], s_q, H, q.device)
    return q, cache, block_table, cache_seqlens, metadata, scale, name


# ---------------------------------------------------------------------------------------------
# Appending to the cache.

def _reference_append(cache, block_table, cache_seqlens, kv_latent, k_rope):
    _ref.append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope)


def _triton_append(cache, block_table, cache_seqlens, kv_latent, k_rope):
    from dskernels.triton import mla as tm
    tm.append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope)


_APPEND = {"reference": _reference_append, "triton": _triton_append}


def _append(cache, block_table, cache_seqlens, kv_latent, k_rope, backend):
    with _backend.on_device(cache):
        _APPEND[backend](cache, block_table, cache_seqlens, kv_latent, k_rope)
    return cache_seqlens + kv_latent.shape[1]


@torch.library.custom_op("dskernels::mla_append_to_cache", mutates_args=("cache",))
def _append_op(cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               kv_latent: torch.Tensor, k_rope: torch.Tensor, backend: str) -> torch.Tensor:
    return _append(cache, block_table, cache_seqlens, kv_latent, k_rope, backend)


@_append_op.register_fake
def _(cache, block_table, cache_seqlens, kv_latent, k_rope, backend):
    return torch.empty_like(cache_seqlens)


def append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope, *, validate: bool = False,
                    backend: str = "auto"):
    """Write the new tokens' latents kv_latent [B, s, 512] and RoPE keys k_rope [B, s, 64] (bf16)
    at positions cache_seqlens[b] .. + s - 1, in place: prefill (s = prompt length) and decode (s = 1
    or the speculative tokens). A uint8 cache is the FP8 cache: each token's latent is quantized per
    128 dims (dskernels.reference.mla.quantize_cache_rows). Returns cache_seqlens + s.

    A position outside the block table or the cache is not written (the decode then flags its batch);
    validate=True checks on the host first (one sync) and raises naming the entry. backend: "triton"
    (sm_80+; the FP8 cache from sm_89), "reference" or "auto"."""
    kv_latent, k_rope = _backend.as_tensor("kv_latent", kv_latent), _backend.as_tensor("k_rope", k_rope)
    cache, block_table = _backend.as_tensor("cache", cache), _backend.as_tensor("block_table", block_table)
    cache_seqlens = _backend.as_tensor("cache_seqlens", cache_seqlens)
    check_tensor("kv_latent", kv_latent, dtypes=(torch.bfloat16,), ndim=3)
    B, s, _ = kv_latent.shape
    check_shape("kv_latent", kv_latent, (B, s, KV_LORA_RANK))
    check_tensor("k_rope", k_rope, dtypes=(torch.bfloat16,), ndim=3, device=kv_latent.device)
    check_shape("k_rope", k_rope, (B, s, ROPE_DIM))
    _check_cache(cache, block_table, cache_seqlens, B)
    if cache.device != kv_latent.device:
        raise ValueError(f"cache must be on {kv_latent.device} (like kv_latent), got {cache.device}")
    check_bool("validate", validate)
    op = "append_to_cache_fp8_cache" if cache.dtype == torch.uint8 else "append_to_cache"
    name = _backend.resolve(op, backend, cache.device)
    if validate:
        _validate_values(cache.shape[0], block_table, cache_seqlens + s, s)
    run = _backend.pick(_append, _append_op, cache, block_table, cache_seqlens, kv_latent, k_rope)
    return run(cache, block_table, cache_seqlens, kv_latent, k_rope, name)
