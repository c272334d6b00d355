"""An independent 8-bit KV quantisation reference for tests, written from torch's own casts
(not from ops/quant.py): per token-head scale = amax(|x|) / the format's largest finite code
(torch.finfo(float8_e4m3fn).max = 448, torch.iinfo(int8).max = 127); codes: fp8 is torch's
float8_e4m3fn cast (round to nearest even), int8 rounds half away from zero (torch's int8
cast truncates toward zero, after adding half with x's sign)."""

import torch


def largest_code(storage: torch.dtype) -> float:
    return float(torch.finfo(storage).max if storage.is_floating_point else torch.iinfo(storage).max)


def token_head_scale(x: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """``x`` [..., head_dim] -> float32 [...]: one scale per token and head (amax > 0 here)."""
    amax = x.double().abs().amax(dim=-1)
    assert (amax > 0).all(), "a zero row has no scale to check"
    return (amax / largest_code(storage)).float()


def codes(x: torch.Tensor, scale: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """``x / scale`` (scale broadcast over head_dim) in ``storage``."""
    y = x.float() / scale.float()[..., None]
    if storage == torch.int8:
        return (y + torch.copysign(torch.full_like(y, 0.5), y)).to(torch.int8)
    return y.to(storage)


def fake_quantize(x: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """``x`` as the cache gives it back: its codes times its scale (in x's dtype)."""
    s = token_head_scale(x, storage)
    return (codes(x, s, storage).float() * s[..., None]).to(x.dtype)
