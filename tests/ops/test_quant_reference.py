"""The 8-bit KV references of ops/quant.py (the CPU path's write and the kernels' oracle)
against the independent reference in quant_oracle.py, exactly."""

import pytest
import torch
from quant_oracle import codes, token_head_scale

from tritonkv.ops.quant import dequantize_cache, write_kv_quant_reference


@pytest.mark.parametrize("storage", [torch.int8, torch.float8_e4m3fn])
def test_written_scales_and_codes_equal_torchs_casts(storage):
    gen = torch.Generator().manual_seed(0)
    num_blocks, bs, heads, d = 4, 4, 2, 16
    key = torch.randn(6, heads, d, generator=gen) * torch.tensor([0.01, 30.0])[None, :, None]
    value = torch.randn(6, heads, d, generator=gen)
    slots = torch.tensor([5, 6, 7, -1, 12, 0])
    k_cache = torch.zeros(num_blocks, bs, heads, d, dtype=storage)
    v_cache = torch.zeros_like(k_cache)
    k_scale = torch.zeros(num_blocks, bs, heads)
    v_scale = torch.zeros_like(k_scale)
    write_kv_quant_reference(k_cache, v_cache, key, value, slots, k_scale, v_scale)
    keep = slots >= 0
    blk, off = slots[keep] // bs, slots[keep] % bs
    for cache, scale, x in ((k_cache, k_scale, key[keep]), (v_cache, v_scale, value[keep])):
        expected_scale = token_head_scale(x, storage)
        torch.testing.assert_close(scale[blk, off], expected_scale, rtol=1e-6, atol=0)
        assert torch.equal(cache[blk, off].float(), codes(x, scale[blk, off], storage).float())
        # nothing else written: slot -1 skipped, the rest untouched
        written = torch.zeros(num_blocks, bs, dtype=torch.bool)
        written[blk, off] = True
        assert (scale[~written] == 0).all() and (cache[~written].float() == 0).all()
    # dequantised = codes x scale
    deq = dequantize_cache(k_cache, k_scale)
    assert torch.equal(deq[blk, off], k_cache[blk, off].float() * k_scale[blk, off][..., None])


def test_int8_rounds_half_away_from_zero():
    x = torch.tensor([[[127.0, 2.5, -2.5, 0.5, -0.5, 1.49]]])  # scale 1: codes are x itself
    assert codes(x, torch.ones(1, 1), torch.int8).tolist() == [[[127, 3, -3, 1, -1, 1]]]
    k_cache = torch.zeros(1, 1, 1, 6, dtype=torch.int8)
    k_scale = torch.zeros(1, 1, 1)
    write_kv_quant_reference(k_cache, k_cache.clone(), x.view(1, 1, 6), x.view(1, 1, 6), torch.tensor([0]),
                             k_scale, k_scale.clone())
    assert float(k_scale) == 1.0 and k_cache.view(-1).tolist() == [127, 3, -3, 1, -1, 1]
