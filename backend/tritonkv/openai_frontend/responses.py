"""Response bodies: the whole-answer JSON and the SSE chunks of a streamed answer.

Rules (as OpenAI):
- ``finish_reason`` is "length" (max_tokens or the context limit) or "stop" (EOS or a stop
  string); the stop string itself is not in the text;
- ``usage`` = prompt_tokens, completion_tokens, total_tokens and
  ``prompt_tokens_details.cached_tokens`` (prompt tokens whose KV came from the prefix cache);
- ``logprobs`` (when the request asked) in OpenAI's shapes as the openai SDK parses them:
  chat ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``, completions
  ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; a token's string is its
  decoded text; ``top_logprobs`` holds the tokens of rank <= the asked count, best first;
- ``echo`` (completions): the text is the prompt's then the answer's; with logprobs, the prompt
  tokens come first in ``logprobs`` (the first with ``token_logprob`` and ``top_logprobs``
  None, as OpenAI), ``text_offset`` counting from the start of the prompt;
- a chat with tools (``tool_calls.ToolRequest``) answers ``message.tool_calls`` when a
  choice's text holds calls; streamed, ``delta.tool_calls`` entries (with ``index``) as each
  choice's ``ToolStream`` gives them (a named function's arguments as they come; other calls
  whole with the finish_reason);
- a stream is ``data: <chunk>`` events and a last ``data: [DONE]``; with
  ``stream_options.include_usage`` every chunk has ``"usage": null`` and one more chunk with
  no choices carries the usage; an error after the stream started is one ``data: {"error"}``
  event, then ``[DONE]``;
- ``n`` > 1: ``choices`` holds n entries (``index`` 0..n-1); a streamed chunk carries one
  choice, with its index; usage counts the prompt once and the tokens of every choice.
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

import orjson

from tritonkv.openai_frontend.errors import OpenAIError, internal
from tritonkv.openai_frontend.tool_calls import ToolRequest, ToolStream
from tritonkv.openai_frontend.triton_bridge import Delta

FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}


def finish_reason(engine_reason: str | None) -> str | None:
    return None if engine_reason is None else FINISH_REASONS.get(engine_reason, engine_reason)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _entries(per_token: dict) -> tuple[tuple[str, float], list[tuple[str, float, int]]]:
    """(chosen token text, logprob) and every reported (text, logprob, rank) of one token."""
    items = [(v.get("decoded_token", ""), float(v["logprob"]), int(v["rank"])) for v in per_token.values()]
    return items[0][:2], items


def chat_logprobs(tokens: list[dict], top: int) -> dict:
    content = []
    for per_token in tokens:
        (text, logprob), items = _entries(per_token)
        best = sorted((i for i in items if i[2] <= top), key=lambda i: i[2])[:top]
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                                         for t, v, _ in best]})
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[dict], top: int, offset: int, out: dict | None = None) -> dict:
    out = out or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for per_token in tokens:
        (text, logprob), items = _entries(per_token)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({t: v for t, v, r in sorted(items, key=lambda i: i[2]) if r <= top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def echo_logprobs(prompt: list[dict | None], first_token: str, top: int) -> tuple[dict, int]:
    """The prompt's part of an echoed completion's logprobs, and the text offset after it."""
    out = {"tokens": [first_token], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    out = completion_logprobs([e for e in prompt[1:] if e is not None], top, len(first_token), out)
    end = out["text_offset"][-1] + len(out["tokens"][-1])
    return out, end


class _Choice:
    """One choice's text, logprobs and end."""

    def __init__(self):
        self.text: list[str] = []
        self.logprobs: list[dict] = []
        self.text_offset = 0
        self.finish_reason: str | None = None


