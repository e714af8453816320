"""MLA absorbed decode: GB/s, TFLOPS and the fraction of the roofline time max(bytes / copy ceiling,
FLOPs / bf16 ceiling), against a plain-PyTorch absorbed decode (gather + matmul) and, where it fits
in memory, the un-absorbed path, both measured in the same run; FlashMLA's figures from
bench/anchors.json as reference lines. Bytes: the cache pages read plus q and out; FLOPs:
2 * B * s_q * H * L * (576 + 512). Uniform lengths, page 64, causal.

The decode is timed with its work list made beforehand (get_mla_metadata, once per decode step for
all layers), as FlashMLA's own benchmark times flash_mla_with_kvcache after get_mla_metadata;
test_mla_metadata times that step itself."""
import pytest
import torch

import dskernels.mla as mla
from bench.harness import anchor_row
from dskernels.reference import mla as ref

BACKENDS = ["cuda", "triton"]
SHAPES = [(64, 4096, 128, 1), (128, 8192, 128, 1), (128, 16384, 128, 1), (128, 8192, 16, 1),
          (64, 8192, 128, 2), (128, 4096, 64, 1), (32, 16384, 128, 1), (64, 1024, 16, 1)]
FP8_SHAPES = [(128, 8192, 128, 1), (128, 8192, 16, 1)]


def setup(B, L, H, s_q):
    pages = L // 64
    cache = torch.randn(B * pages, 64, 1, 576, device="cuda").to(torch.bfloat16)
    block_table = torch.randperm(B * pages, device="cuda", dtype=torch.int32).view(B, pages)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q = torch.randn(B, s_q, H, 576, device="cuda").to(torch.bfloat16)
    return q, cache, block_table, lens


def torch_absorbed(q, cache, block_table, lens, scale):
    """The plain-PyTorch absorbed decode a user would write: gather the pages, two batched
    matmuls, fp32 softmax (uniform lengths)."""
    B, s_q, H, _ = q.shape
    kv = cache[block_table.long()].view(B, -1, 576)                                  # [B, L, 576]
    L = kv.shape[1]
    scores = torch.bmm(q.view(B, s_q * H, 576), kv.transpose(1, 2)).float() * scale  # [B, s_q*H, L]
    visible = ref.causal_visible(L, s_q, q.device).repeat_interleave(H, 0)           # [s_q*H, L]
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1).to(q.dtype)
    return torch.bmm(p, kv[..., :512]).view(B, s_q, H, 512)


def torch_unabsorbed(q_nope, q_pe, cache, block_table, wkv_b, scale):
    """The textbook path: up-project the cache to per-head keys and values, then SDPA."""
    B, s_q, H, _ = q_nope.shape
    kv = cache[block_table.long()].view(B, -1, 576)
    k_nope = torch.einsum("btc,hdc->bhtd", kv[..., :512], ref.w_uk(wkv_b, H))
    k = torch.cat([k_nope, kv[:, None, :, 512:].expand(-1, H, -1, -1)], -1)          # [B, H, L, 192]
    v = torch.einsum("btc,hdc->bhtd", kv[..., :512], ref.w_uv(wkv_b, H))             # [B, H, L, 128]
    qf = torch.cat([q_nope, q_pe], -1).transpose(1, 2)                                # [B, H, s_q, 192]
    # bottom-right causal alignment (SDPA's is_causal aligns top-left)
    mask = ref.causal_visible(kv.shape[1], s_q, q_nope.device)
    return torch.nn.functional.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale)


