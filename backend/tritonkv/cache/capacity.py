"""KV capacity: bytes per token, blocks, tokens and sequences that fit. One function,
``kv_capacity``, gives the figures of ``tritonkv capacity``, the "KV capacity:" startup log
line and the capacity gauges, so the three cannot disagree.

Rules (each is the engine's own, read from where the engine reads it, never restated):
- The KV dtype is the server's on that device: the model dtype (``model_dtype``: float32 on
  CPU unless ``dtype`` says otherwise, the checkpoint's on GPU), or fp8 / int8 when
  ``kv_cache_dtype`` says so. Bytes per token = 2 (K, V) x layers x KV heads x (head_dim x
  element size + 4 bytes of float32 scale for fp8 / int8).
- Blocks: the pool's when known (a running engine), else ``resolve_num_blocks`` (num_blocks,
  else the budget, else kv_cache_memory_mb), as the engine sizes its pool.
- A sequence of ``context`` tokens holds ceil(context / block_size) blocks, at most its
  eviction policy's ``blocks_per_sequence`` while decoding (chunks of one token; a window
  model's prefill chunk holds up to one chunk more, transiently). The policy is the engine's
  (cache/eviction/choose.py), with every bound setting (sinks, window, heavy hitters, stride).
- ``context`` defaults to the engine's max_model_len (the policy's ``max_model_len`` of the
  model's limit / max_model_len and the pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonkv.cache.allocate import ModelConfig, kv_block_bytes, kv_storage_dtype, model_dtype, resolve_num_blocks
from tritonkv.cache.eviction.choose import policy_for
from tritonkv.config import EngineConfig


@dataclass(frozen=True)
class KVCapacity:
    kv_dtype: str
    bytes_per_token: int  # all layers, K and V, scales included
    block_size: int
    num_blocks: int
    context: int  # tokens per sequence the sequence figures are for
    bound_blocks: int | None  # most blocks one sequence holds (None: unbounded)
    bound: str  # the eviction policy's bound, in words
    refused: str | None = None  # why an engine of these settings would not start (its policy's check)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def blocks_per_sequence(self) -> int:
        """Blocks a sequence of ``context`` tokens holds without any bound."""
        return -(-self.context // self.block_size)

    @property
    def blocks_per_sequence_bounded(self) -> int:
        full = self.blocks_per_sequence
        return full if self.bound_blocks is None else min(full, self.bound_blocks)

    @property
    def sequences(self) -> int:
        return self.num_blocks // self.blocks_per_sequence

    @property
    def sequences_bounded(self) -> int:
        return self.num_blocks // self.blocks_per_sequence_bounded

    def figures(self) -> dict:
        """Every figure by name (the gauges read theirs from here)."""
        names = ("kv_dtype", "bytes_per_token", "block_size", "num_blocks", "capacity_tokens", "context",
                 "blocks_per_sequence", "sequences", "bound_blocks", "blocks_per_sequence_bounded",
                 "sequences_bounded")
        return {name: getattr(self, name) for name in names}

    def describe(self) -> str:
        """The startup log line (after "KV capacity: ")."""
        line = (f"{self.bytes_per_token:,} B/token ({self.kv_dtype}), {self.num_blocks:,} blocks x {self.block_size} "
                f"= {self.capacity_tokens:,} tokens; {self.sequences:,} sequences of {self.context:,} tokens fit")
        if self.bound_blocks is not None:
            line += (f", {self.sequences_bounded:,} with the bound {self.bound} "
                     f"({self.blocks_per_sequence_bounded} blocks per sequence)")
        return line


def kv_bytes_per_token(model_config: ModelConfig, dtype: torch.dtype) -> int:
    """KV bytes one token takes across all layers, K and V, scales included."""
    return kv_block_bytes(model_config, 1, dtype)


def server_kv_dtype(config: EngineConfig, model_config: ModelConfig, device_type: str) -> torch.dtype:
    """The KV storage dtype an engine of ``config`` uses on a ``device_type`` device."""
    return kv_storage_dtype(config, model_dtype(config.dtype, model_config.torch_dtype, device_type))


def kv_capacity(model_config: ModelConfig, config: EngineConfig, device_type: str, *, budget_bytes: int | None = None,
                num_blocks: int | None = None, context: int | None = None,
                kv_dtype: torch.dtype | None = None) -> KVCapacity:
    """The capacity of an engine of ``config`` on a ``device_type`` ("cpu" / "cuda") device.
    ``num_blocks``: the pool's (else sized from ``budget_bytes`` / the config); ``kv_dtype``:
    another KV dtype than the server's, for comparison."""
    kv_dtype = kv_dtype or server_kv_dtype(config, model_config, device_type)
    if num_blocks is None:
        num_blocks = resolve_num_blocks(config, model_config, kv_dtype, budget_bytes)
    policy = policy_for(config, model_config.sliding_window)
    max_pos = model_config.max_position_embeddings
    max_model_len = policy.max_model_len(config.max_model_len, max_pos, num_blocks * config.block_size)
    context = context or max_model_len
    try:
        policy.check_fits(num_blocks, config.max_num_batched_tokens, max_pos, max_model_len)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    return KVCapacity(kv_dtype=str(kv_dtype).replace("torch.", ""),
                      bytes_per_token=kv_bytes_per_token(model_config, kv_dtype), block_size=config.block_size,
                      num_blocks=num_blocks, context=context, bound_blocks=policy.blocks_per_sequence(1),
                      bound=policy.describe(), refused=refused)
