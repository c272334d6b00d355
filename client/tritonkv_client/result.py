"""What one request produced, and the clock it was measured with.

Timing rules (all ``time.perf_counter`` seconds, measured on the client):
- ``ttft_s``: request sent -> first response that carries a token;
- ``inter_token_s``: gaps between consecutive tokens' arrivals; tokens that arrive together in
  one response are 0 apart (a non-streamed reply has all gaps 0);
- ``tpot_s`` (time per output token): (last token - first token) / (tokens - 1), vLLM's definition;
- ``output_tokens_per_s``: tokens / ``e2e_s``, with ``e2e_s`` = request sent -> final response.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenDelta:
    """One streamed response: the new token ids and the text they completed (may be "")."""

    token_ids: list[int]
    text: str
    time_s: float  # arrival, perf_counter seconds

    @property
    def empty(self) -> bool:
        """No token and no text (a response that only carried the finish reason): not yielded."""
        return not (self.token_ids or self.text)


@dataclass
class Choice:
    """One of a request's n > 1 choices."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cached_tokens: int | None = None
    prompt_tokens: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    num_responses: int = 0
    # per token, when the request set ``logprobs``: {token id: {logprob, rank, decoded_token}}
    logprobs: list[dict] | None = None
    # per prompt token, when the request set ``prompt_logprobs`` (None for the first token)
    prompt_logprobs: list[dict | None] | None = None
    # n > 1: every choice, in index order (the fields above then hold choice 0's text, ids and
    # reason; the timings are choice 0's)
    choices: list[Choice] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tpot_s(self) -> float | None:
        if len(self.token_ids) < 2:
            return None
        return sum(self.inter_token_s) / (len(self.token_ids) - 1)

    @property
    def output_tokens_per_s(self) -> float | None:
        if not self.e2e_s or not self.token_ids:
            return None
        return len(self.token_ids) / self.e2e_s


class ResultBuilder:
    """Folds responses into a ``GenerationResult`` as they arrive."""

    def __init__(self, sent_at: float):
        self.sent_at = sent_at
        self.result = GenerationResult()
        self._last_token_at: float | None = None

    def add_tokens(self, ids: list[int], text: str, at: float) -> TokenDelta:
        r = self.result
        r.num_responses += 1
        if ids:
            if r.ttft_s is None:
                r.ttft_s = at - self.sent_at
            else:
                r.inter_token_s.append(at - self._last_token_at)
            r.inter_token_s.extend([0.0] * (len(ids) - 1))
            self._last_token_at = at
        r.token_ids.extend(ids)
        r.text += text
        return TokenDelta(list(ids), text, at)

    def add_response(self, parsed, at: float) -> TokenDelta:
        """One parsed response (``_responses.ParsedResponse``); the final one finishes the result."""
        delta = self.add_tokens(parsed.ids, parsed.text, at)
        if parsed.choices is not None:
            r = self.result
            r.choices = r.choices or [Choice() for _ in parsed.choices]
            for choice, (text, ids, reason) in zip(r.choices, parsed.choices):
                choice.text += text
                choice.token_ids.extend(ids)
                choice.finish_reason = reason or choice.finish_reason
        if parsed.logprobs is not None:
            self.result.logprobs = (self.result.logprobs or []) + parsed.logprobs
        if parsed.prompt_logprobs is not None:
            self.result.prompt_logprobs = parsed.prompt_logprobs
        if parsed.final:
            self.finish(at, parsed.finish_reason, parsed.cached_tokens, parsed.prompt_tokens)
        return delta

    def finish(self, at: float, finish_reason: str | None, cached_tokens: int | None,
               prompt_tokens: int | None) -> GenerationResult:
        r = self.result
        r.e2e_s = at - self.sent_at
        r.finish_reason = finish_reason
        r.cached_tokens = cached_tokens
        r.prompt_tokens = prompt_tokens
        return r


class DeltaStream:
    """Sync iteration over one reply (``grpc_client.TurnStream``, ``http_client.HttpStream``):
    ``for delta in reply`` gives the ``TokenDelta``s that carry tokens or text; ``result()``
    reads to the end. A subclass reads one response per ``_read_one()``, sets ``done`` after
    the last, and keeps its ``ResultBuilder`` in ``_builder``; an error it stored in ``_error``
    is raised once the reply is done."""

    done: bool
    _builder: ResultBuilder
    _error: Exception | None = None

    def _read_one(self) -> TokenDelta:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> TokenDelta:
        while not self.done:
            delta = self._read_one()
            if not delta.empty:
                return delta
        if self._error is not None:
            raise self._error
        raise StopIteration

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        return self._builder.result
