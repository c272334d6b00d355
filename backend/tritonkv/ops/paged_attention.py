"""Attention over the paged KV cache: torch reference, used on CPU and as the kernels' oracle.

Layout rules (shared by every op, kernel and the block pool):
- A layer's cache is two tensors ``k_cache`` / ``v_cache`` of shape
  ``[num_blocks, block_size, num_kv_heads, head_dim]``.
- Token ``p`` of a sequence lives in block ``block_table[p // block_size]`` at offset
  ``p % block_size``; its *slot* is ``block_id * block_size + offset``.
- A batch is flattened: ``q`` is ``[num_tokens, num_heads, head_dim]`` and sequence ``i`` owns
  query rows ``query_start_loc[i]:query_start_loc[i+1]``. Those rows are the *last* ``q_len``
  tokens of a context of ``seq_lens[i]`` tokens (already written to the cache), so query row
  ``j`` sits at position ``seq_lens[i] - q_len + j`` and attends to positions ``<=`` its own.
  Decode is ``q_len == 1``; prefill of a fresh prompt is ``q_len == seq_lens[i]``.
- GQA: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
- ``sliding_window`` w (optional): position ``p`` sees keys in ``(p - w, p]``.
- ``num_sink_tokens`` s (optional, only with a window): the first ``s`` positions stay visible.
"""

from __future__ import annotations

import torch


def write_kv_reference(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into their slots.

    A slot of -1 means "do not store" (padding)."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blk, off = slots // block_size, slots % block_size  # (indexing works on any cache strides)
    k_cache[blk, off] = key[keep].to(k_cache.dtype)
    v_cache[blk, off] = value[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence as ``[length, num_kv_heads, head_dim]``."""
    block_size = cache.shape[1]
    num_used = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_used].long()]
    return blocks.reshape(num_used * block_size, *cache.shape[2:])[:length]


def visibility_mask(
    q_positions: torch.Tensor,
    k_len: int,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
) -> torch.Tensor:
    """Boolean ``[q_len, k_len]``: True where the query may attend the key."""
    k_pos = torch.arange(k_len, device=q_positions.device)
    qp = q_positions[:, None]
    mask = k_pos[None, :] <= qp
    if sliding_window is not None:
        in_window = k_pos[None, :] > qp - sliding_window
        if num_sink_tokens:
            in_window |= k_pos[None, :] < num_sink_tokens
        mask &= in_window
    return mask


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_sink_tokens: int = 0,
) -> torch.Tensor:
    """Output ``[num_tokens, num_heads, head_dim]`` in ``q``'s dtype; math in float32."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, ctx_len in enumerate(lens):
        q_lo, q_hi = starts[i], starts[i + 1]
        q_len = q_hi - q_lo
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], ctx_len).float()
        v = gather_kv(v_cache, block_tables[i], ctx_len).float()
        k = k.repeat_interleave(group, dim=1)  # [ctx, H, D]
        v = v.repeat_interleave(group, dim=1)
        qi = q[q_lo:q_hi].float()  # [q_len, H, D]
        positions = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        mask = visibility_mask(positions, ctx_len, sliding_window, num_sink_tokens)
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        scores = scores.masked_fill(~mask[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_lo:q_hi] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out
