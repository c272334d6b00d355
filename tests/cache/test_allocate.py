"""KV sizing (cache/allocate.py): block bytes, the memory budgets, exact numbers."""

import pytest
import torch

from tritonkv.cache.allocate import (activation_reserve_bytes, gpu_kv_budget_bytes, kv_block_bytes,
                                     kv_storage_shape, resolve_num_blocks)
from tritonkv.config import EngineConfig
from tritonkv.model.model_config import ModelConfig

# the Llama-3-8B shape
LLAMA3_8B = ModelConfig.from_dict({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5})


def cfg():
    return LLAMA3_8B


def test_block_bytes_and_shape():
    c = cfg()
    # 2 (K, V) x 32 layers x 16 tokens x 8 heads x 128 dims x 2 bytes
    assert kv_block_bytes(c, 16, torch.bfloat16) == 2 * 32 * 16 * 8 * 128 * 2 == 2_097_152
    # fp8 adds a float32 scale per token-head
    assert kv_block_bytes(c, 16, torch.float8_e4m3fn) == 2 * 32 * 16 * 8 * (128 + 4)
    assert kv_storage_shape(c, 10, 16) == (32, 2, 10, 16, 8, 128)


def test_num_blocks_from_each_budget():
    c = cfg()
    assert resolve_num_blocks(EngineConfig(num_blocks=7), c, torch.bfloat16) == 7
    assert resolve_num_blocks(EngineConfig(kv_cache_memory_mb=40), c, torch.bfloat16) == 20
    assert resolve_num_blocks(EngineConfig(), c, torch.bfloat16, budget_bytes=5 * 2**21 + 1) == 5


def test_gpu_memory_utilization_budget():
    c = cfg()
    config = EngineConfig(gpu_memory_utilization=0.9, max_num_seqs=64, max_num_batched_tokens=8192)
    per_token = (4 * 4096 + 48 * 128 + 32 * 128 + 3 * 14336) * 2
    logits = 2 * 64 * 128256 * 4
    reserve = 8192 * per_token + logits + (64 * per_token + logits) + 2**30
    assert activation_reserve_bytes(c, config, torch.bfloat16) == reserve
    total, weights = 141 * 10**9, 16 * 10**9
    assert gpu_kv_budget_bytes(config, c, torch.bfloat16, total, weights) == int(0.9 * total) - weights - reserve
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        gpu_kv_budget_bytes(EngineConfig(gpu_memory_utilization=0.1), c, torch.bfloat16, total, weights)
