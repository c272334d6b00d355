"""StreamingLLM (``kv_eviction`` streaming): keep the attention sinks and a recent window;
return the blocks between.

Rules:
- The sinks are the first ``attention_sinks`` tokens, rounded up to whole blocks; the recent
  window is the blocks holding the last ``kv_window`` tokens. The window start of query ``p``
  is ``max(sink_blocks, floor(floor((p - window + 1) / block_size) / G) * G)`` blocks
  (``G = stride_blocks``: ``kv_window_stride`` in blocks, at least 1), so the window is
  ``kv_window`` to ``kv_window + G * block_size - 1`` tokens.
- A query attends every token of every kept block, at positions *inside the cache* (the i-th
  kept token has position i): when blocks in the middle go, the kept keys before the hole are
  re-rotated (the KV manager queues that).
- Blocks wholly before the first position that may evict are the same as without eviction:
  only they are prefix-shareable (``cacheable_blocks``).
"""

from __future__ import annotations

import bisect

import numpy as np

from tritonkv.cache.eviction.policy import EvictionPolicy


def whole_blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class StreamingLLM(EvictionPolicy):
    name = "streaming"
    evicts = True
    positions_in_cache = True
    parameter = "kv_window"

    def __init__(self, block_size: int, window: int, sink_tokens: int, stride_tokens: int = 0,
                 heavy_tokens: int = 0):
        super().__init__(block_size)
        self.window = window
        self.sink_tokens, self.stride_tokens, self.heavy_tokens = sink_tokens, stride_tokens, heavy_tokens
        self.sink_blocks = whole_blocks(sink_tokens, block_size)
        self.heavy_blocks = whole_blocks(heavy_tokens, block_size)
        self.stride_blocks = max(1, whole_blocks(stride_tokens, block_size))

    @classmethod
    def from_config(cls, config) -> "StreamingLLM":
        return cls(config.block_size, config.kv_window, config.attention_sinks, config.kv_window_stride)

    @classmethod
    def check_settings(cls, config, bad) -> None:
        if config.kv_window <= 0:
            bad("kv_window", f"must be > 0 tokens with kv_eviction={cls.name!r} (the recent window kept)")
        if config.attention_sinks > config.kv_window:
            bad("attention_sinks", f"must not exceed kv_window ({config.kv_window}): the sinks are a few "
                                   "tokens kept beside the recent window")
        if config.kv_cache_dtype != "auto":
            bad("kv_cache_dtype", f"fp8 / int8 KV is not supported with kv_eviction={cls.name!r} "
                                  "(evicting re-rotates cached keys); use kv_cache_dtype auto")

    def window_start(self, position: int) -> int:
        """First block of the recent window of the query at ``position``."""
        g = self.stride_blocks
        return max(self.sink_blocks, (position - self.window + 1) // self.block_size // g * g)

    def max_chunk(self, position: int) -> int:
        """Up to the next position where the window start moves."""
        g = self.stride_blocks
        nxt = (self.window_start(position) // g + 1) * g * self.block_size + self.window - 1
        return max(1, nxt - position)

    def first_eviction(self) -> int:
        """The first position whose query may see fewer blocks than a plain model would."""
        g = self.stride_blocks
        first_start = -(-(self.sink_blocks + self.heavy_blocks + 1) // g) * g
        return first_start * self.block_size + self.window - 1

    def cacheable_blocks(self) -> int:
        return self.first_eviction() // self.block_size

    def kept_blocks(self) -> int:
        """Most blocks in one sequence's table (what its queries attend)."""
        return self.sink_blocks + self.heavy_blocks + whole_blocks(self.window, self.block_size) + self.stride_blocks

    def blocks_per_sequence(self, chunk_tokens: int) -> int:
        """The table, plus the written originals of the sinks and heavy hitters (a kept block
        before a hole is a re-rotated copy of its original)."""
        return self.kept_blocks() + self.sink_blocks + self.heavy_blocks

    def victims(self, origins: list[int], position: int, mass: np.ndarray | None = None) -> list[int]:
        lo = bisect.bisect_left(origins, self.sink_blocks)
        hi = bisect.bisect_left(origins, self.window_start(position), lo)
        excess = hi - lo - self.heavy_blocks
        if excess <= 0:
            return []
        return self.choose(list(range(lo, hi)), excess, mass)

    def choose(self, between: list[int], excess: int, mass: np.ndarray | None) -> list[int]:
        """Which ``excess`` of the blocks between the sinks and the window go: all of them."""
        return between

    def context_limit(self, max_model_len: int) -> int | None:
        return None  # positions inside the cache: a conversation runs past max_model_len

    def check_fits(self, pool_blocks: int, chunk_tokens: int, max_positions: int, max_model_len: int) -> None:
        need = self.blocks_per_sequence(chunk_tokens)
        if need > pool_blocks:
            raise ValueError(f"parameter {self.parameter!r}: one sequence keeps up to {need} KV blocks of "
                             f"{self.block_size} tokens (attention sinks and heavy hitters with their originals, "
                             f"recent window) but the pool has {pool_blocks}; lower it or raise num_blocks / "
                             "kv_cache_memory_mb")
        kept = self.kept_blocks() * self.block_size
        if 2 * kept > max_positions:
            raise ValueError(f"parameter {self.parameter!r}: the kept cache ({self.kept_blocks()} blocks x "
                             f"{self.block_size} tokens) must be at most half the model's {max_positions} positions "
                             "(positions are inside the cache)")
        if kept > max_model_len:
            raise ValueError(f"parameter 'max_model_len' = {max_model_len}: kv_eviction={self.name!r} keeps up to "
                             f"{kept} tokens per sequence; raise it or lower kv_window")

    def describe(self) -> str:
        stride = f" (window start moves by {self.stride_tokens} tokens)" if self.stride_blocks > 1 else ""
        return f"{self.name}: {self.sink_tokens} sinks + {self._middle()}kv_window {self.window}{stride}"

    def _middle(self) -> str:
        return ""
