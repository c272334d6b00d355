"""The decoder layer's elementwise ops, one entry each: the Triton kernel
(kernels/fused_ops.py) on CUDA tensors, the torch reference elsewhere.

The references compute exactly what HF transformers' Llama modules compute (they are the
CPU path and the oracle); the kernels compute the same function with float32 internals and
the roundings listed in kernels/fused_ops.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x, weight, eps, residual=None):
    if residual is not None:
        residual.add_(x)
        x = residual
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def silu_mul_reference(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_cos_sin(inv_freq: torch.Tensor, max_positions: int, attention_scaling: float) -> torch.Tensor:
    """``[max_positions, head_dim]`` float32: cos of every angle in the first half, sin in the
    second (angles as HF computes them: float32 positions times float32 inverse frequencies)."""
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_scaling


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_qk_reference(qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim):
    n = qkv.shape[0]
    half = head_dim // 2
    cs = cos_sin[positions]
    cos = torch.cat((cs[:, :half], cs[:, :half]), dim=-1).to(qkv.dtype)[:, None, :]
    sin = torch.cat((cs[:, half:], cs[:, half:]), dim=-1).to(qkv.dtype)[:, None, :]
    rot = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(n, num_heads + num_kv_heads, head_dim)
    rot.copy_(rot * cos + _rotate_half(rot) * sin)


def _kernel_ok(t: torch.Tensor) -> bool:
    return t.is_cuda


def rms_norm(x, weight, eps, residual=None):
    """RMSNorm of ``x`` ``[n, hidden]``; with ``residual``, first ``residual += x`` in place
    and the norm of the sum is returned (the decoder layer's add + norm)."""
    if _kernel_ok(x):
        from tritonkv.kernels.fused_ops import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)


def silu_mul(gate_up):
    if _kernel_ok(gate_up):
        from tritonkv.kernels.fused_ops import silu_mul_triton

        return silu_mul_triton(gate_up)
    return silu_mul_reference(gate_up)


def rotary_qk_(qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim) -> None:
    """Rotate q and k of a fused ``qkv`` row block in place, at ``positions``."""
    if _kernel_ok(qkv) and head_dim & (head_dim - 1) == 0:
        from tritonkv.kernels.fused_ops import rotary_qk_triton

        rotary_qk_triton(qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim)
        return
    rotary_qk_reference(qkv, positions, cos_sin, num_heads, num_kv_heads, head_dim)