def anchor_line(B, L, H, s_q):
    # (the H100 rows name the fields batch / cache / heads, the H200 rows B / L / H)
    row = anchor_row("mla_decode_bf16_page64", lambda r: (r.get("B", r.get("batch")), r.get("L", r.get("cache")),
                                                          r.get("H", r.get("heads")), r["s_q"]) == (B, L, H, s_q))
    return {k: row[k] for k in ("flashmla_us", "flashmla_roofline_fraction") if k in row} if row else {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-L{}-H{}-sq{}".format(*s))
def test_mla_decode(report, shape, backend):
    B, L, H, s_q = shape
    q, cache, block_table, lens = setup(B, L, H, s_q)
    scale = ref.softmax_scale()
    more = {}
    if B * L * H * (192 + 128) * 2 <= 4 * 2**30:  # the un-absorbed keys and values must fit
        q_nope = torch.randn(B, s_q, H, 128, device="cuda", dtype=torch.bfloat16)
        wkv_b = torch.randn(H * 256, 512, device="cuda", dtype=torch.bfloat16) / 512 ** 0.5
        more["unabsorbed"] = lambda: torch_unabsorbed(q_nope, q[..., 512:], cache, block_table, wkv_b, scale)
    md = mla.get_mla_metadata(lens, block_table, cache.shape[0], s_q, H)
    report(op="mla_decode", backend=backend, shape={"B": B, "L": L, "H": H, "s_q": s_q},
           fn=lambda: mla.mla_decode(q, cache, block_table, lens, scale, metadata=md,
                                     backend=backend),
           flops=2 * B * s_q * H * L * (576 + 512), bytes_moved=B * L * 576 * 2 + q.numel() * 2 + B * s_q * H * 512 * 2,
           bound="roofline", peer="plain PyTorch absorbed (gather + bmm)",
           peer_fn=lambda: torch_absorbed(q, cache, block_table, lens, scale), more_peers=more,
           extra=anchor_line(B, L, H, s_q))


@pytest.mark.parametrize("shape", FP8_SHAPES, ids=lambda s: "B{}-L{}-H{}-sq{}".format(*s))
def test_mla_decode_fp8_cache(report, shape):
    """The FP8 cache: 656 bytes a token instead of 1152 (43 % fewer bytes to read)."""
    B, L, H, s_q = shape
    q, cache_bf16, block_table, lens = setup(B, L, H, s_q)
    cache = ref.quantize_cache_rows(cache_bf16[..., :512], cache_bf16[..., 512:])
    scale = ref.softmax_scale()
    md = mla.get_mla_metadata(lens, block_table, cache.shape[0], s_q, H)
    report(op="mla_decode_fp8_cache", backend="triton", shape={"B": B, "L": L, "H": H, "s_q": s_q},
           fn=lambda: mla.mla_decode(q, cache, block_table, lens, scale, metadata=md,
                                     backend="triton"),
           flops=2 * B * s_q * H * L * (576 + 512),
           bytes_moved=B * L * ref.FP8_CACHE_BYTES + q.numel() * 2 + B * s_q * H * 512 * 2,
           bound="roofline", peer="Triton over the bf16 cache",
           peer_fn=lambda: mla.mla_decode(q, cache_bf16, block_table, lens, scale, metadata=md,
                                          backend="triton"))


@pytest.mark.parametrize("B", [128, 1024])
def test_mla_metadata(report, B):
    """The once-per-step scheduler: one CUDA launch against its torch-op specification (about 50 small
    kernels). Bytes: the lengths and the block table read, the work list written."""
    L, H, s_q = 8192, 128, 1
    n = B * L // 64
    block_table = torch.randperm(n, device="cuda", dtype=torch.int32).view(B, L // 64)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    report(op="mla_metadata", backend="cuda", shape={"B": B, "L": L, "H": H, "s_q": s_q},
           fn=lambda: mla.get_mla_metadata(lens, block_table, n, s_q, H, backend="cuda"),
           bytes_moved=block_table.numel() * 4 + B * 4, bound="copy_GBps", peer="torch ops (reference)",
           peer_fn=lambda: mla.get_mla_metadata(lens, block_table, n, s_q, H, backend="reference"))


RAGGED = [(1, 700, 4096, 16384), (33, 2048, 9000, 12000, 16384, 5), (16384, 128, 64, 1000, 3000)]


def setup_ragged(lens, H, s_q=1):
    """Sequences of the given lengths over one shuffled page pool; the block table padded with -1."""
    pages = [-(-L // 64) for L in lens]
    perm = torch.randperm(sum(pages), device="cuda", dtype=torch.int32)
    block_table = torch.full((len(lens), max(pages)), -1, dtype=torch.int32, device="cuda")
    start = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = perm[start:start + n]
        start += n
    cache = torch.randn(sum(pages), 64, 1, 576, device="cuda").to(torch.bfloat16)
    q = torch.randn(len(lens), s_q, H, 576, device="cuda").to(torch.bfloat16)
    return q, cache, block_table, torch.tensor(lens, dtype=torch.int32, device="cuda")


DEFAULT_CASES = [("ragged", lens, 128) for lens in RAGGED] + [("ragged", lens, 16) for lens in RAGGED[:2]] + \
    [("uniform", (B, L), H) for B, L, H, s_q in SHAPES if s_q == 1][:3]


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[1]))}-H{c[2]}")
def test_mla_decode_default_call(report, case):
    """The README's default call, mla_decode(q, cache, block_table, cache_seqlens, scale) with no
    metadata (made inside: one more small launch, no sync), eager as a decode loop calls it, against the
    fast path (metadata made beforehand, once per step) on the same inputs."""
    kind, dims, H = case
    if kind == "ragged":
        q, cache, block_table, lens = setup_ragged(dims, H)
    else:
        q, cache, block_table, lens = setup(dims[0], dims[1], H, 1)
    scale = ref.softmax_scale()
    md = mla.get_mla_metadata(lens, block_table, cache.shape[0], 1, H)
    L = int(lens.sum())
    report(op="mla_decode_default", backend="auto", shape={"lens": list(map(int, lens.tolist())), "H": H},
           fn=lambda: mla.mla_decode(q, cache, block_table, lens, scale),
           flops=2 * H * L * (576 + 512), bytes_moved=L * 576 * 2 + q.numel() * 2 + q.shape[0] * H * 512 * 2,
           bound="roofline", peer="the fast path (metadata made beforehand)",
           peer_fn=lambda: mla.mla_decode(q, cache, block_table, lens, scale, metadata=md), headline="eager",
           more_peers={"plain_pytorch": lambda: torch_absorbed(q, cache, block_table, lens, scale)}
           if kind == "uniform" else None)
