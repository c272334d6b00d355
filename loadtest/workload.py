"""Load-test workload: prompts for each scenario and the locust request events a reply becomes.

Scenarios:
- ``single``: independent single prompts (a fresh conversation of one turn / one HTTP request);
- ``multiturn``: chats of 3-6 turns; over gRPC each turn sends only its new text and must be
  served from the conversation's KV (``cached_tokens`` = all earlier context - 1), over HTTP
  (stateless) each turn re-sends the whole history and the prefix cache is what helps;
- ``shared-prefix``: every user sends the same long system prompt followed by its own question
  (prefix cache).

Metrics, one locust request event each per successful turn, ``name`` = "<proto> <scenario>":
``request_type`` "e2e" (ms; response_length = output tokens), "TTFT" (ms), "TPOT" (ms, for
replies of 2+ tokens), "tok/s" (output tokens per second of that reply — the column says ms,
the value is tokens/s), "cached" (context tokens whose KV was reused — the value is a count).
A failed turn is one "e2e" failure carrying the error; a turn whose KV was not reused as the
protocol promises is a failure too.
"""

from __future__ import annotations

import random
import time

SCENARIOS = ("single", "multiturn", "shared-prefix")
METRIC_TYPES = ("e2e", "TTFT", "TPOT", "tok/s", "cached")

_WORDS = ("the of and to in is was for on that with as by at from kv cache block token prefix "
          "model server batch stream sequence turn reply prompt latency throughput user chat "
          "triton paged attention layer head decode prefill").split()

SYSTEM_PROMPT = ("You are a helpful assistant for the tritonkv serving stack. Answer briefly, cite "
                 "the component you mean, and never invent configuration keys. ") * 5


def sentence(rng: random.Random, min_words: int, max_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize() + "."


def single_prompt(rng: random.Random) -> str:
    return sentence(rng, 6, 16)


def chat_turns(rng: random.Random) -> list[str]:
    return [sentence(rng, 3, 9) + " " for _ in range(rng.randint(3, 6))]


def shared_prefix_prompt(rng: random.Random) -> str:
    return SYSTEM_PROMPT + "Question: " + sentence(rng, 4, 10)


class KVReuseError(AssertionError):
    """A conversation turn was not served from the conversation's KV."""


def expected_cached_tokens(previous_turns) -> int | None:
    """KV the server must reuse for the next turn of a conversation: every earlier prompt and
    output token except the last output token (whose KV is written when it is fed back).
    None when there is no rule: the first turn (its prompt may hit another conversation's
    cached prefix: any reuse is right), or an earlier turn stopped early on a stop string."""
    if not previous_turns:
        return None
    if any(t.finish_reason not in ("length", "eos") for t in previous_turns):
        return None
    return sum(t.prompt_tokens + t.num_tokens for t in previous_turns) - 1


def check_kv_reuse(result, previous_turns) -> None:
    expected = expected_cached_tokens(previous_turns)
    if expected is not None and result.cached_tokens != expected:
        raise KVReuseError(f"turn {len(previous_turns) + 1} reused {result.cached_tokens} context tokens; "
                           f"the conversation had {expected} in KV")


def report_turn(request_event, name: str, result=None, exception: BaseException | None = None,
                started_at: float | None = None) -> None:
    """Fire the locust request events for one turn (see the module docstring)."""
    if exception is not None or result is None:
        elapsed_ms = 0.0 if started_at is None else (time.perf_counter() - started_at) * 1000
        request_event.fire(request_type="e2e", name=name, response_time=elapsed_ms, response_length=0,
                           exception=exception or RuntimeError("no result"), context={})
        return
    values = {"e2e": result.e2e_s * 1000,
              "TTFT": None if result.ttft_s is None else result.ttft_s * 1000,
              "TPOT": None if result.tpot_s is None else result.tpot_s * 1000,
              "tok/s": result.output_tokens_per_s,
              "cached": result.cached_tokens}
    for kind in METRIC_TYPES:
        if values[kind] is not None:
            request_event.fire(request_type=kind, name=name, response_time=values[kind],
                               response_length=result.num_tokens if kind == "e2e" else 0,
                               exception=None, context={})
