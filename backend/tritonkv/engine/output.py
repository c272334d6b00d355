"""Builds a turn's streamed deltas: incremental text, stop strings, held-back text.

Rule: while streaming, text that could still grow into a stop string is held back
(the last ``max(len(stop)) - 1`` characters); a matched stop string and what follows it are
never sent. Token-id deltas are sent as sampled (the ids of a stop string included).
"""

from __future__ import annotations

from dataclasses import fields, replace

from tritonkv.model.tokenizer import IncrementalDetokenizer, TextTokenizer


class TurnTextBuilder:
    def __init__(self, tokenizer: TextTokenizer | None, stop: tuple[str, ...]):
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a sampled token; returns (text delta to send now, a stop string matched)."""
        if self.detok is None:
            return "", False
        search_from = max(0, len(self.text) - self.hold)
        self.text += self.detok.push([token_id])
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self.hold), False

    def finish(self, stopped: bool) -> str:
        if self.detok is not None and not stopped:
            self.text += self.detok.flush()
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta


class TextStream:
    """One turn's output processing, between the engine's token outputs and the caller: text
    deltas (incremental detokenising) and stop strings. The frontend runs one per request;
    the in-process ``Engine.submit`` runs the same.

    Rules:
    - A final ``eos`` or ``stop`` output's last token is an EOS or stop token id: it adds no
      text.
    - A stop string ends the turn here: the output up to and including the token that
      completed it is sent as final (``stop``), ``on_stop(kept_tokens)`` tells the engine to
      end the turn keeping that many output tokens (it may have sampled more meanwhile), and
      every later output of the turn is dropped.
    - Any other field of an output (``cached_tokens``, fields added to ``TurnOutput`` later)
      passes through unchanged.
    - A fault in this turn's text (e.g. a tokenizer error) ends this turn alone: an error
      output, and ``on_stop(None)`` cancels it in the engine.
    """

    def __init__(self, tokenizer: TextTokenizer | None, stop: tuple[str, ...], emit, on_stop=None):
        self.text = TurnTextBuilder(tokenizer, stop)
        self.emit = emit
        self.on_stop = on_stop
        self.done = False
        self.num_tokens = 0

    def __call__(self, out) -> None:
        if self.done:
            return
        try:
            self._process(out)
        except Exception as exc:
            if self.done:
                raise  # the turn had ended (its final output or a stop): only the caller's emit failed
            self.done = True
            if self.on_stop is not None:
                self.on_stop(None)
            self.emit(replace(out, text="", token_ids=[], finished=True, finish_reason="error",
                              error=f"output failed: {type(exc).__name__}: {exc}"))

    def _process(self, out) -> None:
        ends = out.finished or out.finish_reason is not None  # (a choice of n ends on its reason)
        self.done = ends
        if out.error is not None or not out.token_ids:
            self.emit(out)
            return
        tokens = out.token_ids
        # an EOS or stop token (the engine's "eos" / "stop" on a token) adds no text
        spoken = tokens[:-1] if ends and out.finish_reason in ("eos", "stop") else tokens
        delta = []
        for i, token in enumerate(spoken):
            piece, stopped = self.text.push(token)
            delta.append(piece)
            if stopped:
                self.num_tokens += i + 1
                self.done = True
                if self.on_stop is not None:
                    self.on_stop(self.num_tokens)
                cut = {name: getattr(out, name)[:i + 1] for name in per_token_fields(out)}
                self.emit(replace(out, text="".join(delta), token_ids=tokens[:i + 1], finished=True,
                                  finish_reason="stop", **cut))
                return
        self.num_tokens += len(tokens)
        if ends and out.finish_reason in ("eos", "length", "stop"):
            delta.append(self.text.finish(False))
        out.text = "".join(delta)  # (handed over on emit: ours to change, engine/requests.py)
        self.emit(out)


class ChoiceStreams:
    """A request's output processing when it has n > 1 choices (engine/sample_group.py): one
    ``TextStream`` per choice, by the output's ``index``. A choice ends on its
    ``finish_reason`` (a stop string found here included); ``finished`` is set on the output
    that ends the last choice; an error ends the request. ``on_stop(kept_tokens, index)``."""

    def __init__(self, tokenizer: TextTokenizer | None, stop: tuple[str, ...], emit, on_stop, n: int):
        self.emit = emit
        self.on_stop = on_stop
        self.streams = [TextStream(tokenizer, stop, lambda out, i=i: self._emit(i, out),
                                   lambda kept, i=i: self._stopped(i, kept)) for i in range(n)]
        self.ended: set[int] = set()
        self.done = False

    def __call__(self, out) -> None:
        if self.done:
            return
        if out.error is not None and out.finished:  # the request failed (or was refused)
            self.done = True
            self.emit(out)
            return
        self.streams[out.index](out)

    def _stopped(self, index: int, kept: int | None) -> None:
        if self.on_stop is not None:
            self.on_stop(kept, index)

    def _emit(self, index: int, out) -> None:
        if out.finish_reason is not None:
            self.ended.add(index)
        ended = out.error is not None or len(self.ended) == len(self.streams)
        self.done = self.done or ended
        self.emit(replace(out, index=index, finished=ended))


def output_stream(tokenizer: TextTokenizer | None, params, emit, on_stop=None):
    """A request's output processing: a ``TextStream``, or ``ChoiceStreams`` when it returns
    n > 1 choices. ``on_stop(kept_tokens, index)``."""
    if params.n > 1:
        return ChoiceStreams(tokenizer, params.stop, emit, on_stop, params.n)
    return TextStream(tokenizer, params.stop, emit, on_stop and (lambda kept: on_stop(kept, 0)))


_LIST_FIELDS: dict[type, tuple[str, ...]] = {}
FIRST_OUTPUT_FIELDS = ("prompt_logprobs", "first_token_times")  # a merged output keeps its first part's


def per_token_fields(out) -> list[str]:
    """The fields of ``out`` annotated as lists that hold one entry per token id (``logprobs``,
    or any such field added to ``TurnOutput`` later): merged and cut along with ``token_ids``.
    (Per output, on the frontend's path: the candidates are found once per class.)"""
    names = _LIST_FIELDS.get(type(out))
    if names is None:
        names = _LIST_FIELDS[type(out)] = tuple(f.name for f in fields(out)
                                                if f.name != "token_ids" and "list" in str(f.type).lower())
    n = len(out.token_ids)
    return [name for name in names if isinstance(v := getattr(out, name), list) and len(v) == n]


def merge_outputs(outs: list) -> list:
    """Coalesce consecutive token outputs of one turn (of one choice) into one (text and ids
    concatenated, per-token fields too, the last one's other fields); an error output stays on
    its own."""
    merged, run = [], []

    def flush():
        if len(run) == 1:
            merged.append(run.pop())
        if not run:
            return
        last = run[-1]
        joined = {"text": "".join(o.text for o in run), "token_ids": [t for o in run for t in o.token_ids]}
        for name in {n for o in run for n in per_token_fields(o)}:
            joined[name] = [e for o in run for e in (getattr(o, name) or [None] * len(o.token_ids))]
        for name in FIRST_OUTPUT_FIELDS:  # sent once, on the turn's first output
            firsts = [v for o in run if (v := getattr(o, name, None)) is not None]
            if firsts:
                joined[name] = firsts[0]
        merged.append(replace(last, **joined))
        run.clear()

    for out in outs:
        if out.error is not None:
            flush()
            merged.append(out)
        else:
            if run and (run[-1].index != out.index or run[-1].finish_reason is not None):
                flush()  # (n > 1: a choice's outputs merge with its own only, up to its end)
            run.append(out)
    flush()
    return merged


def coalesce(items: list[tuple]) -> list[tuple]:
    """A frontend's backlog of ``(request id, output)`` pairs (several engine steps, received
    together) as fewer pairs: each request's outputs of one choice merged (``merge_outputs``).
    Rules: a choice's outputs keep their order; a merged output goes where its last part was,
    so a request's last output (``finished``) stays its last. One response per request then
    carries every token that waited, instead of one response per token (a frontend that falls
    behind catches up, as vLLM's output collector merges what its consumer has not taken)."""
    groups: dict[tuple, list] = {}
    last: dict[tuple, int] = {}
    for pos, (rid, out) in enumerate(items):
        key = (rid, out.index)
        groups.setdefault(key, []).append(out)
        last[key] = pos
    return [(key[0], merged) for key in sorted(groups, key=last.__getitem__)
            for merged in merge_outputs(groups[key])]

