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

# the sampling settings live in tritonkv.sampling.params (their one definition); re-exported
from tritonkv.sampling.params import MAX_SEED, RequestError, SamplingParams, check_sampling  # noqa: F401

if TYPE_CHECKING:
    import torch

    from tritonkv.engine.output import TurnTextBuilder
    from tritonkv.sampling.logprobs import TokenLogprob
    from tritonkv.sampling.penalty_state import PenaltyState


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
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the request asked


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
    penalty: PenaltyState | None = None  # when params.uses_penalties (sampling/penalty_state.py)
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
