"""MLA absorbed decode over a paged latent cache: kernels vs the fp32 reference (ragged lengths,
shuffled pages, NaN garbage outside the sequences, s_q = 2 causal), absorbed vs un-absorbed attention,
the cache-append op, the scheduler, and bad input."""
import math

import pytest
import torch

import dskernels.mla as mla
from conformance.conftest import DEVICE, ON_GPU, backends_for
from conformance.tolerances import (MLA_ABSORBED_DIFF, MLA_DIFF, MLA_FP8_CACHE_DIFF, MLA_LSE,
                                    assert_finite, diff, mla_out_bound)
from dskernels.reference import mla as ref

BACKENDS = [p for p in backends_for(mla.MIN_CAPABILITY)]


def paged_cache(seqlens, seed=0, extra_pages=3, device=DEVICE):
    """A cache holding len(seqlens) sequences on shuffled pages; every slot outside a sequence
    (the tail of its last page, unused pages) holds NaN, so reading one shows up."""
    g = torch.Generator().manual_seed(seed)
    pages_per_seq = [math.ceil(L / 64) for L in seqlens]
    num_pages = sum(pages_per_seq) + extra_pages
    max_pages = max(pages_per_seq) + 1
    cache = torch.full((num_pages, 64, 1, 576), float("nan"), dtype=torch.bfloat16)
    perm = torch.randperm(num_pages, generator=g)
    block_table = torch.randint(0, num_pages, (len(seqlens), max_pages), generator=g, dtype=torch.int32)
    used = 0
    for b, (L, n) in enumerate(zip(seqlens, pages_per_seq)):
        pages = perm[used:used + n]
        used += n
        block_table[b, :n] = pages.int()
        tokens = torch.randn(L, 576, generator=g).to(torch.bfloat16)
        flat = cache[pages].view(-1, 576)
        flat[:L] = tokens
        cache[pages] = flat.view(n, 64, 1, 576)
    return cache.to(device), block_table.to(device), torch.tensor(seqlens, dtype=torch.int32, device=device)


def to_fp8_cache(cache):
    """The same pages as an FP8 cache ([num_pages, 64, 1, 656] uint8)."""
    return ref.quantize_cache_rows(cache[..., :512].cpu(), cache[..., 512:].cpu()).to(cache.device)


def query(B, s_q, H, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, s_q, H, 576, generator=g).to(torch.bfloat16).to(DEVICE)


def check_against_reference(out, lse, q, cache, block_table, seqlens, scale, causal):
    want, want_lse = ref.mla_decode(q.cpu(), cache.cpu(), block_table.cpu(), seqlens.cpu(), scale, causal)
    assert out.shape == want.shape and out.dtype == torch.bfloat16
    assert lse.shape == want_lse.shape
    assert_finite("out", out)
    assert_finite("lse", lse)
    v_max = torch.nan_to_num(cache[..., :512].float(), nan=0.0).abs().max().item()
    err = (out.cpu().float() - want.float()).abs()
    worst = (err / mla_out_bound(want, v_max)).max().item()
    assert worst <= 1, f"out: max error / bound = {worst:.3g}"
    d = diff(out.cpu(), want)
    assert d < MLA_DIFF, f"out: diff {d:.3g}"
    lse_err = ((lse.cpu() - want_lse).abs() / (1 + want_lse.abs())).max().item()
    assert lse_err <= MLA_LSE, f"lse: max relative error {lse_err:.3g}"


