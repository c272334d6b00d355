"""Helpers every kernel file shares: the Triton interpreter workarounds, a sequence's query
rows in the flattened batch, and launch arguments.

(kernels/paged_tiles.py holds the other shared piece, the walk over paged cache tiles.)

Interpreter workarounds (CPU, TRITON_INTERPRET=1; seen with triton 3.9; on the GPU all of them
are off): ``tl.dot`` on bfloat16 operands gives wrong results, so bf16 dot operands are upcast
to float32 after the same bf16 rounding the GPU path does (``dot_f32`` on the host picks the
kernels' DOT_F32, ``mma`` obeys it); int8 -> bf16 casts give NaN, so ``kv_cast`` dequantises
through float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CAST_VIA_F32 = tl.constexpr(INTERPRET)

TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def kv_cast(x, dtype: tl.constexpr):
    """fp8 e4m3 / int8 cache values to ``dtype`` (exact into bf16/fp16)."""
    if _CAST_VIA_F32:
        return x.to(tl.float32).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def mma(a, b, DOT_F32: tl.constexpr):
    """``a @ b``. Rule: float32 operands (an fp32 KV cache: the tests' oracle path) multiply in
    full fp32 ("ieee"), never tf32 (tl.dot's default on the GPU, ~5e-4 relative): the CUDA
    engine then equals an fp32 reference up to summation order, as on the CPU. bf16 / fp16
    operands are unaffected."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def query_rows(qsl_ptr, seq):
    """(first query row, number of query rows) of sequence ``seq`` in the flattened batch
    (``query_start_loc``, ops/paged_attention.py)."""
    t = tl.load(qsl_ptr + seq)
    return t, tl.load(qsl_ptr + seq + 1) - t


def dot_f32(dtype: torch.dtype) -> bool:
    """DOT_F32 for dot operands of ``dtype``: True only for bf16 under the interpreter."""
    return INTERPRET and dtype == torch.bfloat16


def scale_strides(scale: torch.Tensor | None):
    """(stride_block, stride_slot, stride_head) of a per-token-head (3-D) or per-block (2-D)
    scale tensor (ops/quant.py); the slot stride of a per-block scale is 0; zeros for none."""
    if scale is None:
        return 0, 0, 0
    if scale.dim() == 3:
        return scale.stride(0), scale.stride(1), scale.stride(2)
    if scale.dim() == 2:
        return scale.stride(0), 0, scale.stride(1)
    raise ValueError(f"bad scale shape {tuple(scale.shape)}")
