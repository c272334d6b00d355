"""Token-minor V pages (cache/layout.py): what the allocator hands out, and the rule that
the logical view and the physical order hold the same values."""

import pytest
import torch

from tritonkv.cache.allocate import allocate_kv_caches
from tritonkv.cache.layout import token_minor_view, use_token_minor_v, v_token_minor
from tritonkv.model.model_config import ModelConfig
from tritonkv.ops.paged_attention import gather_kv, write_kv_reference


def _cfg(head_dim):
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=64,
                       intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=head_dim, rms_norm_eps=1e-5, max_position_embeddings=64,
                       rope_theta=10000.0)


def test_layout_choice_by_dtype_and_head_dim():
    assert use_token_minor_v(torch.float8_e4m3fn, 128) and use_token_minor_v(torch.int8, 64)
    assert not use_token_minor_v(torch.bfloat16, 128)
    assert not use_token_minor_v(torch.int8, 96)  # kernels need a power-of-two head_dim there


@pytest.mark.parametrize("dtype,minor", [(torch.int8, True), (torch.float32, False)])
def test_allocator_hands_out_logical_views(dtype, minor):
    blocks, page, cfg = 5, 4, _cfg(16)
    caches = allocate_kv_caches(cfg, blocks, page, dtype, "cpu")
    assert len(caches) == 2
    for k, v in caches:
        assert k.shape == v.shape == (blocks, page, 2, 16)
        assert k.is_contiguous() and not v_token_minor(k)
        assert v_token_minor(v) == minor
        if minor:  # V's physical order is [blocks, kv_heads, head_dim, page]
            assert v.stride() == (2 * 16 * page, 1, 16 * page, page)
    # layers and K/V do not overlap: writing one leaves the others zero
    caches[1][1][3, 2, 1, 7] = 9
    assert caches[1][1].count_nonzero() == 1
    assert all(t.count_nonzero() == 0 for t in (caches[0][0], caches[0][1], caches[1][0]))


def test_token_minor_view_holds_the_written_values():
    gen = torch.Generator().manual_seed(3)
    blocks, page, heads, dim = 4, 8, 2, 16
    physical = torch.zeros(blocks, heads, dim, page)
    v = token_minor_view(physical)
    k = torch.zeros(blocks, page, heads, dim)
    key = torch.randn(11, heads, dim, generator=gen)
    value = torch.randn(11, heads, dim, generator=gen)
    slots = torch.tensor([9, 10, 11, 12, 13, 14, 15, 16, 0, 1, 2], dtype=torch.int32)
    write_kv_reference(k, v, key, value, slots)
    table = torch.tensor([1, 2, 0])
    # logical reads through the table see the written tokens in order (slot 9 = block 1 slot
    # 1 = position 1; slot 16 = block 2 slot 0 = position 8; slot 0 = block 0 = position 16)...
    got = gather_kv(v, table, 19)
    torch.testing.assert_close(got[1:9], value[:8])
    torch.testing.assert_close(got[16:19], value[8:])
    # ...and each is stored with its page's tokens contiguous per channel
    torch.testing.assert_close(physical[1, :, :, 1], value[0])
    torch.testing.assert_close(physical[2, :, :, 0], value[7])
    torch.testing.assert_close(physical[1, 1, 5, 1:], value[0:7, 1, 5])


def test_other_strides_are_refused_by_name():
    odd = torch.zeros(4, 2, 8, 16).permute(0, 3, 1, 2)  # [blocks, page, heads, dim] view, page-major mix
    odd = odd.transpose(2, 3)
    with pytest.raises(ValueError, match="KV cache strides"):
        v_token_minor(odd)


def test_token_minor_pages_need_power_of_two_sizes():
    """The kernels read token-minor pages as aligned runs: a 12-token page or a 48-wide head
    is refused by name, a 16 x 64 page is accepted."""
    assert v_token_minor(token_minor_view(torch.zeros(3, 2, 64, 16, dtype=torch.int8)))
    for page, dim in ((12, 64), (16, 48)):
        with pytest.raises(ValueError, match="power-of-two block_size and head_dim"):
            v_token_minor(token_minor_view(torch.zeros(3, 2, dim, page, dtype=torch.int8)))