class Answer:
    """One response's identity and running totals; ``chat`` picks the object kinds;
    ``top_logprobs``: None when the request asked no logprobs, else its top count; ``n``: its
    choices (``index`` 0..n-1; usage counts the prompt once and every choice's tokens)."""

    def __init__(self, model: str, chat: bool, top_logprobs: int | None = None,
                 echo: tuple[str, str] | None = None, n: int = 1, tools: ToolRequest | None = None):
        """``echo``: (prompt text, its first token's text) of an echoed completion;
        ``tools``: a chat's tools (None: plain text)."""
        self.tools = tools
        self.echo = echo
        self.prompt_logprobs: list | None = None
        self.model = model
        self.chat = chat
        self.top_logprobs = top_logprobs
        self.choices = [_Choice() for _ in range(n)]
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def logprobs_of(self, tokens: list[dict] | None, index: int = 0) -> dict | None:
        """The ``logprobs`` of choice ``index`` holding ``tokens`` (None when not asked)."""
        if self.top_logprobs is None:
            return None
        tokens = tokens or []
        if self.chat:
            return chat_logprobs(tokens, self.top_logprobs)
        c = self.choices[index]
        if self.echo is not None and self.prompt_logprobs is not None and c.text_offset == 0:
            head, c.text_offset = echo_logprobs(self.prompt_logprobs, self.echo[1], self.top_logprobs)
            shaped = completion_logprobs(tokens, self.top_logprobs, c.text_offset, head)
            c.text_offset = shaped["text_offset"][-1] + len(shaped["tokens"][-1])
            return shaped
        shaped = completion_logprobs(tokens, self.top_logprobs, c.text_offset)
        c.text_offset = shaped["text_offset"][-1] + len(shaped["tokens"][-1]) if tokens else c.text_offset
        return shaped

    def add(self, delta: Delta) -> None:
        c = self.choices[delta.index]
        if delta.logprobs:
            c.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        c.text.append(delta.text)
        self.completion_tokens += delta.num_tokens
        if delta.finish_reason is not None:
            c.finish_reason = finish_reason(delta.finish_reason)
        if self.ends(delta):
            self.prompt_tokens = delta.prompt_tokens
            self.cached_tokens = delta.cached_tokens

    def ends(self, delta: Delta) -> bool:
        """``delta`` is the answer's last (one choice: the one with a finish reason)."""
        return delta.last or (len(self.choices) == 1 and delta.finish_reason is not None)

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def body(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            text = "".join(c.text) if self.echo is None else self.echo[0] + "".join(c.text)
            if self.chat:
                message, reason = {"role": "assistant", "content": text}, c.finish_reason
                if self.tools is not None:
                    message["content"], calls = self.tools.read(text)
                    if calls:
                        message["tool_calls"] = calls
                    reason = self.tools.finish_reason(reason, calls)
                choices.append({"index": i, "message": message, "logprobs": self.logprobs_of(c.logprobs, i),
                                "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text, "logprobs": self.logprobs_of(c.logprobs, i),
                                "finish_reason": c.finish_reason})
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def chunk(self, text: str | None, reason: str | None, include_usage: bool, role: bool = False,
              logprobs: list[dict] | None = None, index: int = 0, tool_calls: list[dict] | None = None) -> dict:
        shaped = None if role else self.logprobs_of(logprobs, index)
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if role else {"content": text or ""}
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": shaped, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text or "", "logprobs": shaped, "finish_reason": reason}
            kind = "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}


def sse(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def sse_events(answer: Answer, first: Delta, rest: AsyncIterator[Delta], include_usage: bool):
    """The SSE byte stream of an answer whose first delta is already in hand."""
    try:
        if answer.chat:
            for i in range(len(answer.choices)):
                yield sse(answer.chunk("", None, include_usage, role=True, index=i))
        delta = first
        held = [ToolStream(answer.tools) for _ in answer.choices] if answer.tools is not None else None
        while True:
            answer.add(delta)
            text, reason, deltas = delta.text, finish_reason(delta.finish_reason), None
            if held is not None:
                text, deltas = held[delta.index].feed(delta.text)
                if reason is not None:
                    tail, last, calls = held[delta.index].finish()
                    text, deltas = text + tail, (deltas or []) + (last or []) or None
                    reason = answer.tools.finish_reason(reason, calls)
            if text or deltas or delta.finish_reason is not None or delta.logprobs:
                yield sse(answer.chunk(text, reason, include_usage, logprobs=delta.logprobs, index=delta.index,
                                       tool_calls=deltas))
            if answer.ends(delta):
                break
            delta = await rest.__anext__()
        if include_usage:
            yield sse(answer.usage_chunk())
    except OpenAIError as exc:
        yield sse(exc.body())
    except StopAsyncIteration:
        yield sse(internal("the answer ended without a final response").body())
    finally:
        await rest.aclose()  # a client gone mid-stream: this cancels the Triton request
    yield DONE
