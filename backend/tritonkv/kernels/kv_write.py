"""KV write: scatter new tokens' K and V into their cache slots (optionally FP8/INT8).

Reference: ``tritonkv.ops.paged_attention.write_kv_reference`` (plain) and
``tritonkv.ops.quant.write_kv_quant_reference`` (quantised); same layout rules.
One program per token writes every KV head of that token for both K and V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonkv.cache.layout import v_token_minor
from tritonkv.kernels.jit_helpers import scale_strides
from tritonkv.cache.quant_format import TINY, is_quantized, qmax


@triton.jit
def _quantize_tile(x, scale_ptr, s_off, hmask, QUANT: tl.constexpr, DYN: tl.constexpr,
                   QMAX: tl.constexpr, TINY_C: tl.constexpr):
    # x: [BLOCK_H, BLOCK_D] float32 -> (quantised values as float32 already rounded/clamped)
    if DYN:
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.maximum(amax, TINY_C) / QMAX
        tl.store(scale_ptr + s_off, s, mask=hmask)
    else:
        s = tl.load(scale_ptr + s_off, mask=hmask, other=1.0)
    y = tl.math.div_rn(x, s[:, None])  # IEEE division, as torch (GPU '/' is approximate)
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if QUANT == 2:  # int8: round half away from zero (float->int truncates toward zero)
        y = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int32)
    return y


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    num_kv_heads,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, DYN: tl.constexpr, QMAX: tl.constexpr, TINY_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // PAGE
    off = slot % PAGE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    hmask = h < num_kv_heads
    m = hmask[:, None] & (d[None, :] < HEAD_DIM)
    k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=m, other=0.0)
    v = tl.load(value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=m, other=0.0)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + h[:, None] * stride_kch + d[None, :]
    # stride_vcd: 1 (token-major) or the page size (token-minor V, cache/layout.py)
    vc = (v_cache_ptr + blk * stride_vcb + off * stride_vcs + h[:, None] * stride_vch
          + d[None, :] * stride_vcd)
    if QUANT == 0:
        tl.store(kc, k.to(kc.dtype.element_ty), mask=m)
        tl.store(vc, v.to(vc.dtype.element_ty), mask=m)
    else:
        ks_off = blk * stride_ksb + off * stride_kss + h * stride_ksh
        vs_off = blk * stride_vsb + off * stride_vss + h * stride_vsh
        kq = _quantize_tile(k.to(tl.float32), k_scale_ptr, ks_off, hmask, QUANT, DYN, QMAX, TINY_C)
        vq = _quantize_tile(v.to(tl.float32), v_scale_ptr, vs_off, hmask, QUANT, DYN, QMAX, TINY_C)
        tl.store(kc, kq.to(kc.dtype.element_ty), mask=m)
        tl.store(vc, vq.to(vc.dtype.element_ty), mask=m)


def write_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Launch the KV-write kernel. Quantised caches (fp8 e4m3 / int8) need ``k_scale`` and
    ``v_scale`` (see ops/quant.py: 3-D = per token-head, computed here; 2-D = per block,
    static, read only)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert k_cache.stride(-1) == 1
    v_token_minor(v_cache)  # refuses layouts other than token-major / token-minor
    assert k_cache.dtype == v_cache.dtype
    page = k_cache.shape[1]
    quant = 0
    dyn = False
    q_max = 1.0
    if is_quantized(k_cache.dtype):
        if k_scale is None or v_scale is None:
            raise ValueError("a quantised KV cache needs k_scale and v_scale")
        assert k_scale.dtype == torch.float32 and v_scale.dtype == torch.float32
        assert k_scale.dim() == v_scale.dim()
        quant = 1 if k_cache.dtype == torch.float8_e4m3fn else 2
        dyn = k_scale.dim() == 3
        q_max = qmax(k_cache.dtype)
    ks, vs = scale_strides(k_scale), scale_strides(v_scale)
    dummy = slot_mapping
    block_h = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        k_scale if k_scale is not None else dummy, v_scale if v_scale is not None else dummy,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        *ks, *vs,
        num_kv_heads,
        PAGE=page, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        QUANT=quant, DYN=dyn, QMAX=q_max, TINY_C=TINY,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )
