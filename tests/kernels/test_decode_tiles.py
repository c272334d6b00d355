"""How the paged decode kernel walks a sequence's tiles, against paged_attention_reference
(outputs poisoned with NaN first): block ids read per tile or gathered per split, token-minor V
loads, block-table padding never read, sequences without a query row, pages of any size, and
the tile sizes refused."""

import math

import pytest
import torch
from kvcase import INTERPRET, assert_matches, make_case, poison_stale_slots, poisoned_like, reference

from tritonkv.kernels.decode_attention import decode_attention_triton
from tritonkv.ops.paged_attention import gather_kv, paged_attention_reference
from tritonkv.ops.quant import dequantize_cache, paged_attention_quant_reference


def _reference_lse(c):
    """log2-sum-exp2 of the scaled scores per (token, head), from the dequantised cache."""
    kd = dequantize_cache(c.k_cache, c.k_scale) if c.k_scale is not None else c.k_cache
    group = c.q.shape[1] // kd.shape[2]
    out = torch.empty(c.q.shape[0], c.q.shape[1])
    for i, n in enumerate(c.seq_lens.tolist()):
        t = int(c.query_start_loc[i + 1]) - 1
        k = gather_kv(kd, c.block_tables[i], n).float().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,khd->hk", c.q[t].float(), k) * c.scale
        out[t] = torch.logsumexp(s, dim=-1).cpu() / math.log(2)
    return out.to(c.q.device)


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("gather_ids", [True, False])
@pytest.mark.parametrize("block_n", [16, 64])
def test_decode_gather_ids(kv_dtype, gather_ids, block_n):
    """Block ids read per tile or gathered once per split (BT_GATHER), one or several splits:
    same output and log-sum-exp as the reference; stale NaN slots in a last page ignored."""
    # one token, a full page, and a partly filled last page past several tiles of either size
    lens = [1, 16, 130] if INTERPRET else [1, 16, 40, 999, 8192, 4097, 16 * 131 + 5]
    heads = (8, 2) if INTERPRET else (32, 8)
    c = make_case(lens, [1] * len(lens), *heads, 128, kv_dtype=kv_dtype)
    poison_stale_slots(c)
    ref = reference(c)
    ref_lse = _reference_lse(c)
    for splits in (1, 3):
        out = decode_attention_triton(
            *c.args(), k_scale=c.k_scale, v_scale=c.v_scale, out=poisoned_like(c.q),
            num_splits=splits, gather_ids=gather_ids, block_n=block_n)
        assert_matches(out, ref, torch.bfloat16)
    out, lse = decode_attention_triton(
        *c.args(), k_scale=c.k_scale, v_scale=c.v_scale, out=poisoned_like(c.q),
        gather_ids=gather_ids, block_n=block_n, return_lse=True)
    assert_matches(out, ref, torch.bfloat16)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("window,sinks", [(20, 0), (37, 3)])
def test_decode_gather_ids_window(window, sinks):
    """Gathered block ids with a sliding window whose start is not page aligned (16-token
    tiles over 32-token pages), with and without attention sinks."""
    lens = [1, 45, 100] if INTERPRET else [1, 45, 100, 3000, 9000]
    c = make_case(lens, [1] * len(lens), 8, 2, 64, page=32)
    ref = paged_attention_reference(*c.args(), window, sinks)
    for splits in (1, 2):
        out = decode_attention_triton(*c.args(), window, sinks, out=poisoned_like(c.q),
                                      num_splits=splits, gather_ids=True, block_n=16)
        assert_matches(out, ref, torch.bfloat16)


@pytest.mark.parametrize("window,sinks", [(None, 0), (37, 3)])
@pytest.mark.parametrize("gather_ids", [True, False])
def test_decode_v_token_minor_loads(window, sinks, gather_ids):
    """Token-minor fp8 V read in whole pages (64-token tiles over 32-token pages) or in runs
    shorter than a page (16-token tiles), with windows/sinks, one or two splits; stale NaN
    slots of each last page are ignored."""
    lens = [1, 45, 100] if INTERPRET else [1, 45, 100, 3000, 9000]
    c = make_case(lens, [1] * len(lens), 8, 2, 64, page=32, kv_dtype=torch.float8_e4m3fn,
                  v_minor=True)
    poison_stale_slots(c)
    ref = paged_attention_quant_reference(*c.args(), window, sinks, k_scale=c.k_scale,
                                          v_scale=c.v_scale)
    for block_n in (16, 64):
        for splits in (1, 2):
            out = decode_attention_triton(*c.args(), window, sinks, k_scale=c.k_scale,
                                          v_scale=c.v_scale, out=poisoned_like(c.q),
                                          num_splits=splits, gather_ids=gather_ids,
                                          block_n=block_n)
            assert_matches(out, ref, torch.bfloat16)



