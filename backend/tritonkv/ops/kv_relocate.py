"""Changes to cached KV that eviction needs (cache/kv_cache_manager.py ``KVOp``), every layer
at once: a block's re-rotated copy, and keys re-rotated in place, by a number of rotary positions.

A re-rotation by ``delta`` applies RoPE at position ``|delta|`` (sine negated for a negative delta)
to keys already rotated at their own position: rotations compose, so a key rotated at ``a``
and then by ``delta`` equals (up to one rounding: float32 math) the key rotated at
``a + delta``.
Plain torch ops on whatever device the cache is on (a handful of launches per call, only on
steps that evict); 8-bit caches are not supported (their scales would need requantising).
``copy_rerotated_blocks_batched``: every re-rotated copy of a step in one call, each block with its own
delta (an h2o eviction re-rotates ~25 groups of heavy hitters per sequence, each with its own
total: one call per group was ~18 launches each, ~400 calls on a step where 16 sequences
evict together); the same float32 math per element, so the same bits as ``copy_rerotated_blocks``.
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


def _rerotated(x: torch.Tensor, delta: int, cos_sin: torch.Tensor) -> torch.Tensor:
    """``x`` [..., head_dim] keys re-rotated by ``delta`` positions (float32 math, one rounding)."""
    half = x.shape[-1] // 2
    out = x.float()
    remaining = abs(delta)
    while remaining:
        step = min(remaining, cos_sin.shape[0] - 1)
        remaining -= step
        cs = cos_sin[step].float()
        cos = torch.cat((cs[:half], cs[:half]))
        sin = torch.cat((cs[half:], cs[half:])) * (1 if delta > 0 else -1)
        out = out * cos + torch.cat((-out[..., half:], out[..., :half]), dim=-1) * sin
    return out.to(x.dtype)


def copy_rerotated_blocks(kv_caches, src: list[int], dst: list[int], delta: int, cos_sin: torch.Tensor) -> None:
    """Blocks ``dst[i]`` = blocks ``src[i]`` with their keys re-rotated by ``delta`` positions
    (values copied as they are)."""
    dev = kv_caches[0][0].device
    s, d = _index(src, dev), _index(dst, dev)
    k = all_layers([c[0] for c in kv_caches])
    v = all_layers([c[1] for c in kv_caches])
    k[:, d] = _rerotated(k[:, s], delta, cos_sin)
    v[:, d] = v[:, s]


def copy_rerotated_blocks_batched(kv_caches, src: list[int], dst: list[int], deltas: list[int],
                        cos_sin: torch.Tensor) -> None:
    """Blocks ``dst[i]`` = blocks ``src[i]`` with their keys re-rotated by ``deltas[i]`` positions
    (values copied), every block at once; each ``|deltas[i]|`` below the rotary table's length
    (``copy_rerotated_blocks`` takes the others)."""
    dev = kv_caches[0][0].device
    if any(abs(t) >= cos_sin.shape[0] for t in deltas):
        raise ValueError("a re-rotation past the rotary table: use copy_rerotated_blocks")
    s, d, dl = _index(src, dev), _index(dst, dev), _index(deltas, dev)
    k = all_layers([c[0] for c in kv_caches])
    v = all_layers([c[1] for c in kv_caches])
    x = k[:, s]  # [layers, n, block_size, kv_heads, head_dim]
    half = x.shape[-1] // 2
    cs = cos_sin[dl.abs()].float()  # [n, head_dim]: cos | sin of each block's |delta|
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1)
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1) * torch.where(dl > 0, 1.0, -1.0)[:, None]
    cos, sin = cos[None, :, None, None, :], sin[None, :, None, None, :]
    out = x.float()
    out = out * cos + torch.cat((-out[..., half:], out[..., :half]), dim=-1) * sin
    if 0 in deltas:  # a zero re-rotation is a plain copy (as in copy_rerotated_blocks)
        out = torch.where((dl == 0)[None, :, None, None, None], x.float(), out)
    k[:, d] = out.to(x.dtype)
    v[:, d] = v[:, s]


def rotate_keys(kv_caches, slots, delta: int, cos_sin: torch.Tensor) -> None:
    """Re-rotate the keys at ``slots`` (block * block_size + offset) by ``delta`` positions, in place."""
    k = all_layers([c[0] for c in kv_caches])
    idx = _index(slots, k.device)
    blk, off = idx // k.shape[2], idx % k.shape[2]
    k[:, blk, off] = _rerotated(k[:, blk, off], delta, cos_sin)
