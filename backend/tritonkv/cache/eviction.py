"""Bounded KV memory: which blocks of a live sequence go back to the pool (torch-free).

Policies (``EvictionPolicy.mode``):
- ``window``: the model attends a sliding window of ``w`` tokens (Mistral ``sliding_window``,
  Qwen2 ``use_sliding_window``). Query ``p`` sees ``(p - w, p]``; a block whose every token is
  below ``p - w + 1`` for the next query is returned. Attention is unchanged (the kernels mask
  the window); positions stay the original ones.
- ``streaming`` (StreamingLLM): keep the sink blocks (the first ``attention_sinks`` tokens,
  rounded up to whole blocks) and the recent window (the blocks holding the last
  ``kv_window`` tokens); return the blocks between.
- ``h2o`` (Heavy-Hitter Oracle): as streaming, plus up to ``heavy_hitter_tokens`` (whole
  blocks) between sinks and window: when there are more, the blocks with the least
  accumulated attention mass are returned (ties: the older block first).

The unit is the block, because a block is the unit of memory: for streaming / h2o a query
attends every token of every kept block (the recent window is ``kv_window`` to
``kv_window + G * block_size - 1`` tokens, below), and its positions are positions *inside the cache*
(the StreamingLLM rule): the i-th kept token has position i.

Rule for query ``p`` (every policy): the recent window starts at block
``window_start(p) = max(sink_blocks, floor(floor((p - window + 1) / block_size) / G) * G)``
(``G = stride_blocks``: ``kv_window_stride`` in blocks, default 1; always 1 for window models;
the window is ``kv_window`` to ``kv_window + G * block_size - 1`` tokens); the kept set of
query ``p`` depends only on ``p`` (and, for h2o, on the mass of earlier queries), never on how
the tokens were chunked: a chunk never crosses a position where ``window_start`` moves
(``max_chunk``), so every query of a chunk sees the same kept set it would see alone.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

MODES = ("none", "window", "streaming", "h2o")


@dataclass(frozen=True)
class EvictionPolicy:
    mode: str = "none"
    block_size: int = 16
    window: int = 0  # tokens (the model's sliding window, or kv_window)
    sink_blocks: int = 0
    heavy_blocks: int = 0
    stride_blocks: int = 1  # streaming / h2o: the window start moves this many blocks at a time

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def relative(self) -> bool:
        """Positions inside the cache (streaming, h2o) rather than in the text (window)."""
        return self.mode in ("streaming", "h2o")

    def window_start(self, position: int) -> int:
        """First block of the recent window of the query at ``position``: the block holding
        text position ``position - window + 1``, rounded down to a multiple of
        ``stride_blocks``, never below the sinks."""
        g = self.stride_blocks
        return max(self.sink_blocks, (position - self.window + 1) // self.block_size // g * g)

    def max_chunk(self, position: int) -> int:
        """Most tokens one chunk starting at ``position`` may compute. Streaming / h2o: up to
        the next position where the window start moves (each query keeps its own set).
        Window: ``max(window, block_size)`` tokens, so that a long prefill holds O(window)."""
        if self.mode == "window":
            return max(self.window, self.block_size)
        if not self.relative:
            return 1 << 62
        g = self.stride_blocks
        nxt = (self.window_start(position) // g + 1) * g * self.block_size + self.window - 1
        return max(1, nxt - position)

    def first_eviction(self) -> int:
        """The first position whose query may see fewer blocks than a plain model would:
        blocks wholly below it hold the same KV as without eviction (prefix-cacheable)."""
        if not self.relative:
            return 1 << 62
        g = self.stride_blocks
        first_start = -(-(self.sink_blocks + self.heavy_blocks + 1) // g) * g
        return first_start * self.block_size + self.window - 1

    def kept_blocks(self) -> int:
        """Most blocks in one sequence's table (what its queries attend), streaming / h2o."""
        return self.sink_blocks + self.heavy_blocks + -(-self.window // self.block_size) + self.stride_blocks

    def cacheable_blocks(self) -> int:
        return self.first_eviction() // self.block_size

    def blocks_per_sequence(self, chunk_tokens: int) -> int:
        """Most pool blocks one sequence holds at once (window: window + one chunk; streaming /
        h2o: recent window + sinks + heavy hitters, the last two with their originals)."""
        bs = self.block_size
        if self.mode == "window":
            chunk = min(chunk_tokens, self.max_chunk(0))
            return -(-(self.window + chunk) // bs) + 2
        recent = -(-self.window // bs) + self.stride_blocks
        # sinks and heavy hitters before a hole are turned copies of their written originals
        return 2 * (self.sink_blocks + self.heavy_blocks) + recent

    def victims(self, origins: list[int], position: int, mass: np.ndarray | None = None) -> list[int]:
        """Indices into ``origins`` (the kept blocks' original block numbers, ascending) that
        the query at ``position`` no longer keeps."""
        if not self.active:
            return []
        lo = bisect.bisect_left(origins, self.sink_blocks)
        hi = bisect.bisect_left(origins, self.window_start(position), lo)
        excess = hi - lo - self.heavy_blocks  # (heavy_blocks is 0 but for h2o)
        if excess <= 0:
            return []
        between = list(range(lo, hi))
        if self.mode != "h2o":
            return between
        # least mass first; ties: the older block (lexsort's last key is the primary one)
        order = np.lexsort((np.asarray(between), mass[between]))
        return sorted(between[i] for i in order[:excess])


def policy_for(mode: str, block_size: int, *, model_window: int | None, kv_window: int,
               attention_sinks: int, heavy_hitter_tokens: int, kv_window_stride: int = 0) -> EvictionPolicy:
    """The engine's policy: ``mode`` from ``kv_eviction``; none on a sliding-window model
    becomes ``window``. ``kv_window_stride``: tokens the window start moves at a time (0: one
    block)."""
    if mode == "none":
        if model_window:
            return EvictionPolicy("window", block_size, model_window)
        return EvictionPolicy("none", block_size)
    sinks = -(-attention_sinks // block_size)
    heavy = -(-heavy_hitter_tokens // block_size) if mode == "h2o" else 0
    stride = max(1, -(-kv_window_stride // block_size))
    return EvictionPolicy(mode, block_size, kv_window, sinks, heavy, stride)
