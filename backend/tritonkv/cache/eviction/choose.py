"""Which eviction policy serves: chosen once, from the settings, through a map.

Adding a policy is a new class (a subclass of ``EvictionPolicy``) and its entry here.
"""

from __future__ import annotations

from tritonkv.cache.eviction.h2o import HeavyHitterOracle
from tritonkv.cache.eviction.none import NoEviction
from tritonkv.cache.eviction.policy import EvictionPolicy
from tritonkv.cache.eviction.streaming import StreamingLLM
from tritonkv.cache.eviction.window import SlidingWindow

# the kv_eviction values; a sliding-window model gets SlidingWindow (its own bound) instead of none
KV_EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    "none": NoEviction, "streaming": StreamingLLM, "h2o": HeavyHitterOracle}
# every policy that returns blocks of live sequences (their stats keys)
EVICTING_POLICIES = ("window", "streaming", "h2o")


def policy_for(config, model_window: int | None = None) -> EvictionPolicy:
    """The policy of ``config`` (an EngineConfig: kv_eviction, block_size, kv_window,
    attention_sinks, heavy_hitter_tokens, kv_window_stride) on a model whose sliding window is
    ``model_window`` (None: none)."""
    policy = KV_EVICTION_POLICIES[config.kv_eviction]
    if not model_window:
        return policy.from_config(config)
    if policy is not NoEviction:
        raise ValueError(f"parameter 'kv_eviction' = {config.kv_eviction!r}: this model attends a sliding "
                         f"window of {model_window} tokens, which already bounds its KV "
                         "(blocks outside the window are returned); use kv_eviction none")
    return SlidingWindow(config.block_size, model_window)
