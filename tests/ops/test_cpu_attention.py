"""The batched CPU attention equals the plain reference on random mixed batches."""

import pytest
import torch

from tritonkv.ops.cpu_attention import paged_attention_cpu
from tritonkv.ops.paged_attention import paged_attention_reference


@pytest.mark.parametrize("group,window,sinks", [(1, None, 0), (4, None, 0), (2, 7, 0), (2, 7, 3)])
def test_mixed_decode_and_extend_batch_matches_reference(group, window, sinks):
    g = torch.Generator().manual_seed(group * 100 + (window or 0) + sinks)
    kv_heads, dim, bs, blocks = 2, 16, 4, 64
    q_lens, ctx = [1, 5, 1, 1, 9, 1], [13, 5, 1, 30, 20, 8]
    k_cache = torch.randn(blocks, bs, kv_heads, dim, generator=g)
    v_cache = torch.randn(blocks, bs, kv_heads, dim, generator=g)
    perm = torch.randperm(blocks, generator=g)
    width = max(-(-c // bs) for c in ctx)
    tables = torch.stack([perm[i * width:(i + 1) * width] for i in range(len(ctx))]).int()
    q = torch.randn(sum(q_lens), kv_heads * group, dim, generator=g)
    starts = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor(ctx, dtype=torch.int32)
    args = (q, k_cache, v_cache, tables, seq_lens, starts, 0.25, window, sinks)
    ref = paged_attention_reference(*args)
    ours = paged_attention_cpu(*args)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_decode_attention_mass_from_the_same_probabilities_matches_reference():
    from tritonkv.ops.attention_mass import attention_mass_reference
    from tritonkv.ops.dispatch import paged_attention

    g = torch.Generator().manual_seed(7)
    k_cache = torch.randn(32, 4, 2, 16, generator=g)
    v_cache = torch.randn(32, 4, 2, 16, generator=g)
    tables = torch.randperm(32, generator=g)[:15].view(3, 5).int()
    seq_lens = torch.tensor([13, 20, 2], dtype=torch.int32)
    starts = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    q = torch.randn(3, 4, 16, generator=g)
    out, mass = paged_attention(q, k_cache, v_cache, tables, seq_lens, starts, 0.25, max_query_len=1,
                                return_attention_mass=True, impl="cpu")
    ref = attention_mass_reference(q, k_cache, tables, seq_lens, starts, 0.25)
    assert mass.shape == (3, 20)  # the table's width in tokens
    torch.testing.assert_close(mass, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, paged_attention_reference(q, k_cache, v_cache, tables, seq_lens, starts, 0.25))
