"""What callers hand the engine and what it hands back: sampling settings, one turn
(request) and its outputs.

Rules:
- A turn carries only its new prompt tokens; the conversation's earlier tokens live in the
  engine's ``Sequence``.
- ``emit`` is called on the engine thread, one or more times per turn; the last call has
  ``finished`` set and a ``finish_reason``. The engine emits token ids only; text and stop
  strings are the caller's (engine/output.py ``TextStream``: the frontend's, or the
  in-process ``Engine.submit``'s).
- An output is handed over on ``emit``: the engine keeps no reference to it, and the
  receiver may change it (``TextStream`` sets its text).
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

# the sampling settings live in tritonkv.sampling.params (their one definition); re-exported
from tritonkv.sampling.params import MAX_SEED, RequestError, SamplingParams, check_sampling  # noqa: F401
from tritonkv.sampling.params import check_token_ids

if TYPE_CHECKING:
    import torch

    from tritonkv.sampling.grammar import GrammarState
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
    # prompt_logprobs: one per prompt token of the turn (None where it has none: a conversation's
    # first token), on the turn's first output with tokens; a tuple, so that it is never taken
    # for a per-token field (engine/output.py)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    index: int = 0  # the choice (sample) this output belongs to (n > 1: engine/sample_group.py)
    # a refused opening turn (START without END) whose id holds no live conversation: the
    # sequence batcher's slot must be released (server/slot_release.py); decided by the
    # engine, in submission order
    release_slot: bool = False
    # on a turn's first output when it holds tokens: (arrival, scheduled, emitted), the
    # monotonic times (CLOCK_MONOTONIC: one clock for every process of the host) the engine
    # accepted the turn, first put it in a step, and emitted this output (server/first_token_stages.py)
    first_token_times: tuple[float, float, float] | None = None


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
    sample_index: int = 0  # which of its request's samples this turn is (engine/sample_group.py)
    # filled while running
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = -1  # context tokens whose KV was reused; -1 until known
    replied: bool = False  # an output was emitted
    generator: torch.Generator | None = None  # when the request set a seed
    penalty: PenaltyState | None = None  # when params.uses_penalties (sampling/penalty_state.py)
    prompt_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # token index -> its logprob
    grammar: GrammarState | None = None  # structured output (sampling/grammar.py)
    arrival: float = field(default_factory=time.monotonic)
    # when a step first ran it, or the prompt its samples share (monotonic; 0 until then); a
    # preempted turn keeps it (its recompute counts as prefill)
    scheduled: float = 0.0


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
    check_token_ids(params, vocab)


def encode_prompt(tokenizer, text: str, first_turn: bool) -> list[int]:
    """A turn's text as token ids (BOS only on a conversation's first turn), refusing what
    cannot be encoded, naming it."""
    if tokenizer is None:
        raise RequestError("this checkpoint has no tokenizer.json: send input_ids instead of text_input")
    if not text:
        raise RequestError("empty prompt: send a non-empty text_input or input_ids")
    return tokenizer.encode(text, add_special_tokens=first_turn)
