"""MLA absorbed decode over a paged latent cache: kernels vs the fp32 reference (ragged lengths,
shuffled pages, NaN garbage outside the sequences, s_q = 2 causal), absorbed vs un-absorbed attention,
the cache-append op, the work list and its metadata contract (every kind of mismatch caught on the
device), the op contract (opcheck, torch.compile) and bad input."""
import math

import numpy as np

import pytest
import torch

import dskernels
import dskernels.mla as mla
from conformance.conftest import DEVICE, ON_GPU, available, backends_for, twice_poisoned
from conformance.tolerances import (MLA_ABSORBED_DIFF, MLA_DIFF, MLA_FP8_CACHE_DIFF, MLA_LSE,
                                    assert_finite, diff, mla_out_bound)
from dskernels.reference import mla as ref

BACKENDS = backends_for("mla_decode")
FP8_BACKENDS = backends_for("mla_decode_fp8_cache")
APPEND_BACKENDS = backends_for("append_to_cache")
FP8_APPEND_BACKENDS = backends_for("append_to_cache_fp8_cache")
METADATA_BACKENDS = backends_for("get_mla_metadata")


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
CASE_IDS = lambda c: f"L{len(c[0])}x{max(c[0])}-H{c[1]}-sq{c[2]}-{'causal' if c[3] else 'full'}"  # noqa: E731


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_matches_reference(backend, case):
    """The default call (metadata made inside, poisoned like every output), twice under two poisons."""
    seqlens, H, s_q, causal = case
    cache, block_table, lens = paged_cache(seqlens, seed=len(seqlens) + H)
    q = query(len(seqlens), s_q, H)
    scale = ref.softmax_scale()
    out, lse = twice_poisoned(lambda: mla.mla_decode(q, cache, block_table, lens, scale, causal, backend=backend))
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
    scale = mla.softmax_scale(rope_factor=40.0)
    q_latent = mla.absorb_query(q_nope.float(), wkv_b.float()).to(torch.bfloat16)
    out, _ = mla.mla_decode(torch.cat([q_latent, q_pe], -1), cache, block_table, lens, scale, backend=backend)
    absorbed = mla.absorb_output(out.float(), wkv_b.float())
    textbook = ref.attention_unabsorbed(q_nope, q_pe, cache, block_table, lens, wkv_b, scale)
    d = diff(absorbed, textbook)
    assert d < MLA_ABSORBED_DIFF, f"absorbed vs un-absorbed: diff {d:.3g}"


# --- the FP8 cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FP8_BACKENDS)
@pytest.mark.parametrize("case", CASES[:3] + CASES[5:7], ids=CASE_IDS)
def test_fp8_cache_decode_matches_reference(backend, case):
    seqlens, H, s_q, causal = case
    cache, block_table, lens = paged_cache(seqlens, seed=3)
    cache = to_fp8_cache(cache)
    q = query(len(seqlens), s_q, H)
    out, lse = twice_poisoned(lambda: mla.mla_decode(q, cache, block_table, lens, ref.softmax_scale(), causal,
                                                     backend=backend))
    check_against_reference(out, lse, q, cache, block_table, lens, ref.softmax_scale(), causal)


def test_fp8_cache_row_layout():
    """A 656-byte row is the 512 latents' e4m3 bytes and their 4 scales exactly as per_token_group_quant
    makes them (one group per 128 dims), then the RoPE key's 64 bf16 values."""
    g = torch.Generator().manual_seed(7)
    kv = (torch.randn(5, 512, generator=g) * 3).to(torch.bfloat16)
    pe = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    rows = ref.quantize_cache_rows(kv, pe)
    q, scale = dskernels.per_token_group_quant(kv, backend="reference")
    assert rows.shape == (5, 656) and rows.dtype == torch.uint8
    assert torch.equal(rows[:, :512], q.view(torch.uint8))
    assert torch.equal(rows[:, 512:528].contiguous().view(torch.float32), scale)
    assert torch.equal(rows[:, 528:].contiguous().view(torch.bfloat16), pe)


def test_fp8_cache_stays_close_to_bf16():
    """The decode over the FP8 cache stays within E4M3's precision of the decode over the bf16 cache."""
    cache, block_table, lens = paged_cache([300, 90], seed=4, device="cpu")
    q = query(2, 2, 16).cpu()
    bf16, _ = ref.mla_decode(q, cache, block_table, lens, ref.softmax_scale())
    fp8, _ = ref.mla_decode(q, to_fp8_cache(cache), block_table, lens, ref.softmax_scale())
    d = diff(fp8, bf16)
    assert d < MLA_FP8_CACHE_DIFF, f"FP8 vs bf16 cache: diff {d:.3g}"


