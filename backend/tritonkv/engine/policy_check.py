"""The engine's eviction policy, checked against the model and the pool (errors name the
parameter to change)."""

from __future__ import annotations

from tritonkv.cache.block_pool import BlockPool
from tritonkv.cache.eviction import EvictionPolicy, policy_for
from tritonkv.config import EngineConfig


def eviction_policy(config: EngineConfig, model_config, pool: BlockPool) -> EvictionPolicy:
    """The engine's eviction policy, checked against the model and the pool (errors name the
    parameter to change)."""
    if model_config.sliding_window and config.kv_eviction != "none":
        raise ValueError(f"parameter 'kv_eviction' = {config.kv_eviction!r}: this model attends a sliding "
                         f"window of {model_config.sliding_window} tokens, which already bounds its KV "
                         "(blocks outside the window are returned); use kv_eviction none")
    policy = policy_for(config.kv_eviction, pool.block_size, model_window=model_config.sliding_window,
                        kv_window=config.kv_window, attention_sinks=config.attention_sinks,
                        heavy_hitter_tokens=config.heavy_hitter_tokens, kv_window_stride=config.kv_window_stride)
    if not policy.active:
        return policy
    need = policy.blocks_per_sequence(config.max_num_batched_tokens)
    name = {"window": "num_blocks", "streaming": "kv_window", "h2o": "heavy_hitter_tokens"}[policy.mode]
    if need > pool.num_blocks:
        raise ValueError(f"parameter {name!r}: one sequence keeps up to {need} KV blocks of {pool.block_size} "
                         f"tokens (attention sinks and heavy hitters with their originals, recent window; "
                         f"a window model: window and one chunk) but the pool has "
                         f"{pool.num_blocks}; lower it or raise num_blocks / kv_cache_memory_mb")
    max_pos = model_config.max_position_embeddings
    if policy.relative and 2 * policy.kept_blocks() * pool.block_size > max_pos:
        raise ValueError(f"parameter {name!r}: the kept cache ({policy.kept_blocks()} blocks x {pool.block_size} tokens) must "
                         f"be at most half the model's {max_pos} positions (positions are inside the cache)")
    return policy
