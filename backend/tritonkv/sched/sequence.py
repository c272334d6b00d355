"""A conversation (one correlation id) and the turns (requests) queued on it.

Rules:
- ``token_ids`` is the whole conversation so far; KV exists for ``token_ids[:num_computed]``.
- A sequence runs at most one turn at a time; later turns wait in ``pending`` in arrival
  order (Triton may deliver turn n+1 while turn n still streams).
- Between turns the sequence is idle: it keeps its KV blocks (unless preempted under memory
  pressure, which only resets ``num_computed``; the tokens stay).
- A request with n (or best_of) > 1 samples (engine/sample_group.py) runs as a *parent* that
  computes only the prompt's first ``fork_at`` tokens (whole blocks, never the last token)
  and never samples, and one *sample* sequence per choice that waits (``parent`` set) until
  the scheduler forks it off the parent: it then holds the parent's blocks too
  (cache/kv_cache_manager.py ``fork``) and computes only the rest of the prompt itself.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (a type only: sched/ imports nothing from the engine)
    from tritonkv.engine.requests import Turn


class SeqStatus(enum.Enum):
    IDLE = "idle"  # live, no turn running
    RUNNING = "running"  # a turn is being prefilled or decoded
    ENDED = "ended"


@dataclass
class Sequence:
    seq_id: object
    extra_keys: tuple = ()
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.IDLE
    turn: Turn | None = None
    pending: deque = field(default_factory=deque)
    last_active: float = field(default_factory=time.monotonic)
    admitted_at: int = 0  # engine step counter when the current turn started (preemption order)
    stateless: bool = False  # one-turn sequence from llm_stateless: ends with its turn
    owner: object = None  # the frontend whose conversation this is (core/)
    fork_at: int | None = None  # a parent of samples: the tokens it computes before they fork
    # a parent's samples not forked yet / a sample waiting for its parent's fork
    samples: list[Sequence] = field(default_factory=list, repr=False, compare=False)
    parent: Sequence | None = field(default=None, repr=False, compare=False)

    @property
    def num_uncomputed(self) -> int:
        end = len(self.token_ids) if self.fork_at is None else self.fork_at
        return end - self.num_computed
