"""Torch references for quantised (FP8 e4m3 / INT8) KV-cache storage.

A quantised cache keeps ``k_cache``/``v_cache`` in ``torch.float8_e4m3fn`` or ``torch.int8``
with the usual layout ``[num_blocks, block_size, num_kv_heads, head_dim]`` and a float32 scale
tensor beside each of them. Dequantised value = stored value * scale. Two granularities:

- per token-head: scale ``[num_blocks, block_size, num_kv_heads]``. ``write_kv`` computes it
  on the fly for each written token and head: ``scale = max(amax(|x|), tiny) / QMAX``
  (QMAX = 448 for e4m3, 127 for int8), then stores ``x / scale`` (fp8: saturating cast, round to
  nearest even; int8: round half away from zero, clamped to [-127, 127]).
- per block: scale ``[num_blocks, num_kv_heads]``. These are *static* (calibrated, e.g. one
  per-layer value broadcast with ``expand``): ``write_kv`` only reads them and quantises with
  them (values beyond the range saturate); it never changes them.

These functions are the oracle for kernels/kv_write.py and the dequantise-on-load paths of the
attention kernels, and the CPU implementation used by ops/dispatch.py. The dtypes, QMAX and
TINY are defined once in cache/quant_format.py (torch only), which the kernels import.
"""

from __future__ import annotations

import torch

from tritonkv.cache.quant_format import TINY, qmax
from tritonkv.ops.paged_attention import paged_attention_reference


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float) divided by ``scale`` (broadcastable), cast to ``dtype`` with saturation."""
    m = qmax(dtype)
    y = (x.float() / scale.float()).clamp(-m, m)
    if dtype == torch.int8:
        y = torch.sign(y) * torch.floor(y.abs() + 0.5)  # half away from zero, as the kernel
    return y.to(dtype)


def dequantize(xq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return xq.float() * scale.float()


def dynamic_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row scale over the last dim: ``max(amax|x|, TINY) / QMAX`` (float32)."""
    return x.float().abs().amax(dim=-1).clamp_min(TINY) / qmax(dtype)


def _per_token_head(scale: torch.Tensor, cache: torch.Tensor) -> bool:
    if scale.dim() == 3:
        return True
    if scale.dim() == 2:
        return False
    raise ValueError(
        "scale must be [num_blocks, block_size, num_kv_heads] or [num_blocks, num_kv_heads], "
        f"got {tuple(scale.shape)}"
    )


def write_kv_quant_reference(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
) -> None:
    """``write_kv_reference`` for a quantised cache (see the module docstring for scales)."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blk, off = slots // block_size, slots % block_size
    for cache, x, scale in ((k_cache, key[keep], k_scale), (v_cache, value[keep], v_scale)):
        if _per_token_head(scale, cache):
            s = dynamic_scale(x, cache.dtype)  # [n, Hkv]
            scale[blk, off] = s
        else:
            s = scale[blk].float()  # [n, Hkv]
        cache[blk, off] = quantize(x, s[..., None], cache.dtype)


def dequantize_cache(cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Whole cache as float32 ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
    if _per_token_head(scale, cache):
        return dequantize(cache, scale[..., None])
    return dequantize(cache, scale[:, None, :, None])


def paged_attention_quant_reference(
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
    sliding_window=None, num_sink_tokens=0, *, k_scale, v_scale,
) -> torch.Tensor:
    """``paged_attention_reference`` over a quantised cache, dequantised to float32 first."""
    k = dequantize_cache(k_cache, k_scale)
    v = dequantize_cache(v_cache, v_scale)
    return paged_attention_reference(
        q, k, v, block_tables, seq_lens, query_start_loc, scale, sliding_window, num_sink_tokens
    )
