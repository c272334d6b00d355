"""Paged attention for the CPU serving path: the reference's function, batched.

Decode rows (one query token per sequence) of a step run as one batched product over the
gathered, padded contexts; extend chunks run per sequence through SDPA with an explicit mask.
``paged_attention_reference`` stays the plain oracle; tests hold this one equal to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tritonkv.ops.paged_attention import gather_kv, visibility_mask


def paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        sliding_window=None, num_sink_tokens=0, return_attention_mass=False):
    """``return_attention_mass``: also the decode rows' attention mass (ops/attention_mass.py)
    from the same probabilities, ``[num_seqs, table width * block_size]`` (0 for extend rows);
    returns ``(out, mass)`` then."""
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    out = torch.empty_like(q)
    decode = [i for i in range(len(lens)) if starts[i + 1] - starts[i] == 1]
    mass = torch.zeros(len(lens), block_tables.shape[1] * k_cache.shape[1], dtype=torch.float32,
                       device=q.device) if return_attention_mass else None
    if decode:
        probs = _decode(q, k_cache, v_cache, block_tables, lens, starts, decode, scale, sliding_window,
                        num_sink_tokens, out)
        if return_attention_mass:
            mass[torch.tensor(decode, device=q.device), :probs.shape[-1]] = probs.sum(dim=(1, 2))
    for i in range(len(lens)):
        q_len = starts[i + 1] - starts[i]
        if q_len > 1:
            _extend_one(q, k_cache, v_cache, block_tables[i], lens[i], starts[i], q_len, scale,
                        sliding_window, num_sink_tokens, out)
    if return_attention_mass:
        return out, mass
    return out


def _decode(q, k_cache, v_cache, block_tables, lens, starts, rows, scale, window, sinks, out):
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    ctx = [lens[i] for i in rows]
    num_blocks = -(-max(ctx) // block_size)
    dev = q.device  # also serves CUDA tensors when a caller forces impl="cpu"
    seqs = torch.tensor(rows, device=dev)
    tables = block_tables[seqs, :num_blocks].long()
    n = len(rows)
    k = k_cache[tables].reshape(n, num_blocks * block_size, num_kv_heads, head_dim).float()
    v = v_cache[tables].reshape(n, num_blocks * block_size, num_kv_heads, head_dim).float()
    q_rows = torch.tensor([starts[i] for i in rows], device=dev)
    qd = q[q_rows].float().view(n, num_kv_heads, group, head_dim)
    scores = torch.einsum("sngd,sknd->sngk", qd, k) * scale
    positions = torch.tensor(ctx, device=dev)[:, None] - 1
    k_pos = torch.arange(num_blocks * block_size, device=dev)[None, :]
    mask = k_pos <= positions
    if window is not None:
        mask &= (k_pos > positions - window) | (k_pos < sinks)
    scores.masked_fill_(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.einsum("sngk,sknd->sngd", probs, v)
    out[q_rows] = o.reshape(n, num_heads, head_dim).to(q.dtype)
    return probs


def _extend_one(q, k_cache, v_cache, table, ctx_len, start, q_len, scale, window, sinks, out):
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[2]
    k = gather_kv(k_cache, table, ctx_len).float().transpose(0, 1)  # [kv_heads, ctx, D]
    v = gather_kv(v_cache, table, ctx_len).float().transpose(0, 1)
    if group > 1:
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
    qi = q[start:start + q_len].float().transpose(0, 1)  # [H, q_len, D]
    positions = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
    mask = visibility_mask(positions, ctx_len, window, sinks)
    o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
    out[start:start + q_len] = o.transpose(0, 1).to(q.dtype)
