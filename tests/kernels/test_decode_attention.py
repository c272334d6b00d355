"""Paged decode kernel vs paged_attention_reference (outputs poisoned with NaN first): head
shapes, dtypes, windows and sinks, quantised caches, kernel variants. How the kernel walks
the paged tiles (block ids, V loads, padding, page sizes) is test_decode_tiles.py."""

import pytest
import torch
from kvcase import INTERPRET, assert_matches, make_case, poison_stale_slots, poisoned_like, reference

from tritonkv.kernels.decode_attention import decode_attention_triton
from tritonkv.ops.paged_attention import paged_attention_reference
from tritonkv.ops.quant import paged_attention_quant_reference

if INTERPRET:
    LENS = [[1], [1, 17, 45, 100], [130, 33]]
    HEADS = [(4, 4), (8, 2), (8, 1)]  # GQA ratios 1, 4, 8
    # the interpreter runs one code path for both head sizes (a constexpr tile width); 128
    # is read by the quantised and variant cases below and test_decode_tiles.py's gathered ids
    HEAD_DIMS = [64]
else:
    LENS = [[1], [1, 17, 45, 1000, 4099], [32768], [513] * 64, [2047, 1, 4096, 77] * 8]
    HEADS = [(32, 32), (32, 8), (32, 4), (64, 8), (8, 1)]
    HEAD_DIMS = [64, 128]


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_bf16(lens, heads, head_dim):
    c = make_case(lens, [1] * len(lens), heads[0], heads[1], head_dim)
    ref = paged_attention_reference(*c.args())
    for splits in (None, 1, 3):
        out = decode_attention_triton(*c.args(), out=poisoned_like(c.q), num_splits=splits)
        assert_matches(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_dtypes(dtype):
    lens = [5, 60, 31] if INTERPRET else [5, 600, 3100, 8000]
    c = make_case(lens, [1] * len(lens), 8, 2, 64, dtype=dtype)
    ref = paged_attention_reference(*c.args())
    out = decode_attention_triton(*c.args(), out=poisoned_like(c.q))
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize("window,sinks", [(20, 0), (20, 4), (7, 1), (1, 0), (200, 3)])
def test_decode_window_sinks(window, sinks):
    lens = [1, 17, 45, 100] if INTERPRET else [1, 17, 45, 100, 3000, 9000]
    if not INTERPRET:
        window, sinks = window * 10, sinks * 3
    c = make_case(lens, [1] * len(lens), 8, 2, 64 if INTERPRET else 128)
    ref = paged_attention_reference(*c.args(), window, sinks)
    for splits in (None, 1, 2):
        out = decode_attention_triton(*c.args(), window, sinks, out=poisoned_like(c.q),
                                      num_splits=splits)
        assert_matches(out, ref, torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("granularity", ["token", "block"])
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("v_minor", [True, False])
def test_decode_quant(kv_dtype, granularity, window, v_minor):
    """v_minor: V token-minor (the engine's 8-bit layout) or token-major; stale slots of each
    last page poisoned with NaN."""
    lens = [1, 40, 99] if INTERPRET else [1, 40, 999, 8192, 4097]
    heads = (8, 2) if INTERPRET else (32, 8)
    c = make_case(lens, [1] * len(lens), *heads, 128, kv_dtype=kv_dtype, scale_mode=granularity,
                  v_minor=v_minor)
    assert (c.v_cache.stride(1) == 1) == v_minor
    poison_stale_slots(c)
    sinks = 2 if window else 0
    ref = paged_attention_quant_reference(*c.args(), window, sinks, k_scale=c.k_scale,
                                          v_scale=c.v_scale)
    out = decode_attention_triton(*c.args(), window, sinks, k_scale=c.k_scale,
                                  v_scale=c.v_scale, out=poisoned_like(c.q))
    assert_matches(out, ref, torch.bfloat16)


@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
@pytest.mark.parametrize("even", [False, True])
def test_decode_variants(kv_dtype, even):
    """Kernel variants (unmasked full tiles, fp8 computed in fp16) match the reference,
    including a tile-unaligned tail and a split that starts past seq_len."""
    lens = [1, 40, 130] if INTERPRET else [1, 40, 999, 8192, 4097, 16 * 131 + 5]
    heads = (8, 2) if INTERPRET else (32, 8)
    c = make_case(lens, [1] * len(lens), *heads, 128, kv_dtype=kv_dtype)
    ref = reference(c)
    cds = [None] if kv_dtype is None else [None, torch.float16]
    for cd in cds:
        for splits in (None, 1, 5):
            out = decode_attention_triton(*c.args(), k_scale=c.k_scale, v_scale=c.v_scale,
                                          out=poisoned_like(c.q), num_splits=splits, even=even,
                                          compute_dtype=cd)
            assert_matches(out, ref, torch.bfloat16)
