"""What callers hand the engine and what it hands back: sampling settings, one turn
(request) and its outputs.

Rules:
- A turn carries only its new prompt tokens; the conversation's earlier tokens live in the
  engine's ``Sequence``.
- ``emit`` is called on the engine thread, one or more times per turn; the last call has
  ``finished`` set and a ``finish_reason``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tritonkv.engine.output import TurnTextBuilder


class RequestError(ValueError):
    """Bad input from a client: the message says what was wrong and what to do."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


MAX_SEED = 2**64 - 1


def check_sampling(params: SamplingParams) -> None:
    """Refuse sampling values the sampler cannot honour, naming the parameter."""
    import math

    t, p, k = params.temperature, params.top_p, params.top_k
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
        raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    if not (isinstance(p, (int, float)) and math.isfinite(p) and 0 < p <= 1):
        raise RequestError(f"top_p must be in (0, 1], got {p!r}")
    if not (isinstance(k, int) and k >= 0):
        raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
    if params.seed is not None and not (isinstance(params.seed, int) and 0 <= params.seed <= MAX_SEED):
        raise RequestError(f"seed must be an integer in [0, 2**64 - 1], got {params.seed!r}")


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
    text: TurnTextBuilder | None = None
    generator: torch.Generator | None = None  # when the request set a seed
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class Submission:
    """One ``Engine.submit`` call, applied on the engine thread in submission order."""

    corr_id: Hashable
    turn: Turn
    start: bool
    stateless: bool = False
    extra_keys: tuple = ()
    close_only: bool = False  # no generation, just END
    error: str | None = None  # the request was invalid; answered with this error in order
