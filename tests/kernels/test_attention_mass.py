"""H2O attention-mass kernel vs attention_mass_reference (from decode's log-sum-exp)."""

import pytest
import torch
from kvcase import INTERPRET, make_case, rel_err

from tritonkv.kernels.attention_mass import attention_mass_triton
from tritonkv.kernels.decode_attention import decode_attention_triton
from tritonkv.ops.attention_mass import attention_mass_reference
from tritonkv.ops.quant import dequantize_cache


@pytest.mark.parametrize("window,sinks", [(None, 0), (30, 2)])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
def test_attention_mass(window, sinks, kv_dtype):
    lens = [1, 50, 77] if INTERPRET else [1, 50, 777, 4096]
    heads = (8, 2) if INTERPRET else (32, 8)
    c = make_case(lens, [1] * len(lens), *heads, 64, kv_dtype=kv_dtype)
    out, lse = decode_attention_triton(*c.args(), window, sinks, k_scale=c.k_scale,
                                       v_scale=c.v_scale, return_lse=True)
    mass = attention_mass_triton(c.q, c.k_cache, c.block_tables, c.seq_lens,
                                 c.query_start_loc, c.scale, lse, window, sinks,
                                 k_scale=c.k_scale)
    kd = dequantize_cache(c.k_cache, c.k_scale) if kv_dtype is not None else None
    ref = attention_mass_reference(c.q, c.k_cache, c.block_tables, c.seq_lens,
                                   c.query_start_loc, c.scale, window, sinks, k_dequant=kd)
    assert mass.shape == ref.shape
    assert rel_err(mass, ref) < 2e-2
    # each row sums to the number of query heads
    torch.testing.assert_close(mass.sum(1).cpu(), torch.full((len(lens),), float(heads[0])),
                               rtol=2e-2, atol=0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_lse_with_one_split_or_several_gives_the_same_mass(num_splits):
    """One split writes the log-sum-exp itself; several merge it in the reduce kernel."""
    lens = [5, 70, 33] if INTERPRET else [5, 700, 3300]
    c = make_case(lens, [1] * len(lens), 8, 2, 64)
    out, lse = decode_attention_triton(*c.args(), return_lse=True, num_splits=num_splits)
    mass = attention_mass_triton(c.q, c.k_cache, c.block_tables, c.seq_lens, c.query_start_loc, c.scale, lse)
    ref = attention_mass_reference(c.q, c.k_cache, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
    assert rel_err(mass, ref) < 2e-2
    assert rel_err(out, decode_attention_triton(*c.args(), num_splits=2)) < 2e-2


@pytest.mark.parametrize("window,sinks,num_splits", [(None, 0, 1), (None, 0, 3), (30, 2, 1), (30, 2, 2)])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
def test_mass_from_the_decode_kernels_stored_scores(window, sinks, num_splits, kv_dtype):
    """The decode kernel stores its scores; the mass read from them equals the one that
    recomputes them from K, and the decode output is unchanged."""
    lens = [1, 50, 77] if INTERPRET else [1, 50, 777, 4096]
    c = make_case(lens, [1] * len(lens), 8, 2, 64, kv_dtype=kv_dtype)
    kw = dict(k_scale=c.k_scale, v_scale=c.v_scale, return_lse=True, num_splits=num_splits)
    logits = torch.empty(len(lens), 8, c.block_tables.shape[1] * c.k_cache.shape[1], device=c.q.device)
    out, lse = decode_attention_triton(*c.args(), window, sinks, logits=logits, **kw)
    plain_out, plain_lse = decode_attention_triton(*c.args(), window, sinks, **kw)
    assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    args = (c.q, c.k_cache, c.block_tables, c.seq_lens, c.query_start_loc, c.scale, lse, window, sinks)
    from_scores = attention_mass_triton(*args, k_scale=c.k_scale, logits=logits)
    from_k = attention_mass_triton(*args, k_scale=c.k_scale)
    torch.testing.assert_close(from_scores, from_k, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("page", [16, 4])
@pytest.mark.parametrize("from_scores", [True, False])
def test_mass_added_per_block_into_the_engines_buffer(page, from_scores):
    """``block_mass=``: the kernel adds each table block's mass (the reference summed over the
    block's keys) into the caller's buffer, whatever it held; blocks past a sequence keep
    their value (tiles past seq_len exit at once)."""
    lens = [1, 50, 77] if INTERPRET else [1, 50, 777, 4096]
    c = make_case(lens, [1] * len(lens), 8, 2, 64, page=page)
    width = c.block_tables.shape[1]
    logits = torch.empty(len(lens), 8, width * page, device=c.q.device) if from_scores else None
    out, lse = decode_attention_triton(*c.args(), return_lse=True, logits=logits)
    before = torch.rand(len(lens), width + 2, device=c.q.device)  # wider than the table, as the engine's
    buf = before.clone()
    got = attention_mass_triton(c.q, c.k_cache, c.block_tables, c.seq_lens, c.query_start_loc, c.scale, lse,
                                logits=logits, block_mass=buf)
    assert got is buf
    ref = attention_mass_reference(c.q, c.k_cache, c.block_tables, c.seq_lens, c.query_start_loc, c.scale)
    want = before.clone()
    want[:, :width] += ref.view(len(lens), width, page).sum(-1)
    torch.testing.assert_close(buf, want, atol=2e-3, rtol=2e-2)
    for i, n in enumerate(lens):  # untouched past each sequence's last block
        assert torch.equal(buf[i, -(-n // page):], before[i, -(-n // page):])
