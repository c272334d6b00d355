"""Attention mass (H2O heavy-hitter eviction): torch reference, used on CPU and as the oracle of
kernels/attention_mass.py.

For each decode row, the softmax probability of every key summed over all query heads,
``[num_seqs, max_len]`` float32 (0 past ``seq_lens`` and outside the window); a row sums to the
number of query heads. Layout and visibility rules: ops/paged_attention.py.
"""

from __future__ import annotations

import torch

from tritonkv.ops.paged_attention import gather_kv, visibility_mask


def attention_mass_reference(
    q, k_cache, block_tables, seq_lens, query_start_loc, scale,
    sliding_window=None, num_sink_tokens=0, *, max_len=None, k_dequant=None,
):
    """Torch oracle for ``attention_mass_triton`` (decode rows only). ``k_dequant``: a float
    cache to use instead of ``k_cache`` (for quantised caches)."""
    kc = k_dequant if k_dequant is not None else k_cache
    page, num_kv_heads = kc.shape[1], kc.shape[2]
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    if max_len is None:
        max_len = block_tables.shape[1] * page
    mass = torch.zeros(seq_lens.shape[0], max_len, dtype=torch.float32, device=q.device)
    starts = query_start_loc.tolist()
    for i, ctx in enumerate(seq_lens.tolist()):
        if starts[i + 1] == starts[i]:
            continue
        t = starts[i + 1] - 1
        k = gather_kv(kc, block_tables[i], ctx).float().repeat_interleave(group, dim=1)
        qi = q[t].float()
        s = torch.einsum("hd,khd->hk", qi, k) * scale
        mask = visibility_mask(torch.tensor([ctx - 1], device=q.device), ctx, sliding_window, num_sink_tokens)[0]
        s = s.masked_fill(~mask[None], float("-inf"))
        mass[i, :ctx] = torch.softmax(s, dim=-1).sum(0)
    return mass


def last_query_mass(q, k_cache, block_tables, seq_lens, query_start_loc, scale, num_blocks: int):
    """Batched torch (any device, no host sync): the mass of each sequence's *last* query row
    over its first ``num_blocks`` table blocks, ``[num_seqs, num_blocks * block_size]`` float32;
    every cached key below ``seq_lens`` is visible (no window). Equals
    ``attention_mass_reference`` for those rows."""
    num_seqs = seq_lens.shape[0]
    page, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    tables = block_tables[:, :num_blocks].long()
    k = k_cache[tables].reshape(num_seqs, num_blocks * page, num_kv_heads, head_dim).float()
    last = query_start_loc[1:].long() - 1
    qd = q[last].float().view(num_seqs, num_kv_heads, group, head_dim)
    s = torch.einsum("sngd,sknd->sngk", qd, k) * scale
    visible = torch.arange(num_blocks * page, device=q.device)[None, :] < seq_lens[:, None]
    s.masked_fill_(~visible[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1).sum(dim=(1, 2))
