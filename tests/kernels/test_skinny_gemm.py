"""The skinny decode GEMM (kernels/skinny_gemm.py) against torch.matmul: every row count up to
16, ragged N and K (masked tiles), split-K (partials summed by the second kernel), bias, both
products (tl.dot on rows padded to 16, and the multiply-and-sum GEMV)."""

import pytest
import torch

from kvcase import DEVICE
from tritonkv.kernels.skinny_gemm import SkinnyConfig, skinny_linear

DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) / 4).to(dtype).to(DEVICE)


def reference(x, w, b):
    """float32 matmul of the same (rounded) inputs, then one rounding to x's dtype."""
    y = x.float() @ w.float().t()
    return (y + b.float() if b is not None else y).to(x.dtype)


def check(got, x, w, b):
    # bf16: the two sides may round a float32 sum that differs in its last bits differently: one ulp
    tol = dict(rtol=2 ** -7, atol=1e-3) if x.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, reference(x, w, b), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("cfg", [SkinnyConfig(block_n=16, block_k=32, split_k=1),
                                 SkinnyConfig(block_n=32, block_k=64, split_k=3),
                                 SkinnyConfig(block_n=16, block_k=32, split_k=1, use_dot=False)],
                         ids=["dot", "dot-splitk3", "gemv"])
def test_skinny_linear_matches_matmul(dtype, m, cfg):
    n, k = 72, 200  # neither a multiple of the tiles: ragged last column block and K tile
    x, w = rand(m, k, dtype=dtype, seed=1), rand(n, k, dtype=dtype, seed=2)
    check(skinny_linear(x, w, config=cfg), x, w, None)


@pytest.mark.parametrize("split_k", [1, 2])
def test_skinny_linear_even_tiles_and_bias(split_k):
    """N and K multiples of the tiles (the unmasked path), with a bias (Qwen2's qkv)."""
    m, n, k = 2, 64, 256
    cfg = SkinnyConfig(block_n=32, block_k=64, split_k=split_k)
    x, w, b = (rand(m, k, dtype=torch.bfloat16, seed=3), rand(n, k, dtype=torch.bfloat16, seed=4),
               rand(n, dtype=torch.bfloat16, seed=5))
    check(skinny_linear(x, w, b, config=cfg), x, w, b)


def test_skinny_linear_reads_a_row_strided_input():
    """x may be a view with a row stride > K (a slice of a wider activation)."""
    wide = rand(4, 160, dtype=torch.float32, seed=6)
    x = wide[:, :96]
    w = rand(40, 96, dtype=torch.float32, seed=7)
    check(skinny_linear(x, w, config=SkinnyConfig(block_n=16, block_k=32)), x, w, None)


def test_skinny_linear_rejects_bad_shapes():
    w = rand(8, 32, dtype=torch.float32, seed=8)
    with pytest.raises(ValueError, match="at most 16 rows"):
        skinny_linear(rand(17, 32, dtype=torch.float32, seed=9), w)
    with pytest.raises(ValueError, match="contiguous weight"):
        skinny_linear(rand(2, 16, dtype=torch.float32, seed=9), w)
