"""Eviction's device ops: turning cached keys by a number of rotary positions equals rotating
them at the summed position; block copies cover every layer, K and V; the batched
last-query attention mass equals the reference oracle."""

import pytest
import torch

from tritonkv.cache.allocate import allocate_kv_caches
from tritonkv.model.model_config import ModelConfig
from tritonkv.model.rope import inverse_frequencies
from tritonkv.ops.attention_mass import attention_mass_reference, last_query_mass
from tritonkv.ops.fused_ops import rotary_cos_sin, rotary_qk_reference
from tritonkv.ops.kv_relocate import all_layers, rotate_keys, copy_rerotated_blocks, copy_rerotated_blocks_batched

CFG = ModelConfig("LlamaForCausalLM", vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256,
                  rope_theta=10000.0)


def table():
    inv, scaling = inverse_frequencies(CFG.head_dim, CFG.rope_theta, {})
    return rotary_cos_sin(inv, CFG.max_position_embeddings, scaling)


def rotated_at(keys, position, cos_sin):
    """keys [n, kv_heads, head_dim] rotated at ``position`` as the model's rotary does."""
    n = keys.shape[0]
    qkv = torch.zeros(n, (CFG.num_heads + 2 * CFG.num_kv_heads) * CFG.head_dim)
    k0 = CFG.num_heads * CFG.head_dim
    qkv[:, k0:k0 + CFG.num_kv_heads * CFG.head_dim] = keys.reshape(n, -1)
    rotary_qk_reference(qkv, torch.full((n,), position), cos_sin, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim)
    return qkv[:, k0:k0 + CFG.num_kv_heads * CFG.head_dim].view_as(keys)


def test_rotating_by_delta_equals_rotating_at_the_sum():
    torch.manual_seed(0)
    caches = allocate_kv_caches(CFG, 6, 4, torch.float32, "cpu")
    assert all_layers([c[0] for c in caches]).shape == (3, 6, 4, 2, 16)
    cs = table()
    raw = torch.randn(3, 4, 2, 16)  # one block's keys per layer
    for layer, (k, _) in enumerate(caches):
        k[2] = rotated_at(raw[layer], 5, cs)
        k[4] = raw[layer]  # a block that must not move
    before4 = torch.stack([k[4].clone() for k, _ in caches])
    rotate_keys(caches, [8, 9, 10, 11], 37, cs)  # block 2: 5 -> 42
    for layer, (k, _) in enumerate(caches):
        torch.testing.assert_close(k[2], rotated_at(raw[layer], 42, cs), atol=2e-5, rtol=1e-5)
    rotate_keys(caches, [8, 9, 10, 11], -40, cs)  # and back to 2
    for layer, (k, _) in enumerate(caches):
        torch.testing.assert_close(k[2], rotated_at(raw[layer], 2, cs), atol=2e-5, rtol=1e-5)
    assert torch.equal(torch.stack([k[4] for k, _ in caches]), before4)


def test_copy_rerotated_blocks_turns_keys_and_copies_values_of_every_layer():
    torch.manual_seed(1)
    caches = allocate_kv_caches(CFG, 6, 4, torch.float32, "cpu")
    cs = table()
    for k, v in caches:
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    before = [(k.clone(), v.clone()) for k, v in caches]
    copy_rerotated_blocks(caches, [1, 3], [5, 0], 9, cs)
    for (k, v), (k0, v0) in zip(caches, before):
        for src, dst in ((1, 5), (3, 0)):
            assert torch.equal(v[dst], v0[src])
            # a key rotated at a re-rotated by 9 = the key rotated at a + 9 (here: a = 0, unrotated)
            torch.testing.assert_close(k[dst], rotated_at(k0[src], 9, cs), atol=2e-5, rtol=1e-5)
        assert torch.equal(k[1], k0[1]) and torch.equal(k[2], k0[2])  # sources unchanged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_turns_equal_one_call_per_delta_bit_for_bit(dtype):
    """One call for blocks with their own deltas (positive, negative, zero, the table's
    last) gives the same bits as one ``copy_rerotated_blocks`` call per delta; other blocks untouched."""
    torch.manual_seed(3)
    cs = table()
    ops = [([1, 2], [7, 8], 9), ([3], [9], -40), ([4], [10], 0), ([5], [11], cs.shape[0] - 1)]
    one, many = (allocate_kv_caches(CFG, 12, 4, dtype, "cpu") for _ in range(2))
    for (k, v), (k2, v2) in zip(one, many):
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        k2.copy_(k)
        v2.copy_(v)
    for src, dst, delta in ops:
        copy_rerotated_blocks(one, src, dst, delta, cs)
    copy_rerotated_blocks_batched(many, [b for o in ops for b in o[0]], [b for o in ops for b in o[1]],
                        [o[2] for o in ops for _ in o[0]], cs)
    for (k, v), (k2, v2) in zip(one, many):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ValueError, match="rotary table"):
        copy_rerotated_blocks_batched(many, [1], [7], [cs.shape[0]], cs)


def test_turning_in_bfloat16_rounds_once_per_turn_from_the_source():
    """A copy recomputed from its source with the total angle stays one rounding from the
    exact key; turning the same bf16 key in place 200 times drifts."""
    torch.manual_seed(3)
    cs = table()
    caches = allocate_kv_caches(CFG, 4, 4, torch.bfloat16, "cpu")
    raw = torch.randn(4, 2, 16)
    for k, _ in caches:
        k[0] = raw.to(torch.bfloat16)
        k[2] = raw.to(torch.bfloat16)
    for n in range(1, 201):
        copy_rerotated_blocks(caches, [0], [1], n, cs)  # from the source, total n
        rotate_keys(caches, [8, 9, 10, 11], 1, cs)  # in place, 1 at a time
    exact = rotated_at(caches[0][0][0].float(), 200, cs)
    from_source = (caches[0][0][1].float() - exact).abs().max()
    in_place = (caches[0][0][2].float() - exact).abs().max()
    assert from_source <= 0.02 and in_place > 3 * from_source


def test_last_query_mass_equals_the_reference():
    torch.manual_seed(2)
    k_cache = torch.randn(10, 4, 2, 16)
    tables = torch.tensor([[3, 7, 1, 0], [9, 2, 0, 0], [5, 6, 8, 4]], dtype=torch.int32)
    lens = torch.tensor([11, 5, 16], dtype=torch.int32)
    qsl = torch.tensor([0, 3, 4, 9], dtype=torch.int32)  # an extend chunk, a decode row, a chunk
    q = torch.randn(9, 4, 16)
    ours = last_query_mass(q, k_cache, tables, lens, qsl, 0.25, 4)
    ref = attention_mass_reference(q, k_cache, tables, lens, qsl, 0.25)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.sum(1), torch.full((3,), 4.0))  # each row: one per query head
