"""KV cache memory: how many blocks fit, and the tensors that hold them.

Rules:
- All layers' K and V live in one tensor of ``kv_storage_shape`` (private, or the shared
  pool's storage); each layer gets ``(k_cache, v_cache)`` views in the logical shape
  ``[num_blocks, block_size, num_kv_heads, head_dim]`` (cache/layout.py has the page rules).
- An fp8 / int8 cache adds float32 per token-head scales ``[num_blocks, block_size,
  num_kv_heads]`` for K and V (ops/quant.py); they count in a block's bytes.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tritonkv.cache.layout import token_minor_view, use_token_minor_v
from tritonkv.config import EngineConfig

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


class ModelConfig(Protocol):
    """What sizing reads of a model's config (model/model_config.py's ModelConfig)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    torch_dtype: str


def model_dtype(requested: str, checkpoint_dtype: str, device_type: str) -> torch.dtype:
    """The dtype the model runs in: ``requested`` (the ``dtype`` parameter) unless 'auto', which
    means float32 on CPU (the exact oracle) and the checkpoint's dtype on GPU (bfloat16 when
    config.json names none tritonkv serves)."""
    if requested != "auto":
        return MODEL_DTYPES[requested]
    if device_type == "cpu":
        return torch.float32
    return MODEL_DTYPES.get(checkpoint_dtype.replace("torch.", ""), torch.bfloat16)


def kv_storage_dtype(config: EngineConfig, model_dtype: torch.dtype) -> torch.dtype:
    return QUANT_KV_DTYPES.get(config.kv_cache_dtype, model_dtype)


def kv_storage_shape(model_config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """``[layers, 2 (K, V), blocks, block_size, kv_heads, head_dim]``."""
    return (model_config.num_layers, 2, num_blocks, block_size, model_config.num_kv_heads,
            model_config.head_dim)


def kv_block_bytes(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, K and V (with the float32 per token-head scales
    of a quantised cache)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token_head = model_config.head_dim * elem + (4 if dtype in QUANT_KV_DTYPES.values() else 0)
    return 2 * model_config.num_layers * block_size * model_config.num_kv_heads * per_token_head


def resolve_num_blocks(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype,
                       budget_bytes: int | None = None) -> int:
    """``dtype``: the KV storage dtype. ``num_blocks`` wins when set; else ``budget_bytes``
    (a GPU budget from ``gpu_memory_utilization``) when given; else ``kv_cache_memory_mb``."""
    if config.num_blocks:
        return config.num_blocks
    if budget_bytes is None:
        budget_bytes = config.kv_cache_memory_mb * 2**20
    return max(1, budget_bytes // kv_block_bytes(model_config, config.block_size, dtype))


def kv_scales_shape(model_config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """``[layers, 2 (K, V), blocks, block_size, kv_heads]``: the float32 scales of an fp8 / int8
    cache, one tensor for all layers (private, or the shared pool's ``kv_scales`` storage)."""
    return (model_config.num_layers, 2, num_blocks, block_size, model_config.num_kv_heads)


def add_kv_scales(kv_caches, model_config: ModelConfig, num_blocks: int, block_size: int, device,
                  storage: torch.Tensor | None = None):
    """Per layer ``(k, v, k_scale, v_scale)``: per token-head float32 scales beside each
    layer's fp8 / int8 K and V (ops/quant.py), views into one ``kv_scales_shape`` tensor
    (``storage`` when given, e.g. a shared-memory tensor)."""
    shape = kv_scales_shape(model_config, num_blocks, block_size)
    if storage is None:
        storage = torch.zeros(shape, dtype=torch.float32, device=device)
    storage = storage.view(shape)
    return [(k, v, storage[i, 0], storage[i, 1]) for i, (k, v) in enumerate(kv_caches)]


def allocate_kv_caches(model_config: ModelConfig, num_blocks: int, block_size: int, dtype, device,
                       storage: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(k_cache, v_cache)``, views into one ``kv_storage_shape`` tensor
    (``storage`` when given, e.g. a shared-memory tensor). V of an fp8/int8 cache is stored
    token-minor (cache/layout.py); both are handed out in the logical shape."""
    shape = kv_storage_shape(model_config, num_blocks, block_size)
    if storage is None:
        storage = torch.zeros(shape, dtype=dtype, device=device)
    storage = storage.view(shape)
    minor = use_token_minor_v(dtype, model_config.head_dim)
    layers, _, _, _, kv_heads, head_dim = shape
    caches = []
    for i in range(layers):
        v = storage[i, 1]
        if minor:
            v = token_minor_view(v.view(num_blocks, kv_heads, head_dim, block_size))
        caches.append((storage[i, 0], v))
    return caches


def activation_reserve_bytes(model_config: ModelConfig, config: EngineConfig, dtype: torch.dtype) -> int:
    """Device memory kept out of the KV budget for one step's activations (an eager prefill
    of ``max_num_batched_tokens``: hidden, residual, qkv, attention out, gate/up, SiLU-mul),
    the sampled rows' float32 logits, the decode graphs' pool, and 1 GiB of headroom
    (allocator slack, cuBLAS workspaces)."""
    c = model_config
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = (4 * c.hidden_size + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                 + c.num_heads * c.head_dim + 3 * c.intermediate_size) * elem
    logits = 2 * config.max_num_seqs * c.vocab_size * 4
    graphs = config.max_num_seqs * per_token + logits if config.enable_cuda_graphs else 0
    return config.max_num_batched_tokens * per_token + logits + graphs + 2**30


def gpu_kv_budget_bytes(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype,
                        total_bytes: int, weight_bytes: int) -> int:
    """KV bytes under ``gpu_memory_utilization`` (as vLLM's: the fraction of the device's total
    memory this engine may use for weights, activations, graphs and KV together)."""
    budget = (int(config.gpu_memory_utilization * total_bytes) - weight_bytes
              - activation_reserve_bytes(model_config, config, dtype))
    if budget <= 0:
        raise ValueError(
            f"parameter 'gpu_memory_utilization' = {config.gpu_memory_utilization}: "
            f"{config.gpu_memory_utilization:.0%} of {total_bytes / 2**30:.1f} GiB leaves no room for KV after "
            f"{weight_bytes / 2**30:.1f} GiB of weights and "
            f"{activation_reserve_bytes(model_config, config, dtype) / 2**30:.1f} GiB of activations; raise it "
            "or lower max_num_batched_tokens / max_num_seqs")
    return budget
