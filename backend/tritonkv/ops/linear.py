"""Which GEMM each linear layer of the model runs: torch (cuBLASLt) everywhere, except where the
skinny decode kernel (kernels/skinny_gemm.py) measured faster for that weight shape and row count
on this GPU (kernels/skinny_gemm_table.py, written by bench/skinny_gemm.py) and the engine asks
for it (``EngineConfig.skinny_gemm``, on by default: the table is the gate).

Rules:
- The decision is per (GPU name, N, K, M bucket); M rounds up to the next measured row count
  (1, 2, 4, 8, 16). A GPU, shape or bucket not in the table runs torch, as do inputs that are
  not 2-D, not on CUDA or not 16-bit.
- It is made on the host from shapes alone, so a CUDA graph captures the chosen kernel.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from tritonkv.kernels.skinny_gemm_table import WINS

BUCKETS = (1, 2, 4, 8, 16)


def bucket(m: int) -> int | None:
    """The measured row count that covers ``m`` rows (None: more than 16)."""
    return next((b for b in BUCKETS if m <= b), None)


def skinny_choices(device_name: str, n: int, k: int, wins: dict = WINS) -> dict[int, tuple]:
    """M bucket -> kernel config, for the buckets where the table says the kernel wins."""
    return {m: cfg for (dev, n_, k_, m), cfg in wins.items() if dev == device_name and (n_, k_) == (n, k)}


def _skinny_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    from tritonkv.kernels.skinny_gemm import skinny_linear

    b = bucket(x.shape[0]) if x.dim() == 2 else None
    cfg = self.skinny_configs.get(b)
    if cfg is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16) or x.stride(-1) != 1:
        return F.linear(x, self.weight, self.bias)
    return skinny_linear(x, self.weight, self.bias, cfg)


def use_skinny_gemm(model: nn.Module, wins: dict = WINS) -> list[str]:
    """Route the model's linear layers through the table's choices; returns the names of the
    layers that use the kernel for some row count (the others are untouched)."""
    used = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not module.weight.is_cuda or not module.weight.is_contiguous():
            continue
        n, k = module.weight.shape
        choices = skinny_choices(torch.cuda.get_device_name(module.weight.device), n, k, wins)
        if choices:
            from tritonkv.kernels.skinny_gemm import SkinnyConfig

            module.skinny_configs = {m: SkinnyConfig(*cfg) for m, cfg in choices.items()}  # built once, not per call
            module.forward = types.MethodType(_skinny_forward, module)
            used.append(name)
    return used
