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
    (in place); returns the new lengths cache_seqlens + s."""
    B, s, _ = kv_latent.shape
    pos = cache_seqlens.long()[:, None] + torch.arange(s, device=cache.device)          # [B, s]
    pages = torch.gather(block_table.long(), 1, pos // PAGE_SIZE)                       # [B, s]
    if cache.dtype == torch.uint8:
        tokens = quantize_cache_rows(kv_latent, k_rope)                                 # [B, s, 656]
    else:
        tokens = torch.cat([kv_latent, k_rope], dim=-1).to(cache.dtype)                 # [B, s, 576]
    cache[pages.reshape(-1), (pos % PAGE_SIZE).reshape(-1), 0] = tokens.reshape(-1, cache.shape[-1])
    return cache_seqlens + s


def causal_visible(L: int, s_q: int, device) -> torch.Tensor:
    """[s_q, L] bool: query token i (the i-th of the last s_q positions) sees positions <= its own."""
    return torch.arange(L, device=device)[None, :] < (L - s_q + 1 + torch.arange(s_q, device=device))[:, None]


def mla_decode(q, cache, block_table, cache_seqlens, softmax_scale: float, causal: bool = True):
    """q [B, s_q, H, 576] -> (out [B, s_q, H, 512] in q's dtype, lse [B, H, s_q] fp32), fp32 math."""
    B, s_q, H, _ = q.shape
    out = torch.empty(B, s_q, H, KV_LORA_RANK, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, s_q, dtype=torch.float32, device=q.device)
    for b in range(B):
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