CASES = [  # (seqlens, heads, s_q, causal)
    ([1], 16, 1, True),
    ([65, 130], 16, 2, True),
    ([1, 700, 64, 129], 32, 1, True),
    ([300, 5], 16, 2, False),
    ([200], 20, 1, True),  # rows not a multiple of the head block
]
if ON_GPU:
    CASES += [
        ([4096] * 8, 128, 1, True),
        ([2, 16384, 77, 4097, 1024, 63, 8191, 3], 64, 2, True),  # ragged from s_q to 16k, shuffled pages
        ([3000, 12, 900], 128, 2, True),
        ([2048] * 4, 16, 1, True),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{len(c[0])}x{max(c[0])}-H{c[1]}-sq{c[2]}-{'causal' if c[3] else 'full'}")
def test_decode_matches_reference(backend, case):
    seqlens, H, s_q, causal = case
    cache, block_table, lens = paged_cache(seqlens, seed=len(seqlens) + H)
    q = query(len(seqlens), s_q, H)
    scale = ref.softmax_scale()
    out, lse = mla.mla_decode(q, cache, block_table, lens, scale, causal, backend=backend)
    check_against_reference(out, lse, q, cache, block_table, lens, scale, causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_absorbed_equals_unabsorbed(backend):
    """Up-projecting the cache to full keys and values and running standard attention gives what
    the absorbed path gives, within bf16 rounding."""
    B, s_q, H = 2, 2, 16
    cache, block_table, lens = paged_cache([150, 70], seed=5)
    g = torch.Generator().manual_seed(6)
    q_nope = torch.randn(B, s_q, H, 128, generator=g).to(torch.bfloat16).to(DEVICE)
    q_pe = torch.randn(B, s_q, H, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    wkv_b = (torch.randn(H * 256, 512, generator=g) / 512 ** 0.5).to(torch.bfloat16).to(DEVICE)
    scale = ref.softmax_scale(rope_factor=40.0)
    q_latent = mla.absorb_query(q_nope.float(), wkv_b.float()).to(torch.bfloat16)
    out, _ = mla.mla_decode(torch.cat([q_latent, q_pe], -1), cache, block_table, lens, scale, backend=backend)
    absorbed = mla.absorb_output(out.float(), wkv_b.float())
    textbook = ref.attention_unabsorbed(q_nope, q_pe, cache, block_table, lens, wkv_b, scale)
    d = diff(absorbed, textbook)
    assert d < MLA_ABSORBED_DIFF, f"absorbed vs un-absorbed: diff {d:.3g}"


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cuda"])
@pytest.mark.parametrize("case", CASES[:3] + CASES[5:7], ids=lambda c: f"L{len(c[0])}x{max(c[0])}-H{c[1]}-sq{c[2]}")
def test_fp8_cache_decode_matches_reference(backend, case):
    seqlens, H, s_q, causal = case
    cache, block_table, lens = paged_cache(seqlens, seed=3)
    cache = to_fp8_cache(cache)
    q = query(len(seqlens), s_q, H)
    out, lse = mla.mla_decode(q, cache, block_table, lens, ref.softmax_scale(), causal, backend=backend)
    check_against_reference(out, lse, q, cache, block_table, lens, ref.softmax_scale(), causal)


def test_fp8_cache_saves_43_percent_and_stays_close_to_bf16():
    """656 bytes a token instead of 1152; the decode over it stays within E4M3's precision of the
    decode over the bf16 cache."""
    assert ref.FP8_CACHE_BYTES == 656 and 1 - 656 / (576 * 2) > 0.43
    cache, block_table, lens = paged_cache([300, 90], seed=4, device="cpu")
    q = query(2, 2, 16).cpu()
    bf16, _ = ref.mla_decode(q, cache, block_table, lens, ref.softmax_scale())
    fp8, _ = ref.mla_decode(q, to_fp8_cache(cache), block_table, lens, ref.softmax_scale())
    d = diff(fp8, bf16)
    assert d < MLA_FP8_CACHE_DIFF, f"FP8 vs bf16 cache: diff {d:.3g}"


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "cuda"])
def test_fp8_cache_append(backend):
    cache = torch.zeros(4, 64, 1, ref.FP8_CACHE_BYTES, dtype=torch.uint8, device=DEVICE)
    block_table = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([10, 64], dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(9)
    kv = torch.randn(2, 3, 512, generator=g).to(torch.bfloat16).to(DEVICE)
    pe = torch.randn(2, 3, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    new = mla.append_to_cache(cache, block_table, lens, kv, pe, backend=backend)
    assert new.tolist() == [13, 67]
    got = ref.dequantize_cache_rows(cache.cpu())
    want = ref.dequantize_cache_rows(ref.quantize_cache_rows(kv.cpu(), pe.cpu()))
    assert torch.equal(got[3, 10:13, 0], want[0]) and torch.equal(got[2, 0:3, 0], want[1])


def test_softmax_scale_is_deepseek_v3s():
    assert ref.softmax_scale() == pytest.approx(192 ** -0.5)
    mscale = 0.1 * math.log(40) + 1
    assert ref.softmax_scale(rope_factor=40.0) == pytest.approx(192 ** -0.5 * mscale**2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_prefill_then_decode(backend):
    """Prefill 100 tokens into an empty paged cache, then decode 2 speculative tokens; the bytes
    must equal the reference's and the decode must see them."""
    B, num_pages = 2, 8
    append_backend = "auto" if backend == "cuda" else backend  # the append is a torch/Triton scatter only
    cache = torch.full((num_pages, 64, 1, 576), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    block_table = torch.tensor([[5, 2, 7], [0, 6, 1]], dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(2)
    want_cache = cache.clone()
    for s in (100, 2):
        kv = torch.randn(B, s, 512, generator=g).to(torch.bfloat16).to(DEVICE)
        pe = torch.randn(B, s, 64, generator=g).to(torch.bfloat16).to(DEVICE)
        ref.append_to_cache(want_cache, block_table, lens, kv, pe)
        lens = mla.append_to_cache(cache, block_table, lens, kv, pe, backend=append_backend)
    assert lens.tolist() == [102, 102]
    same = (cache == want_cache) | (torch.isnan(cache) & torch.isnan(want_cache))
    assert same.all()
    q = query(B, 2, 16)
    out, lse = mla.mla_decode(q, cache, block_table, lens, ref.softmax_scale(), backend=backend)
    check_against_reference(out, lse, q, cache, block_table, lens, ref.softmax_scale(), True)


def test_schedule_covers_every_block_once_in_balanced_items():
    lens = torch.tensor([1, 16384, 77, 4097, 1024, 63, 8191, 2], dtype=torch.int32)
    block_table = torch.zeros(8, 256, dtype=torch.int32)
    items, offsets, bad = mla.schedule(lens, block_table, num_pages=1, s_q=1, num_parts=16)
    blocks = (lens + 63) // 64
    quota = math.ceil(int(blocks.sum()) / 16)
    assert items.shape == (16 + 8, 3) and not bad.any()
    for b in range(8):
        mine = items[offsets[b]:offsets[b + 1]]
        assert (mine[:, 0] == b).all() and len(mine) >= 1
        covered = torch.cat([torch.arange(s, e) for _, s, e in mine.tolist()])
        assert covered.tolist() == list(range(int(blocks[b]))), f"batch {b}: blocks not covered once, in order"
        assert ((mine[:, 2] - mine[:, 1]) <= math.ceil(1.5 * quota)).all()  # n rounded to the nearest
    assert (items[offsets[-1]:, 0] == -1).all()


SCHEDULE_BACKENDS = [p for p in backends_for(mla.MIN_CAPABILITY) if p.values[0] != "triton"]


@pytest.mark.parametrize("backend", SCHEDULE_BACKENDS)
@pytest.mark.parametrize("H", [1, 32, 128], ids=lambda h: f"H{h}")
def test_metadata_equals_the_schedule_specification(backend, H):
    """get_mla_metadata (one CUDA launch on a GPU) gives exactly `schedule`'s integers: ragged lengths
    from 0 to 16k, lengths past the table, below s_q, negative, out-of-range pages."""
    g = torch.Generator().manual_seed(11)
    B, max_pages, num_pages = 1500, 260, 5000  # more batches than the CUDA kernel has threads
    lens = torch.randint(0, 16640, (B,), generator=g, dtype=torch.int32)
    lens[:6] = torch.tensor([0, 1, 2, 64, 65, 16384], dtype=torch.int32)
    lens[6], lens[7] = max_pages * 64 + 1, -5  # past what the table covers; negative
    table = torch.randint(0, num_pages, (B, max_pages), generator=g, dtype=torch.int32)
    table[8, 3], table[9, 0], table[10, 200] = num_pages, -1, num_pages + 7  # outside the cache
    lens[10] = 100  # its bad page lies past its blocks: not flagged
    s_q = 2
    md = mla.get_mla_metadata(lens.to(DEVICE), table.to(DEVICE), num_pages, s_q, H, backend=backend)
    parts = mla.num_parts(DEVICE, s_q * H)
    items, offsets, bad = mla.schedule(lens, table, num_pages, s_q, parts)
    assert torch.equal(md.items.cpu(), items) and torch.equal(md.item_offsets.cpu(), offsets)
    assert torch.equal(md.bad.cpu(), bad)
    assert bad[[0, 1, 6, 7, 8, 9]].tolist() == [1, 1, 1, 1, 1, 1] and bad[[2, 3, 4, 5, 10]].tolist() == [0] * 5


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "reference"])
def test_metadata_computed_once_serves_every_layer(backend):
    """One get_mla_metadata per step, reused by several calls (layers) with other queries: each call
    gives what a call without metadata gives; metadata made for another head count is refused."""
    cache, block_table, lens = paged_cache([700, 65, 3000], seed=12)
    md = mla.get_mla_metadata(lens, block_table, cache.shape[0], 2, 32)
    for layer in range(2):
        q = query(3, 2, 32, seed=20 + layer)
        out, lse = mla.mla_decode(q, cache, block_table, lens, ref.softmax_scale(), metadata=md, backend=backend)
        check_against_reference(out, lse, q, cache, block_table, lens, ref.softmax_scale(), True)
    with pytest.raises(ValueError, match="metadata was made for s_q = 2, num_heads = 32"):
        mla.mla_decode(query(3, 2, 16), cache, block_table, lens, ref.softmax_scale(), metadata=md, backend=backend)
    with pytest.raises(TypeError, match="metadata must be the MlaMetadata"):
        mla.mla_decode(query(3, 2, 32), cache, block_table, lens, ref.softmax_scale(), metadata=tuple(md)[:3],
                       backend=backend)


# --- bad input ------------------------------------------------------------------------------

def test_bad_input_raises():
    cache, block_table, lens = paged_cache([100, 30])
    q = query(2, 1, 16)
    scale = ref.softmax_scale()
    dec = mla.mla_decode
    with pytest.raises(ValueError, match="cache must be"):
        dec(q, cache[:, :, :, :512].contiguous(), block_table, lens, scale)
    with pytest.raises(TypeError, match="cache must have dtype"):
        dec(q, cache.float(), block_table, lens, scale)
    with pytest.raises(TypeError, match="q must have dtype"):
        dec(q.float(), cache, block_table, lens, scale)
    with pytest.raises(ValueError, match="q must be"):
        dec(q[..., :512].contiguous(), cache, block_table, lens, scale)
    with pytest.raises(TypeError, match="block_table must have dtype"):
        dec(q, cache, block_table.long(), lens, scale)
    with pytest.raises(ValueError, match="one row per sequence"):
        dec(q, cache, block_table[:1], lens, scale)
    bad_table = block_table.clone()
    bad_table[1, 0] = cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = .* points outside the cache"):
        dec(q, cache, bad_table, lens, scale)
    too_long = lens.clone()
    too_long[0] = block_table.shape[1] * 64 + 1
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = .* more than block_table covers"):
        dec(q, cache, block_table, too_long, scale)
    with pytest.raises(ValueError, match="less than s_q"):
        dec(query(2, 2, 16), cache, block_table, torch.tensor([1, 30], dtype=torch.int32, device=DEVICE), scale)
    with pytest.raises(ValueError, match="kv_latent must have shape"):
        mla.append_to_cache(cache, block_table, lens, torch.zeros(2, 1, 576, dtype=torch.bfloat16, device=DEVICE),
                            torch.zeros(2, 1, 64, dtype=torch.bfloat16, device=DEVICE))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cuda"])
def test_cuda_refuses_the_fp8_cache(backend):
    cache, block_table, lens = paged_cache([100, 30])
    with pytest.raises(ValueError, match="reads the bf16 cache only"):
        mla.mla_decode(query(2, 1, 16), to_fp8_cache(cache), block_table, lens, ref.softmax_scale(), backend=backend)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "reference"])
@pytest.mark.parametrize("bad_batch", [0, 1], ids=["split-batch", "single-item-batch"])
def test_without_host_validation_a_bad_batch_becomes_nan(backend, bad_batch):
    """validate=False: no host sync; the device-side check poisons only the offending batch, whether the
    combine finishes it (batch 0: two items) or the split pass does (batch 1: one block, one item)."""
    cache, block_table, lens = paged_cache([100, 30])
    metadata = mla.get_mla_metadata(lens, block_table, cache.shape[0], 1, 16)
    assert metadata.item_offsets.tolist() == [0, 2, 3]
    bad_table = block_table.clone()
    bad_table[bad_batch, 0] = 10_000
    out, lse = mla.mla_decode(query(2, 1, 16), cache, bad_table, lens, ref.softmax_scale(), validate=False,
                              backend=backend)
    good = 1 - bad_batch
    assert torch.isnan(out[bad_batch].float()).all() and torch.isnan(lse[bad_batch]).all()
    assert torch.isfinite(out[good].float()).all() and torch.isfinite(lse[good]).all()
