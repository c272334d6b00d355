"""A conversation (one correlation id) and the turns (requests) queued on it.

Rules:
- ``token_ids`` is the whole conversation so far; KV exists for ``token_ids[:num_computed]``.
- A sequence runs at most one turn at a time; later turns wait in ``pending`` in arrival
  order (Triton may deliver turn n+1 while turn n still streams).
- Between turns the sequence is idle: it keeps its KV blocks (unless preempted under memory
  pressure, which only resets ``num_computed``; the tokens stay).
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

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
