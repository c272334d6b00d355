"""What callers hand the engine and what it hands back: sampling settings, one turn
(request) and its outputs.

Rules:
- A turn carries only its new prompt tokens; the conversation's earlier tokens live in the
  engine's ``Sequence``.
- ``emit`` is called on the engine thread, one or more times per turn; the last call has
  ``finished`` set and a ``finish_reason``. The engine emits token ids only; text and stop
  strings are the caller's (engine/output.py ``TextStream``: the frontend's, or the
  in-process ``Engine.submit``'s).
- Every output carries ``cached_tokens`` and ``prompt_tokens`` as known so far, so a caller
  that ends a turn itself (a stop string) can answer with them.
- ``TurnOutput`` crosses the core's transport field by field (core/messages.py): a field
  added here travels without a transport change (msgspec-encodable types only).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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
    # a refused opening turn (START without END) whose id holds no live conversation: the
    # sequence batcher's slot must be released (server/slot_release.py); decided by the
    # engine, in submission order
    release_slot: bool = False


@dataclass
class Turn:
    prompt_ids: list[int]  # only this turn's new tokens
    params: SamplingParams
    emit: Callable[[TurnOutput], None]
    is_cancelled: Callable[[], bool] = lambda: False
    end_sequence: bool = False  # release the sequence's KV after this turn
    error: str | None = None  # set: the request was rejected; answered in order
    request_id: Hashable = None  # names the turn in ``Engine.abort``
    opens_slot: bool = False  # START without END on a sequence-batched model
    # filled while running
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = -1  # context tokens whose KV was reused; -1 until known
    replied: bool = False  # an output was emitted
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
    owner: Hashable = None  # the frontend that sent it (``Engine.drop_owner``)


@dataclass(frozen=True)
class PromptLimits:
    """What a prompt is checked against before it is submitted (the engine's, or the core's
    as its frontends receive them)."""

    vocab_size: int
    max_model_len: int
    context_limit: int | None  # None: a bounded-KV policy, conversations are unbounded


def check_prompt(prompt_ids: list[int], params: SamplingParams, limits: PromptLimits) -> None:
    """Refuse a prompt or sampling settings the engine cannot serve, naming what was wrong."""
    vocab = limits.vocab_size
    if not prompt_ids:
        raise RequestError("empty prompt: send a non-empty text_input or input_ids")
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab}); "
                           f"{len(bad)} ids are out of range")
    if params.max_tokens <= 0:
        raise RequestError(f"max_tokens must be > 0, got {params.max_tokens}")
    if limits.context_limit is not None and params.max_tokens > limits.max_model_len:
        raise RequestError(f"max_tokens {params.max_tokens} exceeds the context limit of "
                           f"{limits.max_model_len} tokens (max_model_len)")
    check_sampling(params)
