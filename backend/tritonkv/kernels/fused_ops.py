"""Fused elementwise kernels of the decoder layer: RMSNorm (with the residual add), SiLU-mul,
and rotary embedding applied in place to the q and k parts of a fused qkv tensor.

Rules (the torch references in ops/fused_ops.py compute the same function):
- ``rms_norm``: with ``residual``, ``residual <- x + residual`` (rounded to the input dtype)
  first, and the norm reads the rounded sum, as HF's decoder layer does. The norm is computed
  in float32; the normalised row is rounded to the input dtype before the weight multiply.
- ``silu_mul``: ``silu(gate)`` rounded to the input dtype, times ``up``.
- ``rotary_qk_``: neox-style halves (HF ``rotate_half``), float32 cos/sin from a
  ``[max_pos, head_dim]`` cache (cos in the first half, sin in the second), one rounding.
One program per token row; every launch is free of host syncs (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[n, hidden]``; updates ``residual`` in place when given; returns the norm."""
    n, hidden = x.shape
    if out is None:
        out = torch.empty_like(x)
    if n == 0:
        return out
    block = triton.next_power_of_2(hidden)
    res = residual if residual is not None else x
    _rms_norm_kernel[(n,)](x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), hidden, eps,
                           HAS_RES=residual is not None, BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up`` ``[n, 2 * inter]`` (gate first) -> ``[n, inter]``."""
    n, two_inter = gate_up.shape
    inter = two_inter // 2
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    if n == 0:
        return out
    block = 1024
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                     BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rotary_kernel(qkv_ptr, pos_ptr, cs_ptr, stride_t, stride_cs, num_rot_heads,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(cs_ptr + pos * stride_cs + d)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d)
    heads = tl.arange(0, BLOCK_H)
    hmask = heads < num_rot_heads
    base = qkv_ptr + tok * stride_t + heads[:, None] * HEAD_DIM + d[None, :]
    x1 = tl.load(base, mask=hmask[:, None], other=0.0)
    x2 = tl.load(base + HALF, mask=hmask[:, None], other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    o1 = x1f * cos[None, :] - x2f * sin[None, :]
    o2 = x2f * cos[None, :] + x1f * sin[None, :]
    tl.store(base, o1.to(x1.dtype), mask=hmask[:, None])
    tl.store(base + HALF, o2.to(x1.dtype), mask=hmask[:, None])


def rotary_qk_triton(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                     num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Rotate the q and k heads of ``qkv`` ``[n, (num_heads + 2 * num_kv_heads) * head_dim]``
    in place (they are the first ``num_heads + num_kv_heads`` heads of each row)."""
    n = qkv.shape[0]
    if n == 0:
        return
    rot = num_heads + num_kv_heads
    assert qkv.stride(1) == 1 and head_dim % 2 == 0 and head_dim == triton.next_power_of_2(head_dim)
    _rotary_kernel[(n,)](qkv, positions, cos_sin, qkv.stride(0), cos_sin.stride(0), rot,
                         HEAD_DIM=head_dim, HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(rot),
                         num_warps=4)