@pytest.mark.parametrize("pad", ["nan", "out_of_range"])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
def test_decode_never_reads_block_table_padding(pad, kv_dtype):
    """Block-table entries past a sequence's last block are never dereferenced: padding that
    names a NaN-filled block or ids far outside the cache leaves the output exact, with ids
    per tile or gathered per split (whose id slice runs past the sequence), whole-page or
    run V loads, one or three splits, with and without a window."""
    lens = [1, 16, 100] if INTERPRET else [1, 16, 45, 3000, 9000]
    c = make_case(lens, [1] * len(lens), 8, 2, 64, kv_dtype=kv_dtype, pad=pad)
    poison_stale_slots(c)
    kw = dict(k_scale=c.k_scale, v_scale=c.v_scale)
    for window, sinks in ((None, 0), (37, 3)):
        ref = reference(c, window, sinks)
        for gather_ids, block_n, splits in ((True, 64, 1), (True, 16, 3), (False, 64, 3)):
            out = decode_attention_triton(*c.args(), window, sinks, **kw, out=poisoned_like(c.q),
                                          num_splits=splits, gather_ids=gather_ids,
                                          block_n=block_n)
            assert_matches(out, ref, torch.bfloat16)


@pytest.mark.parametrize("q_lens", [[1, 0, 1], [1, 1, 0]])
def test_decode_sequences_without_a_query_row(q_lens):
    """A sequence with no query row this step (middle or last; the last one's row offset is
    num_tokens) reads nothing and writes nothing: the other rows match the reference with one
    split and with three (partials and log-sum-exp of the empty sequence are never stored)."""
    lens = [45, 100, 17] if INTERPRET else [45, 3000, 17]
    c = make_case(lens, q_lens, 8, 2, 64, pad="out_of_range")
    ref = paged_attention_reference(*c.args())
    for splits in (1, 3):
        out = decode_attention_triton(*c.args(), out=poisoned_like(c.q), num_splits=splits,
                                      gather_ids=True, block_n=16)
        assert_matches(out, ref, torch.bfloat16)
        out, lse = decode_attention_triton(*c.args(), out=poisoned_like(c.q), num_splits=splits,
                                           return_lse=True)
        assert_matches(out, ref, torch.bfloat16)
        assert torch.isfinite(lse).all() and lse.shape == (2, 8)


@pytest.mark.parametrize("page,block_n", [(12, 16), (24, 16), (48, 64), (16, 64), (32, 16)])
def test_decode_pages_of_any_size(page, block_n):
    """Tile slots and page indices are right whether or not the page size and the tile length
    divide each other (12-token pages with 16-token tiles, 48-token pages with 64-token tiles)."""
    lens = [1, 45, 100] if INTERPRET else [1, 45, 3000]
    c = make_case(lens, [1] * len(lens), 8, 2, 64, page=page)
    ref = reference(c)
    for splits in (1, 2):
        out = decode_attention_triton(*c.args(), out=poisoned_like(c.q), num_splits=splits,
                                      block_n=block_n, gather_ids=splits == 2)
        assert_matches(out, ref, torch.bfloat16)


@pytest.mark.parametrize("block_n", [8, 24])
def test_decode_tile_below_16_or_not_a_power_of_two_is_refused(block_n):
    """A key tile under 16 tokens cannot be a tl.dot operand on a GPU (the interpreter would
    run it, the NVIDIA backend does not compile it): refused on every device, by name."""
    c = make_case([1, 45], [1, 1], 8, 2, 64, page=16)
    with pytest.raises(ValueError, match=f"block_n must be a power of two >= 16.*got {block_n}"):
        decode_attention_triton(*c.args(), block_n=block_n)
