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
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class TurnOutput:
    """What the engine hands back for one turn, one or more times; the last has ``finished``."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # length / stop / eos / cancelled / error / closed
    cached_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class Turn:
    prompt_ids: list[int]  # only this turn's new tokens
    params: SamplingParams
    emit: Callable[[TurnOutput], None]
    is_cancelled: Callable[[], bool] = lambda: False
    end_sequence: bool = False  # release the sequence's KV after this turn
    error: str | None = None  # set: the request was rejected; answered in order
    # filled while running
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = -1  # context tokens whose KV was reused; -1 until known
    text: object = None  # TurnTextBuilder
    generator: object = None  # torch.Generator when the request set a seed
    arrival: float = field(default_factory=time.monotonic)


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

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