@pytest.mark.parametrize("backend", FP8_APPEND_BACKENDS)
def test_fp8_cache_append(backend):
    """Rows written at the right slots with the reference's bytes; every other byte of the cache (random,
    not zeros) untouched."""
    g = torch.Generator().manual_seed(9)
    cache = torch.randint(0, 256, (4, 64, 1, ref.FP8_CACHE_BYTES), generator=g, dtype=torch.uint8).to(DEVICE)
    before = cache.clone()
    block_table = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([10, 62], dtype=torch.int32, device=DEVICE)
    kv = torch.randn(2, 3, 512, generator=g).to(torch.bfloat16).to(DEVICE)
    pe = torch.randn(2, 3, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    new = mla.append_to_cache(cache, block_table, lens, kv, pe, backend=backend)
    assert new.tolist() == [13, 65]
    want = ref.quantize_cache_rows(kv.cpu(), pe.cpu())                                 # [2, 3, 656]
    got = cache.cpu()
    assert torch.equal(got[3, 10:13, 0], want[0])
    assert torch.equal(got[0, 62:64, 0], want[1, :2]) and torch.equal(got[2, 0, 0], want[1, 2])
    written = torch.zeros(4, 64, dtype=torch.bool)
    written[3, 10:13] = written[0, 62:64] = written[2, 0] = True
    assert torch.equal(got[~written], before.cpu()[~written])


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
def test_append_prefill_then_decode(backend):
    """Prefill 100 tokens into an empty paged cache, then decode 2 speculative tokens; the bytes
    must equal the reference's and the decode must see them."""
    B, num_pages = 2, 8
    cache = torch.full((num_pages, 64, 1, 576), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    block_table = torch.tensor([[5, 2, 7], [0, 6, 1]], dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    g = torch.Generator().manual_seed(2)
    want_cache = cache.clone()
    for s in (100, 2):
        kv = torch.randn(B, s, 512, generator=g).to(torch.bfloat16).to(DEVICE)
        pe = torch.randn(B, s, 64, generator=g).to(torch.bfloat16).to(DEVICE)
        ref.append_to_cache(want_cache, block_table, lens, kv, pe)
        lens = mla.append_to_cache(cache, block_table, lens, kv, pe, backend=backend)
    assert lens.tolist() == [102, 102]
    same = (cache == want_cache) | (torch.isnan(cache) & torch.isnan(want_cache))
    assert same.all()
    q = query(B, 2, 16)
    out, lse = mla.mla_decode(q, cache, block_table, lens, ref.softmax_scale())
    check_against_reference(out, lse, q, cache, block_table, lens, ref.softmax_scale(), True)


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
def test_append_skips_positions_outside_the_table_or_cache(backend):
    """Without validation an invalid target is not written (no out-of-bounds write): a page outside
    the cache, and a position past the block table; the valid rows are written."""
    cache = torch.full((4, 64, 1, 576), 7.0, dtype=torch.bfloat16, device=DEVICE)
    block_table = torch.tensor([[2, 9], [1, 3]], dtype=torch.int32, device=DEVICE)  # page 9 is outside
    lens = torch.tensor([63, 127], dtype=torch.int32, device=DEVICE)                # batch 1 ends the table
    kv = torch.ones(2, 2, 512, dtype=torch.bfloat16, device=DEVICE)
    pe = torch.ones(2, 2, 64, dtype=torch.bfloat16, device=DEVICE)
    mla.append_to_cache(cache, block_table, lens, kv, pe, backend=backend)
    filled = (cache == 1).all(-1)[..., 0]                                           # [4, 64]
    assert filled.sum().item() == 2 and filled[2, 63] and filled[3, 63]
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 129 is more than block_table covers"):
        mla.append_to_cache(cache, block_table, lens, kv, pe, validate=True, backend=backend)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 9 points outside the cache"):
        mla.append_to_cache(cache, block_table, lens[:1].repeat(2), kv, pe, validate=True, backend=backend)


# --- the work list ------------------------------------------------------------------------------

def schedule_by_loop(lens, table, num_pages, s_q, num_parts):
    """dskernels.reference.mla.schedule's integers, written as the plain loop over batches it describes."""
    B, max_pages = table.shape
    blocks = [min(max(0, -(-int(L) // 64)), max_pages) for L in lens]
    quota = max(1, -(-sum(blocks) // num_parts))
    items, offsets = [], [0]
    for b, nb in enumerate(blocks):
        n = max(1, (nb + quota // 2) // quota)
        chunk = -(-nb // n)
        items += [[b, min(j * chunk, nb), min((j + 1) * chunk, nb)] for j in range(n)]
        offsets.append(len(items))
    items += [[-1, 0, 0]] * (num_parts + B - len(items))
    bad = [int(any(not 0 <= int(table[b, k]) < num_pages for k in range(blocks[b]))
               or int(lens[b]) > max_pages * 64 or int(lens[b]) < s_q) for b in range(B)]
    return items, offsets, bad


def test_schedule_equals_its_loop_description():
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        B = int(torch.randint(1, 40, (1,), generator=g))
        lens = torch.randint(-3, 3000, (B,), generator=g, dtype=torch.int32)
        table = torch.randint(-2, 60, (B, 40), generator=g, dtype=torch.int32)
        parts = int(torch.randint(1, 50, (1,), generator=g))
        items, offsets, bad, seqlens, _, error = ref.schedule(lens, table, 55, 2, parts)
        want_items, want_offsets, want_bad = schedule_by_loop(lens, table, 55, 2, parts)
        assert items.tolist() == want_items and offsets.tolist() == want_offsets and bad.tolist() == want_bad
        assert torch.equal(seqlens, lens)
        assert error.tolist() == ([1, want_bad.index(1)] if any(want_bad) else [0, 2**31 - 1])


def test_schedule_covers_every_block_once_in_balanced_items():
    lens = torch.tensor([1, 16384, 77, 4097, 1024, 63, 8191, 2], dtype=torch.int32)
    block_table = torch.zeros(8, 256, dtype=torch.int32)
    items, offsets, bad, *_ = ref.schedule(lens, block_table, num_pages=1, s_q=1, num_parts=16)
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


def test_table_hash_sees_every_single_change():
    """Changing any one needed entry of a block table (to any other page) changes its fingerprint;
    entries past the batch's blocks do not count."""
    g = torch.Generator().manual_seed(4)
    table = torch.randint(0, 1000, (1, 40), generator=g, dtype=torch.int32)
    lens = torch.tensor([30 * 64], dtype=torch.int32)
    h = ref.table_hash(table, lens)
    for k in range(40):
        changed = table.clone()
        changed[0, k] = (changed[0, k] + int(torch.randint(1, 1000, (1,), generator=g))) % 1000
        assert (ref.table_hash(changed, lens) != h).item() == (k < 30), k


@pytest.mark.parametrize("backend", [p for p in METADATA_BACKENDS if p.values[0] == "cuda"])
@pytest.mark.parametrize("H", [1, 32, 128], ids=lambda h: f"H{h}")
def test_metadata_equals_the_schedule_specification(backend, H):
    """get_mla_metadata's one CUDA launch gives exactly the specification's integers (items, offsets,
    bad, the record, the error flag): ragged lengths from 0 to 16k, lengths past the table, below s_q,
    negative, out-of-range pages."""
    g = torch.Generator().manual_seed(11)
    B, max_pages, num_pages = 1500, 260, 5000  # more batches than the CUDA kernel has threads
    lens = torch.randint(0, 16640, (B,), generator=g, dtype=torch.int32)
    lens[:6] = torch.tensor([0, 1, 2, 64, 65, 16384], dtype=torch.int32)
    lens[6], lens[7] = max_pages * 64 + 1, -5  # past what the table covers; negative
    table = torch.randint(0, num_pages, (B, max_pages), generator=g, dtype=torch.int32)
    table[8, 3], table[9, 0], table[10, 200] = num_pages, -1, num_pages + 7  # outside the cache
    lens[10] = 100  # its bad page lies past its blocks: not flagged
    s_q = 2
    md = twice_poisoned(lambda: mla.get_mla_metadata(lens.to(DEVICE), table.to(DEVICE), num_pages, s_q, H,
                                                     backend=backend))
    want = ref.schedule(lens, table, num_pages, s_q, mla.num_parts(DEVICE, s_q * H))
    for name, got, w in zip(md._fields, md[:6], want):
        assert torch.equal(got.cpu(), w), name
    bad = want[2]
    assert bad[[0, 1, 6, 7, 8, 9]].tolist() == [1] * 6 and bad[[2, 3, 4, 5, 10]].tolist() == [0] * 5
    assert md.error.tolist() == [ref.ERROR_INVALID, 0]


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "reference"])
def test_metadata_computed_once_serves_every_layer(backend):
    """One get_mla_metadata per step, reused by several calls (layers) with other queries: each call
    gives what a call without metadata gives; metadata made for another shape is refused."""
    cache, block_table, lens = paged_cache([700, 65, 3000], seed=12)
    md = mla.get_mla_metadata(lens, block_table, cache.shape[0], 2, 32)
    for layer in range(2):
        q = query(3, 2, 32, seed=20 + layer)
        out, lse = mla.mla_decode(q, cache, block_table, lens, ref.softmax_scale(), metadata=md, backend=backend)
        check_against_reference(out, lse, q, cache, block_table, lens, ref.softmax_scale(), True)
    md.check()
    with pytest.raises(ValueError, match="metadata was made for B = 3, max_pages = .*, s_q = 2, num_heads = 32"):
        mla.mla_decode(query(3, 2, 16), cache, block_table, lens, ref.softmax_scale(), metadata=md, backend=backend)
    with pytest.raises(TypeError, match="metadata must be the MlaMetadata"):
        mla.mla_decode(query(3, 2, 32), cache, block_table, lens, ref.softmax_scale(), metadata=tuple(md)[:3],
                       backend=backend)


# --- the metadata contract: inputs other than the metadata's ------------------------------------

MISMATCHES = ["longer-single-item", "shorter-multi-item", "page-swapped-single-item", "page-changed-multi-item"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MISMATCHES)
def test_inputs_other_than_the_metadatas_give_nan_rows_and_a_flag(backend, kind):
    """Metadata made for one step, used with lengths or a block table that changed afterwards: the
    changed batch's rows are NaN (the others exact), the error flag names it and check() raises. Batch 1
    is a single-item batch (the split pass finishes it), batch 2 a multi-item one (the combine does)."""
    # 40, 2 and 300 blocks: batch 1 is one item and batch 2 several both here (4 parts on a CPU) and on a
    # GPU (an item per SM)
    cache, block_table, lens = paged_cache([2560, 128, 19200], seed=13, extra_pages=8)
    md = mla.get_mla_metadata(lens, block_table, cache.shape[0], 1, 16)
    counts = md.item_offsets.diff().tolist()
    assert counts[1] == 1 and counts[2] > 1, counts
    b = 1 if "single" in kind else 2
    lens2, table2 = lens.clone(), block_table.clone()
    if kind.startswith("longer"):
        lens2[b] += 1
    elif kind.startswith("shorter"):
        lens2[b] -= 70
    elif kind.startswith("page-swapped"):
        table2[b, 0], table2[b, 1] = block_table[b, 1], block_table[b, 0]
    else:
        table2[b, 5] = int(block_table[:, 0].max()) + 1  # another valid page
    q = query(3, 1, 16)
    md.check()  # nothing wrong yet
    out, lse = twice_poisoned(lambda: mla.mla_decode(q, cache, table2, lens2, ref.softmax_scale(), metadata=md,
                                                     backend=backend))
    assert torch.isnan(out[b].float()).all() and torch.isnan(lse[b]).all()
    good = [i for i in range(3) if i != b]
    want, want_lse = ref.mla_decode(q.cpu(), cache.cpu(), block_table.cpu(), lens.cpu(), ref.softmax_scale())
    check_against_reference(out[good], lse[good], q[good], cache, block_table[good], lens[good],
                            ref.softmax_scale(), True)
    assert md.error.tolist() == [ref.ERROR_MISMATCH, b]
    with pytest.raises(ValueError, match=f"other than those get_mla_metadata made.*first is batch {b}"):
        md.check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_for_another_cache_or_shape_is_refused_on_the_host(backend):
    cache, block_table, lens = paged_cache([100, 30])
    md = mla.get_mla_metadata(lens, block_table, cache.shape[0], 1, 16)
    q = query(2, 1, 16)
    scale = ref.softmax_scale()
    with pytest.raises(ValueError, match=f"num_pages = {cache.shape[0]}.*num_pages = {cache.shape[0] - 1}"):
        mla.mla_decode(q, cache[:-1], block_table, lens, scale, metadata=md, backend=backend)
    with pytest.raises(ValueError, match="max_pages = 3.*max_pages = 2"):
        mla.mla_decode(q, cache, block_table[:, :2].contiguous(), lens, scale, metadata=md, backend=backend)
    with pytest.raises(ValueError, match="metadata was made for B = 2"):
        mla.mla_decode(q[:1], cache, block_table[:1], lens[:1], scale, metadata=md, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_batch", [0, 1], ids=["split-batch", "single-item-batch"])
def test_an_invalid_batch_becomes_nan_and_check_raises(backend, bad_batch):
    """No host sync: the device-side check poisons only the offending batch, whether the combine
    finishes it (batch 0: two items) or the split pass does (batch 1: one block, one item)."""
    cache, block_table, lens = paged_cache([100, 30])
    bad_table = block_table.clone()
    bad_table[bad_batch, 0] = 10_000
    md = mla.get_mla_metadata(lens, bad_table, cache.shape[0], 1, 16)
    assert md.item_offsets.tolist() == [0, 2, 3]
    out, lse = twice_poisoned(lambda: mla.mla_decode(query(2, 1, 16), cache, bad_table, lens, ref.softmax_scale(),
                                                     metadata=md, backend=backend))
    good = 1 - bad_batch
    assert torch.isnan(out[bad_batch].float()).all() and torch.isnan(lse[bad_batch]).all()
    assert torch.isfinite(out[good].float()).all() and torch.isfinite(lse[good]).all()
    with pytest.raises(ValueError, match=f"invalid when get_mla_metadata ran.*first is batch {bad_batch}"):
        md.check()
    # The call without metadata (its work list made inside) flags the same batch, and only it.
    q = query(2, 1, 16)
    out, lse = twice_poisoned(lambda: mla.mla_decode(q, cache, bad_table, lens, ref.softmax_scale(),
                                                     backend=backend))
    assert torch.isnan(out[bad_batch].float()).all() and torch.isnan(lse[bad_batch]).all()
    check_against_reference(out[good:good + 1], lse[good:good + 1], q[good:good + 1], cache, block_table[good:good + 1],
                            lens[good:good + 1], ref.softmax_scale(), True)


def test_validate_names_the_invalid_entry():
    cache, block_table, lens = paged_cache([100, 30])
    meta = mla.get_mla_metadata
    bad_table = block_table.clone()
    bad_table[1, 0] = cache.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = .* points outside the cache"):
        meta(lens, bad_table, cache.shape[0], 1, 16, validate=True)
    too_long = lens.clone()
    too_long[0] = block_table.shape[1] * 64 + 1
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = .* more than block_table covers"):
        meta(too_long, block_table, cache.shape[0], 1, 16, validate=True)
    with pytest.raises(ValueError, match="less than s_q"):
        meta(torch.tensor([1, 30], dtype=torch.int32, device=DEVICE), block_table, cache.shape[0], 2, 16,
             validate=True)


# --- the op contract ---------------------------------------------------------------------------

def test_ops_pass_torch_library_opcheck():
    cache, block_table, lens = paged_cache([100, 30], device="cpu")
    q = query(2, 2, 16).cpu()
    md = ref.schedule(lens, block_table, cache.shape[0], 2, 4)
    ops = torch.ops.dskernels
    torch.library.opcheck(ops.get_mla_metadata, (lens, block_table, cache.shape[0], 2, 4, "reference"))
    torch.library.opcheck(ops.mla_decode, (q, cache, block_table, lens, *md, 0.1, True, "reference"))
    kv = torch.randn(2, 1, 512).to(torch.bfloat16)
    pe = torch.randn(2, 1, 64).to(torch.bfloat16)
    torch.library.opcheck(ops.mla_append_to_cache, (cache.clone(), block_table, lens, kv, pe, "reference"))


@pytest.mark.parametrize("backend", ["reference", *available(BACKENDS)] if ON_GPU else ["reference"])
def test_decode_loop_compiles_with_torch_compile_fullgraph(backend):
    """The documented step (append, metadata once, a decode per layer) as one graph."""
    cache, block_table, lens = paged_cache([100, 70], seed=6, extra_pages=4)
    caches = [cache, cache.clone()]
    q = [query(2, 1, 16, seed=s) for s in (1, 2)]
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 1, 512, generator=g).to(torch.bfloat16).to(DEVICE)
    pe = torch.randn(2, 1, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    append = "auto" if backend != "reference" else "reference"
    meta = "auto" if backend != "reference" else "reference"

    def step(caches, lens):
        new = [mla.append_to_cache(c, block_table, lens, kv, pe, backend=append) for c in caches][0]
        md = mla.get_mla_metadata(new, block_table, caches[0].shape[0], 1, 16, backend=meta)
        return [mla.mla_decode(ql, c, block_table, new, 0.1, metadata=md, backend=backend)
                for ql, c in zip(q, caches)]
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled([c.clone() for c in caches], lens)
    want = step([c.clone() for c in caches], lens)
    for (o, l), (wo, wl) in zip(got, want):
        assert torch.equal(o, wo) and torch.equal(l, wl)


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
    for value, error, rule in [(float("nan"), ValueError, "finite"), (-0.1, ValueError, "> 0"),
                               (0.0, ValueError, "> 0"), ("0.1", TypeError, "real number"),
                               (True, TypeError, "real number")]:
        with pytest.raises(error, match=f"softmax_scale must be .*{rule}"):
            dec(q, cache, block_table, lens, value)
    with pytest.raises(TypeError, match="causal must be a bool"):
        dec(q, cache, block_table, lens, scale, 1)
    meta = mla.get_mla_metadata
    with pytest.raises(TypeError, match="num_pages must be an int"):
        meta(lens, block_table, True, 1, 16)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        meta(lens, block_table, cache.shape[0], 1, 0)
    md = meta(lens, block_table, np.int64(cache.shape[0]), np.int32(1), np.int64(16))  # NumPy integers are ints
    assert md.num_heads == 16 and isinstance(md.num_heads, int)
    with pytest.raises(ValueError, match="kv_latent must have shape"):
        mla.append_to_cache(cache, block_table, lens, torch.zeros(2, 1, 576, dtype=torch.bfloat16, device=DEVICE),
                            torch.zeros(2, 1, 64, dtype=torch.bfloat16, device=DEVICE))


def test_absorption_and_scale_arguments_are_checked():
    g = torch.Generator().manual_seed(0)
    q_nope = torch.randn(2, 1, 4, 128, generator=g)
    wkv_b = torch.randn(4 * 256, 512, generator=g)
    assert mla.absorb_query(q_nope, wkv_b).shape == (2, 1, 4, 512)
    with pytest.raises(ValueError, match=r"wkv_b must be \[H \* 256, 512\] = \[1024, 512\] for H = 4"):
        mla.absorb_query(q_nope, wkv_b[:512])
    with pytest.raises(ValueError, match=r"q_nope must be \[B, s, H, 128\]"):
        mla.absorb_query(q_nope[..., :64], wkv_b)
    with pytest.raises(TypeError, match="wkv_b must have dtype"):
        mla.absorb_query(q_nope, wkv_b.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"o_latent must be \[B, s, H, 512\]"):
        mla.absorb_output(q_nope, wkv_b)
    with pytest.raises(ValueError, match="qk_head_dim must be >= 1"):
        mla.softmax_scale(qk_head_dim=0)
    with pytest.raises(ValueError, match="rope_factor must be > 0"):
        mla.softmax_scale(rope_factor=-2.0)
    with pytest.raises(TypeError, match="qk_head_dim must be an int"):
        mla.softmax_scale(qk_head_dim=192.0)


def test_softmax_scale_is_deepseek_v3s():
    """The values DeepSeek-V3's attention uses: 1/sqrt(192) at the trained context, and with its YaRN
    config (rope_factor 40, mscale 1.0) 0.13523377886 (pinned: the square of mscale and ln, not log10)."""
    assert mla.softmax_scale() == pytest.approx(0.07216878364870322, rel=1e-12)
    assert mla.softmax_scale(rope_factor=40.0) == pytest.approx(0.1352337788608801, rel=1e-12)
    assert mla.softmax_scale(rope_factor=1.0, mscale=0.5) == mla.softmax_scale()  # not stretched: no YaRN term


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cuda"])
def test_cuda_refuses_the_fp8_cache(backend):
    cache, block_table, lens = paged_cache([100, 30])
    with pytest.raises(ValueError, match="mla_decode_fp8_cache has no cuda implementation"):
        mla.mla_decode(query(2, 1, 16), to_fp8_cache(cache), block_table, lens, ref.softmax_scale(), backend=backend)
