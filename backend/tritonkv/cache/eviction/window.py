"""A model that attends a sliding window (Mistral ``sliding_window``, Qwen2
``use_sliding_window``): blocks wholly before the window go back to the pool.

Rules:
- Query ``p`` sees text positions ``(p - w, p]``; a block whose every token is below
  ``p - w + 1`` is returned. Attention is unchanged (the kernels mask the window) and
  positions stay the text's: no key is re-rotated.
- A chunk computes at most ``max(window, block_size)`` tokens, so that a long prefill holds
  O(window) blocks; a sequence then holds the window plus one chunk, and two partial blocks.
"""

from __future__ import annotations

import bisect

import numpy as np

from tritonkv.cache.eviction.policy import EvictionPolicy, model_limit


class SlidingWindow(EvictionPolicy):
    name = "window"
    evicts = True
    parameter = "num_blocks"

    def __init__(self, block_size: int, window: int):
        super().__init__(block_size)
        self.window = window

    def window_start(self, position: int) -> int:
        """First block the query at ``position`` sees."""
        return max(0, (position - self.window + 1) // self.block_size)

    def max_chunk(self, position: int) -> int:
        return max(self.window, self.block_size)

    def victims(self, origins: list[int], position: int, mass: np.ndarray | None = None) -> list[int]:
        return list(range(bisect.bisect_left(origins, self.window_start(position))))

    def blocks_per_sequence(self, chunk_tokens: int) -> int:
        chunk = min(chunk_tokens, self.max_chunk(0))
        return -(-(self.window + chunk) // self.block_size) + 2

    def max_model_len(self, requested: int, max_positions: int, pool_tokens: int) -> int:
        return model_limit(requested, max_positions)  # O(window) blocks per sequence: the pool bounds nothing

    def check_fits(self, pool_blocks: int, chunk_tokens: int, max_positions: int, max_model_len: int) -> None:
        need = self.blocks_per_sequence(chunk_tokens)
        if need > pool_blocks:
            raise ValueError(f"parameter 'num_blocks': one sequence of this sliding-window model keeps up to "
                             f"{need} KV blocks of {self.block_size} tokens (the window of {self.window} and one "
                             f"chunk) but the pool has {pool_blocks}; raise num_blocks / kv_cache_memory_mb")

    def describe(self) -> str:
        return f"model sliding_window {self.window}"
