"""``kv_eviction`` none on a model without a sliding window: every block is kept."""

from __future__ import annotations

from tritonkv.cache.eviction.policy import EvictionPolicy


class NoEviction(EvictionPolicy):
    """The interface's defaults: nothing returned, chunks unlimited, every full block shareable."""

    @classmethod
    def from_config(cls, config) -> "NoEviction":
        return cls(config.block_size)
