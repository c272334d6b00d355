"""Skinny GEMM for decode: ``y[M, N] = x[M, K] @ w[N, K]^T (+ bias)`` for M <= 16 rows (the
model's linear layers at small batch), where the step is bound by streaming ``w`` once.

Rules:
- One program per ``BLOCK_N`` output columns and per split of K (``SPLIT_K``); it walks its
  K range in ``BLOCK_K`` tiles, loading ``w[BLOCK_N, BLOCK_K]`` (K-contiguous rows: coalesced)
  and ``x[M, BLOCK_K]`` (tiny, from L2), accumulating in float32. ``w`` is read exactly once
  over the whole grid.
- The product is ``tl.dot`` with the rows padded to 16 (tensor cores need M >= 16; the
  padding costs no memory traffic) or, with ``use_dot=False``, a broadcast multiply and sum
  (the classic GEMV, M = 1-2).
- ``SPLIT_K`` > 1 writes float32 partial sums ``[SPLIT_K, M, N]``; a second kernel adds them
  in a fixed order (deterministic), adds the bias and casts. ``SPLIT_K`` = 1 stores directly.
- float32 inputs multiply exactly (no TF32); the model runs it on 16-bit weights only.
- Output dtype = ``x``'s; bias (optional) is added in float32 before the one rounding.
- No host sync, fixed shapes per launch: CUDA-graph safe.
Which shapes and batch sizes use it is decided by measurement only (ops/linear.py, the table
written by bench/skinny_gemm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tritonkv.kernels.jit_helpers import dot_f32

MAX_M = 16


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    use_dot: bool = True


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, b_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_os, k_per_split,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PARTIAL: tl.constexpr,
                   HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, EVEN: tl.constexpr, DOT_F32: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    nmask = rn < N
    mmask = rm < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k_lo + rk)[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo + rk)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN:  # N % BLOCK_N == 0 and every split a whole number of tiles: no masks on w
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
        else:
            kmask = (k + rk) < k_hi
            w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        if USE_DOT:
            if DOT_F32:  # bf16 under the interpreter (kernels/jit_helpers.py) and float32 inputs: exact
                acc += tl.dot(x.to(tl.float32), tl.trans(w).to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    omask = mmask[:, None] & nmask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :], acc, mask=omask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _split_sum_kernel(part_ptr, b_ptr, y_ptr, N, stride_ps, stride_pm, stride_ym, SPLIT_K: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):  # fixed order: deterministic
        acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + rn, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=mask)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[M, K]`` (M <= 16, last dim contiguous), ``weight`` ``[N, K]`` contiguous ->
    ``[M, N]`` in ``x``'s dtype, as ``torch.nn.functional.linear``."""
    cfg = config or SkinnyConfig()
    m, k = x.shape
    n, k_w = weight.shape
    if m > MAX_M:
        raise ValueError(f"skinny_linear takes at most {MAX_M} rows, got {m}")
    if k_w != k or x.stride(1) != 1 or weight.stride(1) != 1 or weight.stride(0) != k:
        raise ValueError(f"skinny_linear needs x [M, K] and a contiguous weight [N, K]; got {tuple(x.shape)} "
                         f"(strides {x.stride()}) and {tuple(weight.shape)} (strides {weight.stride()})")
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    even = n % cfg.block_n == 0 and k % k_per_split == 0
    block_m = MAX_M if cfg.use_dot else triton.next_power_of_2(m)
    grid = (triton.cdiv(n, cfg.block_n), split)
    bias_arg = bias if bias is not None else weight
    f32_dot = dot_f32(x.dtype) or x.dtype == torch.float32
    if split == 1:
        _skinny_kernel[grid](x, weight, y, bias_arg, m, n, k, x.stride(0), weight.stride(0), y.stride(0), 0,
                             k_per_split, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PARTIAL=False,
                             HAS_BIAS=bias is not None, USE_DOT=cfg.use_dot, EVEN=even, DOT_F32=f32_dot,
                             num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _skinny_kernel[grid](x, weight, part, bias_arg, m, n, k, x.stride(0), weight.stride(0), part.stride(1),
                         part.stride(0), k_per_split, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                         PARTIAL=True, HAS_BIAS=False, USE_DOT=cfg.use_dot, EVEN=even, DOT_F32=f32_dot,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    block = 1024
    _split_sum_kernel[(m, triton.cdiv(n, block))](part, bias_arg, y, n, part.stride(0), part.stride(1), y.stride(0),
                                                  SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return y
