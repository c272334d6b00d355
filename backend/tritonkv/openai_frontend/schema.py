"""Request bodies of /v1/completions and /v1/chat/completions, and their checks.

Rules:
- a field this server does not know is refused with its name (as OpenAI does);
- the sampling fields are ``tritonkv.sampling.params``' (``PARAMETERS`` marked ``openai``),
  checked against its ranges (what the runner stores: int32, finite float32, ...) before
  anything is converted; OpenAI's tighter range for temperature ([0, 2]) applies on top. The
  vLLM extensions are accepted as vLLM's OpenAI server does (``top_k`` -1 = off,
  ``repetition_penalty``, ``min_p``, ``min_tokens``, ``stop_token_ids``, ``bad_words``, ``ignore_eos``,
  ``cache_salt``); ``logprobs`` is OpenAI's per endpoint (completions: a count of top tokens,
  chat: a boolean with ``top_logprobs``), at most ``MAX_LOGPROBS`` (20, as vLLM);
- ``n`` choices and completions' ``best_of`` (>= n, not streamed) share one prefill
  (engine/sample_group.py); chat ``tools`` / ``tool_choice`` are checked by ``tool_calls.py``;
  completions' ``echo`` (not streamed) prepends the prompt to the
  text and, with ``logprobs``, the prompt tokens' logprobs (``prompt_logprobs``) to the logprobs and refused otherwise, naming it;
- every check raises ``OpenAIError`` 400 whose message and ``param`` name the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tritonkv.openai_frontend.errors import bad_request
from tritonkv.openai_frontend.tool_calls import tool_request
from tritonkv.sampling.params import ANY_JSON_OBJECT, SamplingParams, check_samples, check_sampling
from tritonkv.sampling.params import MAX_LOGPROBS, MAX_STOP, PARAMETERS, ParameterError, check_value  # noqa: F401

INT64_MAX = 2**63 - 1  # the seed travels as an INT64 tensor
INT32_MAX = 2**31 - 1  # prompt token ids travel as INT32
OPENAI_TEMPERATURE_MAX = 2.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    best_of: int | None = None  # (vLLM's, on both endpoints)
    stream: bool | None = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    logprobs: Any = None
    user: str | None = None
    # vLLM's extensions
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list | None = None
    bad_words: list[str] | str | None = None
    cache_salt: str | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None


class ChatBody(_Body):
    messages: list[dict]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    store: bool | None = None
    metadata: dict | None = None


@dataclass
class Generation:
    """What one request asks the model for (after every check)."""

    model: str
    text: str | None  # prompt text (the model tokenises it, BOS included)
    input_ids: list[int] | None  # or prompt ids (chat: rendered and tokenised here)
    sampling: dict  # parameter name (tritonkv.sampling.params) -> value, only those the request set
    stream: bool
    include_usage: bool
    cache_salt: str | None = None
    echo: bool = False  # completions: the prompt precedes the answer (and its logprobs, when asked)
    tools: Any = None  # chat: tool_calls.ToolRequest (None: the answer is plain text)

    @property
    def max_tokens(self) -> int | None:  # None: the engine's default_max_tokens
        return self.sampling.get("max_tokens")


def parse_body(cls: type[_Body], raw: Any) -> _Body:
    if not isinstance(raw, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        name = loc[0] if loc else None
        where = ".".join(loc) or "body"
        if err["type"] == "extra_forbidden":
            raise bad_request(f"unrecognized request argument supplied: {where}", name) from None
        if err["type"] == "missing":
            raise bad_request(f"missing required parameter: {where}", name) from None
        raise bad_request(f"invalid value for {where!r}: {err['msg']} (got {err.get('input')!r:.80})", name) from None


def sampling(body: _Body, max_tokens: int | None, max_tokens_name: str) -> dict:
    """The sampling fields every endpoint shares, checked; ``max_tokens`` comes per endpoint."""
    values = {}
    for p in PARAMETERS:
        if not p.openai:
            continue
        name = max_tokens_name if p.name == "max_tokens" else p.name
        raw = max_tokens if p.name == "max_tokens" else getattr(body, p.name, None)
        if raw is None or (p.name == "top_k" and raw == -1):  # vLLM's -1: off
            continue
        if p.name == "logit_bias" and not raw:
            continue
        try:
            value = check_value(p.name, raw, name)
        except ParameterError as exc:
            raise bad_request(str(exc), name) from None
        if p.name == "temperature" and value > OPENAI_TEMPERATURE_MAX:
            raise bad_request(f"temperature must be in [0, 2], got {value}", name)
        if p.name == "seed" and value > INT64_MAX:
            raise bad_request(f"seed must be in [0, 2**63 - 1], got {value}", name)
        if value != p.default:
            values[p.name] = value
    if values.get("min_tokens", 0) > values.get("max_tokens", values.get("min_tokens", 0)):
        raise bad_request(f"min_tokens ({values['min_tokens']}) must be <= {max_tokens_name} "
                          f"({values['max_tokens']})", "min_tokens")
    _check_samples(values, bool(body.stream))
    options = body.stream_options or {}
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise bad_request(f"unrecognized stream_options: {', '.join(unknown)}", "stream_options")
    if options and not body.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options")
    return dict(model=body.model, sampling=values, stream=bool(body.stream), include_usage=include_usage,
                cache_salt=body.cache_salt)


def _check_samples(values: dict, stream: bool) -> None:
    """n / best_of (tritonkv.sampling.params ``check_samples``): best_of >= n, not streamed."""
    samples = SamplingParams(max_tokens=1, n=values.get("n", 1), best_of=values.get("best_of"))
    try:
        check_sampling(samples)
        check_samples(samples, stream, one_shot=True)
    except ParameterError as exc:
        raise bad_request(str(exc), "best_of" if samples.best_of is not None else "n") from None


def _logprobs(count, name: str) -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise bad_request(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {count!r:.40}", name)
    try:
        return check_value("logprobs", count, name)
    except ParameterError as exc:
        raise bad_request(str(exc), name) from None


def completion_generation(body: CompletionBody) -> Generation:
    if body.echo and body.stream:
        raise bad_request("'echo' with 'stream' is not supported by this server: send stream false", "echo")
    if body.suffix:
        raise bad_request("'suffix' is not supported by this server", "suffix")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"'prompt' holds {len(prompt)} prompts; this server takes one per request", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise bad_request("'prompt' is empty", "prompt")
    text = prompt if isinstance(prompt, str) else None
    ids = None if isinstance(prompt, str) else list(prompt)
    bad = next((t for t in ids or () if not 0 <= t <= INT32_MAX), None)
    if bad is not None:  # they travel as INT32; the model checks them against its vocabulary
        raise bad_request(f"'prompt' holds token id {bad}, outside [0, 2**31 - 1]", "prompt")
    gen = Generation(text=text, input_ids=ids, **sampling(body, body.max_tokens, "max_tokens"))
    if body.logprobs is not None and body.logprobs is not False:  # completions: the top count (0: the chosen)
        gen.sampling["logprobs"] = _logprobs(body.logprobs, "logprobs")
    if body.echo:
        gen.echo = True
        if "logprobs" in gen.sampling:  # the prompt's logprobs too, computed in its prefill
            gen.sampling["prompt_logprobs"] = gen.sampling["logprobs"]
    return gen


def chat_generation(body: ChatBody, prompt_ids: list[int], tool_parser: str | None = None) -> Generation:
    """``prompt_ids``: the messages rendered by the chat template and tokenised;
    ``tool_parser``: the served model's (tool_parsers.PARSERS key or None)."""
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise bad_request("send 'max_completion_tokens' or 'max_tokens', not both", "max_tokens")
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.logprobs is not None and not isinstance(body.logprobs, bool):
        raise bad_request(f"logprobs must be a boolean, got {body.logprobs!r:.40}", "logprobs")
    top = None if body.top_logprobs is None else _logprobs(body.top_logprobs, "top_logprobs")
    if top is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs true", "top_logprobs")
    tools = tool_request(body.tools, body.tool_choice, body.parallel_tool_calls, tool_parser)
    schema = _response_format(body.response_format)
    gen = Generation(text=None, input_ids=prompt_ids, **sampling(body, max_tokens, name))
    if schema is not None:
        gen.sampling["guided_json"] = schema
    if tools is not None:
        gen.tools = tools
        constraint = tools.guided_json()
        if constraint is not None and schema is not None:
            raise bad_request("send 'response_format' or a tool_choice that constrains the output ('required' or a "
                              "named function), not both", "tool_choice")
        if constraint is not None:
            try:
                gen.sampling["guided_json"] = check_value("guided_json", constraint, "tools")
            except ParameterError as exc:
                raise bad_request(str(exc), "tools") from None
    if body.logprobs:
        gen.sampling["logprobs"] = top or 0
    return gen


def _response_format(fmt: dict | None) -> str | None:
    """OpenAI's ``response_format`` as a JSON schema's text (``guided_json``), or None (text)."""
    if fmt is None or fmt.get("type") == "text":
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return ANY_JSON_OBJECT
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("'response_format.json_schema.schema' must be a JSON schema (an object)",
                              "response_format")
        try:
            return check_value("guided_json", schema, "response_format.json_schema.schema")
        except ParameterError as exc:
            raise bad_request(str(exc), "response_format") from None
    raise bad_request(f"'response_format.type' must be text, json_object or json_schema, got {kind!r:.40}",
                      "response_format")


def chat_messages(body: ChatBody) -> list[dict]:
    """Messages as the template sees them: ``role`` and ``content`` (a string; OpenAI's list of
    text parts is joined), other keys kept, keys whose value is None dropped (as transformers)."""
    if not body.messages:
        raise bad_request("'messages' is empty", "messages")
    out = []
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise bad_request(f"{where}.role is missing", "messages")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) "
                                      "are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of text parts", "messages")
        if content is None and role != "assistant":
            raise bad_request(f"{where}.content is missing", "messages")
        out.append({k: v for k, v in {**message, "content": content}.items() if v is not None})
    return out
