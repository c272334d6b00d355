"""Builds an ``Engine`` from an ``EngineConfig``: checkpoint, tokenizer, device, KV pool."""

from __future__ import annotations

import logging

import torch

from tritonkv.config import EngineConfig
from tritonkv.engine.engine import Engine
from tritonkv.cache.allocate import add_kv_scales, allocate_kv_caches, gpu_kv_budget_bytes, kv_storage_dtype
from tritonkv.cache.capacity import kv_capacity
from tritonkv.cache.block_pool import BlockPool
from tritonkv.cache.host_tier import describe_tier
from tritonkv.model.checkpoint import load_model, resolve_dtype
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.model.model_config import ModelConfig
from tritonkv.model.registry import build_model
from tritonkv.model.tokenizer import TextTokenizer
from tritonkv.ops.linear import use_skinny_gemm

log = logging.getLogger("tritonkv")


def pick_device(requested: str, gpu_instance: bool = True, device_id: int = 0) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not (gpu_instance and torch.cuda.is_available())):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("parameter 'device' = 'cuda' but CUDA is not available here")
    return torch.device("cuda", device_id)


def kv_budget_bytes(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype,
                    device: torch.device) -> int | None:
    """KV bytes under ``gpu_memory_utilization`` on a CUDA device (weights counted from the
    model's shape); None where the pool is sized by num_blocks / kv_cache_memory_mb."""
    if device.type != "cuda" or config.gpu_memory_utilization <= 0 or config.num_blocks:
        return None
    with torch.device("meta"):
        weight_bytes = sum(p.numel() for p in build_model(model_config).parameters()) * dtype.itemsize
    return gpu_kv_budget_bytes(config, model_config, dtype, torch.cuda.mem_get_info(device)[1], weight_bytes)


def build_engine(config: EngineConfig, gpu_instance: bool = True, device_id: int = 0) -> Engine:
    """An in-process engine with its own KV pool. Sharing one pool between Triton instances is
    the engine core's job (core/: one process per device and pool name runs this engine)."""
    checkpoint = config.checkpoint or ensure_demo_checkpoint()
    device = pick_device(config.device, gpu_instance, device_id)
    if device.type == "cuda":
        # cuBLASLt's kernels for the skinny decode GEMMs: measured 5% less GEMM time than cuBLAS's
        # at batch 64 on the H200 (bench/NOTES_serving.md); a process-wide torch setting
        torch.backends.cuda.preferred_blas_library("cublaslt")
    model_config = ModelConfig.from_checkpoint(checkpoint)
    dtype = resolve_dtype(config.dtype, model_config, device)
    try:
        tokenizer = TextTokenizer(checkpoint)
    except FileNotFoundError:
        log.warning("%s has no tokenizer.json; only input_ids requests will be served", checkpoint)
        tokenizer = None
    kv_dtype = kv_storage_dtype(config, dtype)
    budget = kv_budget_bytes(config, model_config, dtype, device)
    capacity = kv_capacity(model_config, config, device.type, budget_bytes=budget)
    num_blocks = capacity.num_blocks
    log.info("KV pool: %d blocks x %d tokens (%s)", num_blocks, config.block_size,
             "num_blocks" if config.num_blocks else
             f"gpu_memory_utilization {config.gpu_memory_utilization}" if budget else "kv_cache_memory_mb")
    log.info("KV capacity: %s", capacity.describe())
    model = load_model(checkpoint, device, dtype)
    if config.skinny_gemm and device.type == "cuda":
        log.info("skinny GEMM (measured faster) in: %s", ", ".join(use_skinny_gemm(model)) or "no layer")
    pool = BlockPool.in_process(num_blocks, config.block_size)
    kv_caches = allocate_kv_caches(model_config, num_blocks, config.block_size, kv_dtype, device)
    if kv_dtype != dtype:
        kv_caches = add_kv_scales(kv_caches, model_config, num_blocks, config.block_size, device)
    engine = Engine(config, model, tokenizer, pool, kv_caches)
    if engine.host_tier is not None:
        log.info("KV %s", describe_tier("host tier", engine.host_tier.num_blocks, engine.host_tier.block_bytes,
                                        config.block_size, capacity.context, capacity.blocks_per_sequence_bounded,
                                        num_blocks))
    engine.checkpoint = checkpoint
    return engine
