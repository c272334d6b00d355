"""Tool call parsers: a model family's way of writing calls in its text, read back as
(content, calls), as vLLM's parsers of the same names read them.

- ``llama3_json`` (Llama 3.1 / 3.2 / 3.3): the text (after leading whitespace) starts with
  ``<|python_tag|>`` or ``{`` and is one or more JSON objects ``{"name": ..., "parameters":
  {...}}`` (``"arguments"`` also read) separated by ``;``; content is None. Anything else is
  plain content.
- ``hermes`` (Qwen2 / Qwen2.5 / Qwen3, Hermes): each call is ``<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`` (the last one may lack its closing tag); content is the
  text before the first ``<tool_call>`` (None when blank).
- A text that starts like a call but does not parse is plain content (no calls).

The family default (``FAMILY_PARSERS``, by config.json's ``model_type``) is overridden by the
frontend's ``--tool-call-parser``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


PYTHON_TAG = "<|python_tag|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


def parsed_call(obj, args_keys: tuple[str, ...]) -> ParsedCall | None:
    """``{"name": str, <first of args_keys>: object}`` as a call, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), None)
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_llama3_json(text: str) -> tuple[str | None, list[ParsedCall] | None]:
    body = text.lstrip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):]
    elif not body.startswith("{"):
        return text, None
    decoder, calls, at = json.JSONDecoder(), [], 0
    body = body.strip()
    while at < len(body):
        try:
            obj, end = decoder.raw_decode(body, at)
        except ValueError:
            return text, None
        call = parsed_call(obj, ("parameters", "arguments"))
        if call is None:
            return text, None
        calls.append(call)
        at = end
        while at < len(body) and body[at] in "; \t\r\n":
            at += 1
    return (None, calls) if calls else (text, None)


def parse_hermes(text: str) -> tuple[str | None, list[ParsedCall] | None]:
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return text, None
    calls = []
    for closed, open_end in _HERMES.findall(text[start:]):
        try:
            call = parsed_call(json.loads(closed or open_end), ("arguments", "parameters"))
        except ValueError:
            return text, None
        if call is None:
            return text, None
        calls.append(call)
    content = text[:start]
    return (content if content.strip() else None), calls


PARSERS = {"llama3_json": parse_llama3_json, "hermes": parse_hermes}
FAMILY_PARSERS = {"llama": "llama3_json", "qwen2": "hermes", "qwen2_moe": "hermes", "qwen3": "hermes",
                  "qwen3_moe": "hermes"}


def held_from(parser: str | None, text: str) -> int:
    """For a streamed "auto" answer: the index in ``text`` (all generated so far) from which
    the text may still turn out to be a call and is held back (len(text): nothing held)."""
    if parser == "llama3_json":
        body = text.lstrip()
        if not body or body.startswith("{") or body.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(body):
            return 0
        return len(text)
    if parser == "hermes":
        start = text.find(TOOL_CALL_OPEN)
        if start >= 0:
            return start
        for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):  # a tag that may be arriving
            if TOOL_CALL_OPEN.startswith(text[-k:]):
                return len(text) - k
        return len(text)
    return len(text)
