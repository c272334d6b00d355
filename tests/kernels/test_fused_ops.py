"""Fused layer ops (kernels/fused_ops.py) against their torch references (ops/fused_ops.py)."""

import pytest
import torch

from kvcase import DEVICE
from tritonkv.kernels.fused_ops import rms_norm_triton, rotary_qk_triton, silu_mul_triton
from tritonkv.ops.fused_ops import (rms_norm_reference, rotary_cos_sin, rotary_qk_reference,
                                    silu_mul_reference)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rand(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, with_residual):
    x, w = rand(5, 96, dtype=dtype), rand(96, dtype=dtype, seed=1)
    res = rand(5, 96, dtype=dtype, seed=2) if with_residual else None
    res_ref = res.clone() if with_residual else None
    out = rms_norm_triton(x, w, 1e-5, res)
    ref = rms_norm_reference(x, w, 1e-5, res_ref)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
    if with_residual:  # the residual stream is updated in place: exact in fp32, one bf16
        # rounding apart otherwise (the interpreter's fp32 -> bf16 cast truncates)
        torch.testing.assert_close(res.float(), res_ref.float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    gu = rand(3, 2 * 1500, dtype=dtype)  # not a multiple of the kernel's block
    torch.testing.assert_close(silu_mul_triton(gu).float(), silu_mul_reference(gu).float(),
                               rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_rotates_q_and_k_and_leaves_v(dtype):
    heads, kv_heads, d = 6, 2, 32
    qkv = rand(7, (heads + 2 * kv_heads) * d, dtype=dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cos_sin = rotary_cos_sin(inv_freq, 64, 1.0).to(DEVICE)
    positions = torch.tensor([0, 1, 5, 17, 63, 2, 40], device=DEVICE)
    got, ref = qkv.clone(), qkv.clone()
    rotary_qk_triton(got, positions, cos_sin, heads, kv_heads, d)
    rotary_qk_reference(ref, positions, cos_sin, heads, kv_heads, d)
    torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
    v = slice((heads + kv_heads) * d, None)
    assert torch.equal(got[:, v], qkv[:, v])
    assert torch.equal(got[0], qkv[0])  # position 0 is the identity
