"""Paged extend / prefill kernel vs paged_attention_reference."""

import pytest
import torch
from kvcase import INTERPRET, assert_matches, make_case, poison_stale_slots, poisoned_like, reference

from tritonkv.kernels.extend_attention import extend_attention_triton
from tritonkv.ops.paged_attention import paged_attention_reference
from tritonkv.ops.quant import paged_attention_quant_reference

if INTERPRET:
    # (seq_lens, q_lens): fresh prefill, prefix + chunk, 1-token rows, an empty row
    CASES = [([37], [37]), ([5, 70, 45], [5, 23, 1]), ([50, 19], [0, 19])]
    HEADS = [(4, 4), (8, 2), (8, 1)]
    CFG = dict(block_m=32, block_n=16)
else:
    CASES = [([4096], [4096]), ([1000, 5000, 333], [1000, 1777, 1]),
             ([8192, 77, 2048] * 3, [4096, 77, 500] * 3), ([50, 19], [0, 19])]
    HEADS = [(32, 32), (32, 8), (32, 4), (8, 1)]
    CFG = {}


@pytest.mark.parametrize("lens,q_lens", CASES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_extend_bf16(lens, q_lens, heads, head_dim):
    c = make_case(lens, q_lens, heads[0], heads[1], head_dim)
    ref = paged_attention_reference(*c.args())
    out = extend_attention_triton(*c.args(), max_query_len=c.max_query_len,
                                  out=poisoned_like(c.q), **CFG)
    assert_matches(out, ref, torch.bfloat16)


def test_extend_fp16():
    lens, q_lens = ([40, 21], [17, 21]) if INTERPRET else ([3000, 2100], [1700, 2100])
    c = make_case(lens, q_lens, 8, 2, 64, dtype=torch.float16)
    ref = paged_attention_reference(*c.args())
    out = extend_attention_triton(*c.args(), out=poisoned_like(c.q), **CFG)
    assert_matches(out, ref, torch.float16)


@pytest.mark.parametrize("window,sinks", [(10, 0), (10, 3), (1, 0), (33, 20)])
def test_extend_window_sinks(window, sinks):
    lens, q_lens = ([45, 70], [45, 30]) if INTERPRET else ([4500, 7000], [4500, 3000])
    if not INTERPRET:
        window, sinks = window * 25, sinks * 4
    c = make_case(lens, q_lens, 8, 2, 64)
    ref = paged_attention_reference(*c.args(), window, sinks)
    out = extend_attention_triton(*c.args(), window, sinks, out=poisoned_like(c.q), **CFG)
    assert_matches(out, ref, torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("v_minor", [True, False])
def test_extend_quant(kv_dtype, granularity, v_minor):
    """v_minor: V stored token-minor (the engine's layout for 8-bit V) or token-major; the
    lengths leave a partly filled last page (its stale slots are poisoned with NaN)."""
    lens, q_lens = ([40, 33], [20, 33]) if INTERPRET else ([6000, 1033], [2000, 1033])
    c = make_case(lens, q_lens, 8, 2, 64, kv_dtype=kv_dtype, scale_mode=granularity,
                  v_minor=v_minor)
    poison_stale_slots(c)
    ref = paged_attention_quant_reference(*c.args(), k_scale=c.k_scale, v_scale=c.v_scale)
    out = extend_attention_triton(*c.args(), k_scale=c.k_scale, v_scale=c.v_scale,
                                  out=poisoned_like(c.q), **CFG)
    assert_matches(out, ref, torch.bfloat16)


@pytest.mark.parametrize("block_n", [16, 64])
def test_extend_v_token_minor_loads(block_n):
    """Token-minor fp8 V over 32-token pages: whole pages (64-token tiles) or runs shorter
    than a page (16-token tiles), with a window and sinks; stale NaN slots ignored."""
    lens, q_lens = ([70, 33], [30, 33]) if INTERPRET else ([6000, 1033], [2000, 1033])
    c = make_case(lens, q_lens, 8, 2, 64, page=32, kv_dtype=torch.float8_e4m3fn, v_minor=True)
    poison_stale_slots(c)
    for window, sinks in ((None, 0), (20, 3)):
        ref = paged_attention_quant_reference(*c.args(), window, sinks, k_scale=c.k_scale,
                                              v_scale=c.v_scale)
        out = extend_attention_triton(*c.args(), window, sinks, k_scale=c.k_scale,
                                      v_scale=c.v_scale, out=poisoned_like(c.q), block_m=32,
                                      block_n=block_n, num_warps=4, num_stages=2)
        assert_matches(out, ref, torch.bfloat16)



@pytest.mark.parametrize("pad", ["nan", "out_of_range"])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
def test_extend_never_reads_block_table_padding(pad, kv_dtype):
    """Block-table entries past a sequence's last block name a NaN-filled block or ids far
    outside the cache: never dereferenced (whole-page and run V loads, with a window); stale
    slots of each last page, values and per-token scales, are NaN too."""
    lens, q_lens = ([70, 33], [30, 33]) if INTERPRET else ([6000, 1033], [2000, 1033])
    c = make_case(lens, q_lens, 8, 2, 64, kv_dtype=kv_dtype, pad=pad)
    poison_stale_slots(c)
    kw = dict(k_scale=c.k_scale, v_scale=c.v_scale)
    for window, sinks in ((None, 0), (20, 3)):
        ref = reference(c, window, sinks)
        for block_n in (16, 64):
            out = extend_attention_triton(*c.args(), window, sinks, **kw, out=poisoned_like(c.q),
                                          block_m=32, block_n=block_n, num_warps=4,
                                          num_stages=2)
            assert_matches(out, ref, torch.bfloat16)
