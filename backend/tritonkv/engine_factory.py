"""Builds an ``Engine`` from an ``EngineConfig``: checkpoint, tokenizer, device, KV pool."""

from __future__ import annotations

import logging

import torch

from tritonkv.config import EngineConfig
from tritonkv.engine import Engine
from tritonkv.kv.block_pool import BlockPool
from tritonkv.ops.cache_layout import token_minor_view, use_token_minor_v
from tritonkv.model.checkpoint import load_model, resolve_dtype
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.model.model_config import ModelConfig
from tritonkv.model.tokenizer import TextTokenizer

log = logging.getLogger("tritonkv")


def pick_device(requested: str, gpu_instance: bool = True, device_id: int = 0) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not (gpu_instance and torch.cuda.is_available())):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("parameter 'device' = 'cuda' but CUDA is not available here")
    return torch.device("cuda", device_id)


QUANT_KV_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def kv_storage_dtype(config: EngineConfig, model_dtype: torch.dtype) -> torch.dtype:
    return QUANT_KV_DTYPES.get(config.kv_cache_dtype, model_dtype)


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers, K and V (with the float32 per token-head scales
    of a quantised cache)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token_head = cfg.head_dim * elem + (4 if dtype in QUANT_KV_DTYPES.values() else 0)
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * per_token_head


def resolve_num_blocks(config: EngineConfig, cfg: ModelConfig, dtype: torch.dtype) -> int:
    """``dtype``: the KV storage dtype."""
    if config.num_blocks:
        return config.num_blocks
    return max(1, config.kv_cache_memory_mb * 2**20 // kv_block_bytes(cfg, config.block_size, dtype))


def add_kv_scales(kv_caches, num_blocks: int, block_size: int, num_kv_heads: int, device):
    """Per token-head float32 scales beside each layer's fp8 / int8 K and V (ops/quant.py)."""
    shape = (num_blocks, block_size, num_kv_heads)
    return [(k, v, torch.zeros(shape, dtype=torch.float32, device=device),
             torch.zeros(shape, dtype=torch.float32, device=device)) for k, v in kv_caches]


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device,
                       storage: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(k_cache, v_cache)``, views into one ``[layers, 2, blocks, bs, kv_heads, dim]``
    tensor (``storage`` when given, e.g. a shared-memory tensor). V of an fp8/int8 cache is
    stored token-minor (ops/cache_layout.py); both are handed out in the logical shape."""
    shape = (cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    if storage is None:
        storage = torch.zeros(shape, dtype=dtype, device=device)
    storage = storage.view(shape)
    minor = use_token_minor_v(dtype, cfg.head_dim)
    caches = []
    for i in range(cfg.num_layers):
        v = storage[i, 1]
        if minor:
            v = token_minor_view(v.view(num_blocks, cfg.num_kv_heads, cfg.head_dim, block_size))
        caches.append((storage[i, 0], v))
    return caches


def shared_pool_name(pool_name: str, device: torch.device) -> str:
    """One pool per (pool_name, device): every instance of every model that names the same
    ``pool_name`` on the same device attaches it (files ``tritonkv-<this>.*`` in /dev/shm)."""
    return f"{pool_name}-{device.type}{device.index or 0}"


def build_engine(config: EngineConfig, gpu_instance: bool = True, device_id: int = 0) -> Engine:
    """``config.pool_name`` "" gives a private pool; otherwise the KV pool, its prefix index,
    the KV storage and the weights are shared with every process on the device that uses the
    same pool name (``engine.close()`` detaches; the last one out removes the shared files)."""
    checkpoint = config.checkpoint or ensure_demo_checkpoint()
    device = pick_device(config.device, gpu_instance, device_id)
    cfg = ModelConfig.from_checkpoint(checkpoint)
    dtype = resolve_dtype(config.dtype, cfg, device)
    try:
        tokenizer = TextTokenizer(checkpoint)
    except FileNotFoundError:
        log.warning("%s has no tokenizer.json; only input_ids requests will be served", checkpoint)
        tokenizer = None
    kv_dtype = kv_storage_dtype(config, dtype)
    num_blocks = resolve_num_blocks(config, cfg, kv_dtype)
    if not config.pool_name:
        model = load_model(checkpoint, device, dtype)
        pool = BlockPool.in_process(num_blocks, config.block_size)
        kv_caches = allocate_kv_caches(cfg, num_blocks, config.block_size, kv_dtype, device)
        if kv_dtype != dtype:
            kv_caches = add_kv_scales(kv_caches, num_blocks, config.block_size, cfg.num_kv_heads, device)
        return Engine(config, model, tokenizer, pool, kv_caches)
    if kv_dtype != dtype:
        raise ValueError(f"parameter 'kv_cache_dtype' = {config.kv_cache_dtype!r} needs a private pool "
                         "(pool_name \"\"): the shared pool does not share KV scales yet")

    from tritonkv.shared_storage import load_shared_model, open_shared_device_state

    model = load_shared_model(checkpoint, device, dtype)
    shared = open_shared_device_state(shared_pool_name(config.pool_name, device), checkpoint, cfg, model,
                                      device, dtype, num_blocks, config.block_size)
    model = model.to(device)  # parameters already sit in the shared copy; this moves buffers
    log.info("KV pool %r: %s (owner slot %d, %d blocks x %d tokens, weights %s)", shared.pool.name,
             "created" if shared.pool.created else "attached", shared.pool.owner, num_blocks,
             config.block_size, "shared" if shared.weights_shared else "private")
    kv_caches = allocate_kv_caches(cfg, num_blocks, config.block_size, dtype, device, storage=shared.kv_storage)
    return Engine(config, model, tokenizer, shared.pool, kv_caches, owner=shared.pool.owner,
                  on_close=shared.close)
