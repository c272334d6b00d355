"""The 8-bit KV cache formats (fp8 e4m3, int8): which dtypes, their largest code, the scale
floor. One definition for the kernels, the torch references (ops/quant.py, which states the
full rules) and the page layout (cache/layout.py). Torch only: importing it loads no Triton.
"""

from __future__ import annotations

import torch

QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)
TINY = 1e-8  # floor of amax in a dynamic scale: max(amax, TINY) / QMAX


def qmax(dtype: torch.dtype) -> float:
    if dtype == torch.float8_e4m3fn:
        return 448.0
    if dtype == torch.int8:
        return 127.0
    raise ValueError(f"not a quantised KV dtype: {dtype}")


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QUANT_DTYPES
