"""Reading the responses of the llm / llm_stateless models: gRPC results, HTTP generate JSON
and the data of its server-sent events (read by httpx-sse), error bodies (shared by the sync
and asyncio clients)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from httpx_sse import EventSource

from tritonkv_client.errors import ServerError
from tritonkv_client.result import GenerationResult, ResultBuilder


@dataclass
class ParsedResponse:
    ids: list[int]
    text: str
    finish_reason: str | None
    cached_tokens: int | None
    prompt_tokens: int | None
    final: bool
    logprobs: list[dict] | None = None  # per token: {token id: {logprob, rank, decoded_token}}
    prompt_logprobs: list[dict | None] | None = None  # per prompt token, the same (None: the first)
    # n > 1: per choice, its new text, new ids and (final response) finish reason
    choices: list[tuple[str, list[int], str | None]] | None = None


def _choices(texts: list, ids: list[int], counts, reasons) -> list[tuple[str, list[int], str | None]]:
    """An n > 1 response's elements (server/triton_choices.py: ``output_ids`` split by
    ``num_output_tokens``)."""
    out, at = [], 0
    for i, text in enumerate(texts):
        n = int(counts[i])
        out.append((_text(text), ids[at:at + n], None if reasons is None else _text(reasons[i])))
        at += n
    return out


def _logprobs(value) -> list[dict] | None:
    """The ``logprobs`` output (one JSON string; HTTP may wrap it in a list)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None:
        return None
    parsed = json.loads(_text(value) if not isinstance(value, str) else value)
    return parsed if isinstance(parsed, list) else None


def _scalar(result, name):
    arr = result.as_numpy(name)
    if arr is None or arr.size == 0:
        return None
    return arr.reshape(-1)[0]


def parse_grpc_result(result) -> ParsedResponse:
    """A ``tritonclient.grpc.InferResult`` as data. The final response of a request is the one
    flagged ``triton_final_response`` or, when that flag was not asked for (the asyncio stream
    cannot ask), the one carrying ``finish_reason``."""
    ids = result.as_numpy("output_ids")
    text = result.as_numpy("text_output")
    finish = _scalar(result, "finish_reason")
    cached = _scalar(result, "cached_tokens")
    prompt = _scalar(result, "prompt_tokens")
    params = result.get_response().parameters
    flagged = "triton_final_response" in params and params["triton_final_response"].bool_param
    if text is not None and text.size > 1:
        reasons = result.as_numpy("finish_reason")
        choices = _choices(list(text.reshape(-1)), [int(i) for i in ids.reshape(-1)],
                           result.as_numpy("num_output_tokens").reshape(-1),
                           None if reasons is None else list(reasons.reshape(-1)))
        return ParsedResponse(choices[0][1], choices[0][0], choices[0][2], None if cached is None else int(cached),
                              None if prompt is None else int(prompt), flagged or reasons is not None,
                              choices=choices)
    return ParsedResponse(
        ids=[] if ids is None else [int(i) for i in ids.reshape(-1)],
        text="" if text is None or text.size == 0 else _text(text.reshape(-1)[0]),
        finish_reason=None if finish is None else _text(finish),
        cached_tokens=None if cached is None else int(cached),
        prompt_tokens=None if prompt is None else int(prompt),
        final=flagged or finish is not None,
        logprobs=_logprobs(_scalar(result, "logprobs")),
        prompt_logprobs=_logprobs(_scalar(result, "prompt_logprobs")),
    )


def parse_json_response(body: dict) -> ParsedResponse:
    """One HTTP generate / generate_stream JSON object. Triton writes a one-element
    ``output_ids`` as a bare number; a missing one means no token in this response."""
    ids = body.get("output_ids", [])
    if not isinstance(ids, list):
        ids = [ids]
    finish = body.get("finish_reason")
    texts = body.get("text_output")
    if isinstance(texts, list) and len(texts) > 1:
        counts = body.get("num_output_tokens")
        choices = _choices(texts, [int(i) for i in ids], counts, finish)
        return ParsedResponse(choices[0][1], choices[0][0], choices[0][2], body.get("cached_tokens"),
                              body.get("prompt_tokens"), finish is not None, choices=choices)
    return ParsedResponse(
        ids=[int(i) for i in ids],
        text=body.get("text_output", "") or "",
        finish_reason=finish,
        cached_tokens=body.get("cached_tokens"),
        prompt_tokens=body.get("prompt_tokens"),
        final=finish is not None,
        logprobs=_logprobs(body.get("logprobs")),
        prompt_logprobs=_logprobs(body.get("prompt_logprobs")),
    )


def parse_json_event(data: str, model: str) -> ParsedResponse:
    """One ``generate_stream`` event's data; an ``{"error"}`` event is raised as ``ServerError``."""
    body = json.loads(data)
    error = error_of(body, model, 200)
    if error is not None:
        raise error
    return parse_json_response(body)


def reply_result(raw, model: str, status, sent_at: float, at: float) -> GenerationResult:
    """The ``GenerationResult`` of a whole ``generate`` reply (one JSON object, received at ``at``)."""
    data = json.loads(raw)
    error = error_of(data, model, status)
    if error is not None:
        raise error
    parsed = parse_json_response(data)
    builder = ResultBuilder(sent_at)
    builder.add_response(parsed, at)
    return builder.finish(at, parsed.finish_reason, parsed.cached_tokens, parsed.prompt_tokens)


def error_from_response(response, model: str) -> ServerError:
    """The ``ServerError`` for a non-200 reply (an ``httpx.Response`` whose body was read): a
    JSON ``{"error"}`` body, or the same inside a server-sent event (generate_stream answers
    errors that way)."""
    status = response.status_code
    if "text/event-stream" in response.headers.get("content-type", ""):
        candidates = [event.data for event in EventSource(response).iter_sse()]
    else:
        candidates = [response.text]
    for candidate in candidates:
        try:
            err = error_of(json.loads(candidate), model, status)
        except ValueError:
            continue
        if err is not None:
            return err
    return ServerError(f"HTTP {status} from model {model!r}: {response.text[:500]}", model=model, status=status)


def error_of(body, model: str, status) -> ServerError | None:
    """The ``ServerError`` a JSON ``{"error": ...}`` object stands for, or None."""
    if isinstance(body, dict) and "error" in body:
        return ServerError(str(body["error"]), model=model, status=status)
    return None


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
