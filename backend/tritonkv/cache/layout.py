"""Physical page layouts of a layer's KV cache.

Every kernel and reference sees a cache as the logical ``[num_blocks, block_size,
num_kv_heads, head_dim]`` tensor (ops/paged_attention.py) and indexes it through strides, so
the physical order is the allocator's choice:
- token-major (K always; V of a bf16/fp16 cache): ``[blocks, block_size, kv_heads, head_dim]``,
  contiguous.
- token-minor V (fp8/int8 caches with a power-of-two head_dim): physically ``[blocks, kv_heads,
  head_dim, block_size]``, handed out as a permuted view with the logical shape.
  Rule: the P.V product pairs consecutive *tokens* of one channel in each MMA operand
  register; Hopper transposes 16-bit data on its way out of shared memory (ldmatrix.trans)
  but not 8-bit data, so a token-major fp8 V tile is read there byte by byte. With a page's
  tokens contiguous per channel the V tile reaches the MMA the way K does
  (bench/NOTES_kernels.md, run 10).
"""

from __future__ import annotations

import torch

from tritonkv.cache.quant_format import is_quantized


def use_token_minor_v(kv_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the allocator stores V token-minor for this cache dtype."""
    return is_quantized(kv_dtype) and head_dim & (head_dim - 1) == 0


def token_minor_view(physical: torch.Tensor) -> torch.Tensor:
    """``[blocks, kv_heads, head_dim, block_size]`` storage as the logical
    ``[blocks, block_size, kv_heads, head_dim]`` cache."""
    return physical.permute(0, 3, 1, 2)


def v_token_minor(cache: torch.Tensor) -> bool:
    """True when ``cache`` (logical shape) is a token-minor view; False when it is token-major
    (channels contiguous). Any other stride pattern is refused: the kernels support these two."""
    _, page, heads, dim = cache.shape
    if cache.stride(-1) == 1 and dim > 1:
        return False
    if cache.stride(1) == 1 and cache.stride(3) == page and cache.stride(2) == page * dim:
        # Rule: the kernels read a token-minor page as aligned runs (tl.multiple_of hints), so
        # block_size and head_dim are powers of two and a page of one head is >= 16 values.
        if page & (page - 1) or dim & (dim - 1) or page * dim < 16:
            raise ValueError(f"a token-minor V cache needs power-of-two block_size and head_dim "
                             f"with block_size*head_dim >= 16, got {page} and {dim}")
        return True
    raise ValueError(f"KV cache strides {tuple(cache.stride())} for shape {tuple(cache.shape)}: "
                     "want token-major (channels contiguous) or token-minor pages "
                     "(cache/layout.py)")
