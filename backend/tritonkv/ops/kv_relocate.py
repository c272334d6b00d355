"""Changes to cached KV that eviction needs (cache/kv_cache_manager.py ``KVOp``), every layer
at once: copy whole blocks, and turn cached keys by a number of rotary positions.

A rotation by ``delta`` applies RoPE at position ``|delta|`` (sine negated for a negative
delta) to keys already rotated at their own position: rotations compose, so a key rotated at
``a`` and then by ``delta`` equals (up to float rounding) the key rotated at ``a + delta``.
Plain torch ops on whatever device the cache is on (a handful of launches per op, only on
steps that evict); 8-bit caches are not supported (their scales would need requantising).
"""

from __future__ import annotations

import torch


def all_layers(caches: list[torch.Tensor]) -> torch.Tensor:
    """``[layers, num_blocks, block_size, kv_heads, head_dim]`` view over every layer's cache
    (the layers are views into one storage at a constant stride, cache/allocate.py)."""
    first = caches[0]
    if len(caches) == 1:
        return first.unsqueeze(0)
    stride = (caches[1].data_ptr() - first.data_ptr()) // first.element_size()
    for i, c in enumerate(caches):
        if c.data_ptr() != first.data_ptr() + i * stride * first.element_size() or c.stride() != first.stride():
            raise ValueError("KV cache layers are not evenly strided views of one storage")
    return first.as_strided((len(caches), *first.shape), (stride, *first.stride()), first.storage_offset())


def _index(values, device) -> torch.Tensor:
    """Host ints on ``device`` without a host sync (pinned, asynchronous on CUDA)."""
    t = torch.as_tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def copy_blocks(kv_caches, src: list[int], dst: list[int]) -> None:
    s, d = _index(src, kv_caches[0][0].device), _index(dst, kv_caches[0][0].device)
    for part in (0, 1):
        view = all_layers([c[part] for c in kv_caches])
        view[:, d] = view[:, s]


def rotate_keys(kv_caches, slots, delta: int, cos_sin: torch.Tensor) -> None:
    """Turn the keys at ``slots`` (block * block_size + offset) by ``delta`` positions."""
    k = all_layers([c[0] for c in kv_caches])
    dev = k.device
    block_size, head_dim = k.shape[2], k.shape[-1]
    half = head_dim // 2
    idx = _index(slots, dev)
    blk, off = idx // block_size, idx % block_size
    remaining = abs(delta)
    step_max = cos_sin.shape[0] - 1
    while remaining:
        step = min(remaining, step_max)
        remaining -= step
        cs = cos_sin[step]
        cos = torch.cat((cs[:half], cs[:half])).to(k.dtype)
        sin = torch.cat((cs[half:], cs[half:])).to(k.dtype) * (1 if delta > 0 else -1)
        x = k[:, blk, off]  # [layers, n, kv_heads, head_dim]
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        k[:, blk, off] = x * cos + rot * sin
