"""Multi-head latent attention (MLA), absorbed for decode: the specification.

MLA caches, per token, one 512-dim latent c (shared by all heads) and one 64-dim RoPE key k_pe.
Head h's key is [W_UK[h] c, k_pe] and its value W_UV[h] c, with wkv_b = [W_UK; W_UV] per head
([H * (128 + 128), 512]). Folding W_UK into the query and W_UV into the output ("absorption"),

    score(t) = scale * ([q_nope W_UK[h], q_pe] . [c_t, k_pe_t])       a 576-dim dot product
    out      = (sum_t softmax(score)_t c_t) W_UV[h]^T                 a 512-dim sum, then 512 -> 128

so attention runs on the latent cache itself: every head reads the same 576-wide cache rows, which
are never up-projected.

Layouts (FlashMLA's): q [B, s_q, H, 576]; cache [num_pages, 64, 1, 576] bf16, pages of 64 tokens
(or the FP8 cache, [num_pages, 64, 1, 656] uint8: per token 512 e4m3 latents, their 4 fp32 scales,
one per 128, and the 64 RoPE dims in bf16; 656 bytes instead of 1152);
block_table [B, max_pages] int32 (page of each 64-token block); cache_seqlens [B] int32, the tokens in
the cache including the s_q query tokens. Causal: query token i sees positions t < L - s_q + i + 1.

Also specified here: the work list the kernels split a decode step into (`schedule`), with the record
of what it was made from (the lengths and a fingerprint of each batch's block table, `table_hash`) that
every decode call checks its own inputs against (`mismatched`).
"""
import math

import torch

from dskernels.reference.quant import dequant, per_token_group_quant

PAGE_SIZE = 64
KV_LORA_RANK = 512     # latent dims (also the value dims of absorbed attention)
ROPE_DIM = 64
QK_NOPE_DIM = 128
V_HEAD_DIM = 128
QK_HEAD_DIM = QK_NOPE_DIM + ROPE_DIM  # 192
CACHE_DIM = KV_LORA_RANK + ROPE_DIM   # 576
FP8_CACHE_BYTES = KV_LORA_RANK + 4 * 4 + ROPE_DIM * 2  # 656: e4m3 latents, 4 fp32 scales, bf16 RoPE


def softmax_scale(qk_head_dim: int = QK_HEAD_DIM, rope_factor: float = 1.0, mscale: float = 1.0) -> float:
    """DeepSeek-V3's: 1/sqrt(192), times the YaRN mscale^2 when the context is stretched
    (rope_factor > 1, e.g. 40)."""
    scale = qk_head_dim ** -0.5
    if rope_factor > 1.0:
        m = 0.1 * mscale * math.log(rope_factor) + 1.0
        scale *= m * m
    return scale


def w_uk(wkv_b: torch.Tensor, heads: int) -> torch.Tensor:
    return wkv_b.view(heads, QK_NOPE_DIM + V_HEAD_DIM, KV_LORA_RANK)[:, :QK_NOPE_DIM]   # [H, 128, 512]


def w_uv(wkv_b: torch.Tensor, heads: int) -> torch.Tensor:
    return wkv_b.view(heads, QK_NOPE_DIM + V_HEAD_DIM, KV_LORA_RANK)[:, QK_NOPE_DIM:]   # [H, 128, 512]


def absorb_query(q_nope: torch.Tensor, wkv_b: torch.Tensor) -> torch.Tensor:
    """q_nope [B, s, H, 128] -> q_latent [B, s, H, 512] = q_nope @ W_UK per head."""
    return torch.einsum("bshd,hdc->bshc", q_nope, w_uk(wkv_b, q_nope.shape[2]))


def absorb_output(o_latent: torch.Tensor, wkv_b: torch.Tensor) -> torch.Tensor:
    """o_latent [B, s, H, 512] -> [B, s, H, 128] = o_latent @ W_UV^T per head."""
    return torch.einsum("bshc,hdc->bshd", o_latent, w_uv(wkv_b, o_latent.shape[2]))


