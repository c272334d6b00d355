"""The startup heap is frozen out of Python's garbage collector.

Rule: a long-lived process calls ``freeze_startup_heap`` once its startup is done (the engine
core once its engine is built, each frontend at the end of ``initialize``): what is alive then
(modules, the model, the tokenizer; ~300,000 objects in a demo engine's process) moves to the
collector's permanent generation, so a full collection later scans only what was made since
instead of pausing the step loop or the response path for all of it
(bench/results/gc_pause_cpu.md). vLLM's EngineCore and API server do the same.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze what survives; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
