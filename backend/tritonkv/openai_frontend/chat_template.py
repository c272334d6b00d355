"""A checkpoint's chat template (``tokenizer_config.json``'s ``chat_template``), rendered the way
transformers' ``apply_chat_template`` renders it (transformers.utils.chat_template_utils):

- jinja2's ``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks`` and the
  ``loopcontrols`` extension; a ``tojson`` filter that does not escape HTML; globals
  ``raise_exception`` (a TemplateError with the template's message), ``strftime_now``;
- variables: ``messages``, ``add_generation_prompt``, ``tools`` (the request's tools as sent,
  OpenAI's ``{"type": "function", "function": {...}}``, or None), ``documents`` (None) and the
  named special tokens (``bos_token``, ``eos_token``, ``unk_token``, ... as strings);
- an assistant message's ``tool_calls[].function.arguments`` (OpenAI: JSON text) is given to
  the template as the object it encodes (as vLLM does: Llama 3.1 / Qwen2.5 templates write
  ``arguments | tojson``); text that is not a JSON object stays text;
- the rendered text is tokenised without adding special tokens (the template writes them).

A template may also be a list of named templates (``[{"name": "default", "template": ...}]``);
the one named "default" is used. A checkpoint without a template has none (``None``): chat
requests are refused, completions still work.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The template refused the messages (its ``raise_exception``) or failed to render."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _with_call_arguments(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except ValueError:
                args = None
            if isinstance(args, dict):
                call = {**call, "function": {**fn, "arguments": args}}
        out.append(call)
    return {**message, "tool_calls": out}


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        self.source = source
        self.special_tokens = special_tokens
        self._template = compile_template(source)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str) -> "ChatTemplate | None":
        """The template in ``tokenizer_config.json`` (or a ``chat_template.jinja`` beside it),
        None when the checkpoint has none."""
        cfg = {}
        cfg_path = os.path.join(checkpoint_dir, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                cfg = json.load(f)
        source = cfg.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja_path = os.path.join(checkpoint_dir, "chat_template.jinja")
        if not source and os.path.isfile(jinja_path):
            with open(jinja_path) as f:
                source = f.read()
        if not isinstance(source, str) or not source:
            return None
        special = {name: text for name in SPECIAL_TOKENS if (text := _token_text(cfg.get(name))) is not None}
        return cls(source, special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        try:
            return self._template.render(messages=[_with_call_arguments(m) for m in messages], tools=tools,
                                         documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a template may fail in any way on odd messages
            raise ChatTemplateError(f"the chat template failed on these messages: {type(exc).__name__}: {exc}") from None
