"""H2O, the Heavy-Hitter Oracle (``kv_eviction`` h2o): as StreamingLLM, plus up to
``heavy_hitter_tokens`` (whole blocks) between the sinks and the window.

Rules:
- When more blocks than that sit between sinks and window, the blocks with the least
  accumulated attention mass go (ties: the older block first). The mass is each decode
  query's, summed per block (``needs_attention_mass``); the KV manager keeps it, and the
  decisions, across preemption so a recompute evicts the same blocks at the same positions.
"""

from __future__ import annotations

import numpy as np

from tritonkv.cache.eviction.streaming import StreamingLLM


class HeavyHitterOracle(StreamingLLM):
    name = "h2o"
    needs_attention_mass = True
    parameter = "heavy_hitter_tokens"

    @classmethod
    def from_config(cls, config) -> "HeavyHitterOracle":
        return cls(config.block_size, config.kv_window, config.attention_sinks, config.kv_window_stride,
                   config.heavy_hitter_tokens)

    @classmethod
    def check_settings(cls, config, bad) -> None:
        super().check_settings(config, bad)
        if config.heavy_hitter_tokens <= 0:
            bad("heavy_hitter_tokens", "must be > 0 with kv_eviction='h2o' (tokens kept for their attention mass)")

    def choose(self, between: list[int], excess: int, mass: np.ndarray | None) -> list[int]:
        # least mass first; ties: the older block (lexsort's last key is the primary one)
        order = np.lexsort((np.asarray(between), mass[between]))
        return sorted(between[i] for i in order[:excess])

    def _middle(self) -> str:
        return f"{self.heavy_tokens} heavy hitters + "
