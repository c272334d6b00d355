"""The eviction policy interface: every decision a bounded-KV policy takes (torch-free).

A policy decides, for one sequence, which of its kept blocks go back to the pool, how long
one chunk may be, which blocks may be shared through the prefix index, how many blocks a
sequence holds at most (the capacity bound), and whether it needs attention mass. The KV
manager, the scheduler, the engine and the capacity figures ask the policy object; no other
code reads the ``kv_eviction`` string. The policies: none.py, window.py, streaming.py,
h2o.py; choose.py picks one from the settings.

Rules every policy keeps:
- The unit is the block, because a block is the unit of memory.
- The kept set of the query at ``position`` depends only on ``position`` (and, for h2o, on
  the mass of earlier queries), never on how the tokens were chunked: a chunk never crosses
  a position where the kept set changes (``max_chunk``).
- ``victims`` never names a block a later query needs: eviction is final.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

UNBOUNDED = 1 << 62


def model_limit(requested: int, max_positions: int) -> int:
    return min(requested or max_positions, max_positions)


class EvictionPolicy:
    """No eviction: a sequence keeps every block of its text (the base every policy refines)."""

    name: ClassVar[str] = "none"  # the kv_eviction value, and the stats key of the blocks it returns
    evicts: ClassVar[bool] = False  # returns blocks of live sequences
    # positions inside the cache (StreamingLLM): kept keys re-rotate when blocks before them go
    positions_in_cache: ClassVar[bool] = False
    needs_attention_mass: ClassVar[bool] = False  # h2o: each decode query's mass per block
    parameter: ClassVar[str] = "kv_eviction"  # the setting an error about the bound names

    def __init__(self, block_size: int):
        self.block_size = block_size

    @classmethod
    def check_settings(cls, config, bad) -> None:
        """Refuse settings this policy cannot serve: ``bad(parameter, why)`` raises."""

    def max_chunk(self, position: int) -> int:
        """Most tokens one chunk starting at ``position`` may compute."""
        return UNBOUNDED

    def cacheable_blocks(self) -> int:
        """Blocks from the start whose KV is the same as without eviction (prefix-shareable)."""
        return UNBOUNDED

    def victims(self, origins: list[int], position: int, mass: np.ndarray | None = None) -> list[int]:
        """Indices into ``origins`` (the kept blocks' original block numbers, ascending) that
        the query at ``position`` and every later one no longer keep."""
        return []

    def blocks_per_sequence(self, chunk_tokens: int) -> int | None:
        """Most pool blocks one sequence holds at once, however long it runs, computing up to
        ``chunk_tokens`` per step (None: unbounded, it holds its whole context)."""
        return None

    def max_model_len(self, requested: int, max_positions: int, pool_tokens: int) -> int:
        """The engine's max_model_len, the longest context a block table spans: ``requested``
        (the max_model_len setting; 0: the model's ``max_positions``), never past the model's
        positions, and bounded by the pool unless the policy keeps every table short."""
        return min(model_limit(requested, max_positions), pool_tokens)

    def context_limit(self, max_model_len: int) -> int | None:
        """The longest conversation (None: unbounded)."""
        return max_model_len

    def check_fits(self, pool_blocks: int, chunk_tokens: int, max_positions: int, max_model_len: int) -> None:
        """Raise ValueError naming the parameter to change when one sequence's bound cannot be
        served by this pool / model."""

    def describe(self) -> str:
        """The bound, as the capacity report and the startup log state it."""
        return "none (each sequence holds its whole context)"