def quantize_cache_rows(kv_latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """[..., 512] latents and [..., 64] RoPE keys (bf16) -> FP8 cache rows [..., 656] uint8."""
    lead = kv_latent.shape[:-1]
    q, scale = per_token_group_quant(kv_latent.reshape(-1, KV_LORA_RANK))             # [T, 512], [T, 4]
    rows = torch.cat([q.view(torch.uint8), scale.view(torch.uint8),
                      k_rope.reshape(-1, ROPE_DIM).to(torch.bfloat16).view(torch.uint8)], dim=-1)
    return rows.view(*lead, FP8_CACHE_BYTES)


def dequantize_cache_rows(rows: torch.Tensor) -> torch.Tensor:
    """FP8 cache rows [..., 656] uint8 -> [..., 576] bf16 (latent = e4m3 * its group's scale)."""
    flat = rows.reshape(-1, FP8_CACHE_BYTES)
    q = flat[:, :KV_LORA_RANK].contiguous().view(torch.float8_e4m3fn)                  # [T, 512]
    scale = flat[:, KV_LORA_RANK:KV_LORA_RANK + 16].contiguous().view(torch.float32)   # [T, 4]
    pe = flat[:, KV_LORA_RANK + 16:].contiguous().view(torch.bfloat16)                  # [T, 64]
    return torch.cat([dequant(q, scale, 1, torch.bfloat16), pe], dim=-1).view(*rows.shape[:-1], CACHE_DIM)


def gather_cache(cache, block_table, b: int, length: int) -> torch.Tensor:
    """The first `length` tokens of sequence b, [length, 576]."""
    pages = block_table[b, : (length + PAGE_SIZE - 1) // PAGE_SIZE].long()
    rows = cache[pages].reshape(-1, cache.shape[-1])[:length]
    return dequantize_cache_rows(rows) if cache.dtype == torch.uint8 else rows


def append_to_cache(cache, block_table, cache_seqlens, kv_latent, k_rope):
    """Write kv_latent [B, s, 512] and k_rope [B, s, 64] at positions cache_seqlens[b] + 0..s-1
    (in place); returns the new lengths cache_seqlens + s. A position whose block lies outside the
    table, or whose page lies outside the cache, is not written (the decode flags such a batch)."""
    B, s, _ = kv_latent.shape
    max_pages = block_table.shape[1]
    pos = cache_seqlens.long()[:, None] + torch.arange(s, device=cache.device)          # [B, s]
    in_table = (pos >= 0) & (pos < max_pages * PAGE_SIZE)
    pages = torch.gather(block_table.long(), 1, (pos // PAGE_SIZE).clamp(0, max_pages - 1))  # [B, s]
    ok = (in_table & (pages >= 0) & (pages < cache.shape[0])).reshape(-1)             # [B * s]
    if cache.dtype == torch.uint8:
        tokens = quantize_cache_rows(kv_latent, k_rope)                                 # [B, s, 656]
    else:
        tokens = torch.cat([kv_latent, k_rope], dim=-1).to(cache.dtype)                 # [B, s, 576]
    cache[pages.reshape(-1)[ok], (pos % PAGE_SIZE).reshape(-1)[ok], 0] = tokens.reshape(-1, cache.shape[-1])[ok]
    return cache_seqlens + s


def causal_visible(L: int, s_q: int, device) -> torch.Tensor:
    """[s_q, L] bool: query token i (the i-th of the last s_q positions) sees positions <= its own."""
    return torch.arange(L, device=device)[None, :] < (L - s_q + 1 + torch.arange(s_q, device=device))[:, None]


def mla_decode(q, cache, block_table, cache_seqlens, softmax_scale: float, causal: bool = True, skip=None):
    """q [B, s_q, H, 576] -> (out [B, s_q, H, 512] in q's dtype, lse [B, H, s_q] fp32), fp32 math.
    Batches where skip [B] bool is set are not read: their out and lse are NaN."""
    B, s_q, H, _ = q.shape
    out = torch.full((B, s_q, H, KV_LORA_RANK), float("nan"), dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, s_q), float("nan"), dtype=torch.float32, device=q.device)
    skip = [False] * B if skip is None else skip.tolist()
    for b in range(B):
        if skip[b]:
            continue
        L = int(cache_seqlens[b])
        kv = gather_cache(cache, block_table, b, L).float()                             # [L, 576]
        scores = torch.einsum("shd,td->sht", q[b].float(), kv) * softmax_scale           # [s_q, H, L]
        if causal:
            scores = scores.masked_fill(~causal_visible(L, s_q, q.device)[:, None, :], float("-inf"))
        lse[b] = torch.logsumexp(scores, dim=-1).t()                                     # [H, s_q]
        out[b] = torch.einsum("sht,tc->shc", scores.softmax(dim=-1), kv[:, :KV_LORA_RANK])
    return out.to(q.dtype), lse


def attention_unabsorbed(q_nope, q_pe, cache, block_table, cache_seqlens, wkv_b, softmax_scale, causal=True):
    """The textbook path the absorbed one must equal: up-project the cache to per-head keys
    [L, H, 192] and values [L, H, 128], attend, return [B, s_q, H, 128] (fp32 math)."""
    B, s_q, H, _ = q_nope.shape
    out = torch.empty(B, s_q, H, V_HEAD_DIM, dtype=torch.float32, device=q_nope.device)
    for b in range(B):
        L = int(cache_seqlens[b])
        kv = gather_cache(cache, block_table, b, L).float()
        k_nope = torch.einsum("tc,hdc->thd", kv[:, :KV_LORA_RANK], w_uk(wkv_b, H).float())  # [L, H, 128]
        k = torch.cat([k_nope, kv[:, None, KV_LORA_RANK:].expand(L, H, ROPE_DIM)], dim=-1)   # [L, H, 192]
        v = torch.einsum("tc,hdc->thd", kv[:, :KV_LORA_RANK], w_uv(wkv_b, H).float())       # [L, H, 128]
        q = torch.cat([q_nope[b], q_pe[b]], dim=-1).float()                                 # [s_q, H, 192]
        scores = torch.einsum("shd,thd->sht", q, k) * softmax_scale
        if causal:
            scores = scores.masked_fill(~causal_visible(L, s_q, q.device)[:, None, :], float("-inf"))
        out[b] = torch.einsum("sht,thd->shd", scores.softmax(dim=-1), v)
    return out


# ---------------------------------------------------------------------------------------------
# The work list of a decode step and its record of the inputs it was made from.

ERROR_INVALID = 1   # error[0] bit: a batch's block table or length was invalid when the list was made
ERROR_MISMATCH = 2  # error[0] bit: a decode call's lengths or block table differed from the list's record
_U32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """h * c mod 2**32 for h in [0, 2**32) (int64), in halves so no product leaves int64."""
    return ((((h >> 16) * c) & 0xFFFF) << 16) + (h & 0xFFFF) * c & _U32


def blocks_of(cache_seqlens: torch.Tensor, max_pages: int) -> torch.Tensor:
    """[B] int64: the 64-token blocks each batch's length needs, clamped to [0, max_pages]."""
    return ((cache_seqlens.long() + PAGE_SIZE - 1) // PAGE_SIZE).clamp(0, max_pages)


def table_hash(block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
    """[B] int32: the fingerprint of each batch's block table over its ceil(L / 64) blocks (at most
    max_pages): the sum mod 2**32 of one term per block, murmur3's 32-bit finalizer of
    page * 0x9E3779B1 + k. For a fixed block k the term is a bijection of the page, so changing one
    entry always changes the fingerprint; any other change escapes it with probability about 2**-32."""
    B, max_pages = block_table.shape
    k = torch.arange(max_pages, device=block_table.device)
    h = (_mul32(block_table.long() & _U32, 0x9E3779B1) + k) & _U32                      # [B, max_pages]
    h ^= h >> 16
    h = _mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = _mul32(h, 0xC2B2AE35)
    h ^= h >> 16
    blocks = blocks_of(cache_seqlens, max_pages)                                         # [B]
    total = torch.where(k[None, :] < blocks[:, None], h, 0).sum(1) & _U32
    return torch.where(total >= 2**31, total - 2**32, total).int()                      # int32 bits


def schedule(cache_seqlens: torch.Tensor, block_table: torch.Tensor, num_pages: int, s_q: int, num_parts: int):
    """Split the batch into at most num_parts + B work items of whole 64-token blocks, and record what
    the split was made from.

    quota = ceil(total blocks / num_parts); a sequence gets round(blocks / quota) items (at least 1)
    of near-equal length. Rounding rather than ceil lets an item hold up to 1.5 x quota but keeps
    uniform batches in whole waves: B = 32, L = 16k, 128 heads gets 2 items of 128 blocks per
    sequence (128 CTAs, one wave on 132 SMs) instead of 3 of 86 (192 CTAs, 1.45 waves).

    Returns, all int32 on the lengths' device:
      items [num_parts + B, 3]: (batch, first block, end block); batch -1 for unused slots
      item_offsets [B + 1]: batch b owns items item_offsets[b] .. item_offsets[b+1]-1
      bad [B]: 1 where a needed block-table entry is outside [0, num_pages), the length exceeds what
               the table covers or is below s_q (that batch's output becomes NaN)
      made_seqlens [B]: a copy of cache_seqlens; made_table_hash [B]: table_hash of the block table
      error [2]: (ERROR_INVALID if any batch is bad else 0, the first bad batch or 2**31 - 1)
    """
    B, max_pages = block_table.shape
    dev = cache_seqlens.device
    L = cache_seqlens.long()
    blocks = blocks_of(L, max_pages)                                                    # [B]
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
    first_bad = torch.where(bad, torch.arange(B, device=dev), 2**31 - 1).min()
    error = torch.stack([bad.any().long() * ERROR_INVALID, first_bad]).int()
    return (items.int(), offsets.int(), bad.int(), cache_seqlens.int().clone(), table_hash(block_table, L),
            error)


def mismatched(cache_seqlens, block_table, made_seqlens, made_table_hash) -> torch.Tensor:
    """[B] bool: batches whose lengths or block table differ from the work list's record."""
    return (cache_seqlens != made_seqlens) | (table_hash(block_table, cache_seqlens) != made_table_hash)
