"""Reading one Triton response of the llm / llm_stateless models (shared by sync and asyncio)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParsedResponse:
    ids: list[int]
    text: str
    finish_reason: str | None
    cached_tokens: int | None
    prompt_tokens: int | None
    final: bool


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
    return ParsedResponse(
        ids=[] if ids is None else [int(i) for i in ids.reshape(-1)],
        text="" if text is None or text.size == 0 else _text(text.reshape(-1)[0]),
        finish_reason=None if finish is None else _text(finish),
        cached_tokens=None if cached is None else int(cached),
        prompt_tokens=None if prompt is None else int(prompt),
        final=flagged or finish is not None,
    )


def parse_json_response(body: dict) -> ParsedResponse:
    """One HTTP generate / generate_stream JSON object. Triton writes a one-element
    ``output_ids`` as a bare number; a missing one means no token in this response."""
    ids = body.get("output_ids", [])
    if not isinstance(ids, list):
        ids = [ids]
    finish = body.get("finish_reason")
    return ParsedResponse(
        ids=[int(i) for i in ids],
        text=body.get("text_output", "") or "",
        finish_reason=finish,
        cached_tokens=body.get("cached_tokens"),
        prompt_tokens=body.get("prompt_tokens"),
        final=finish is not None,
    )


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
