"""Turns a Triton request into engine arguments, and engine outputs into Triton responses.

Only ``pb_utils``-shaped objects are touched here (passed in, never imported), so this module
imports on any machine. Rules:
- exactly one of ``text_input`` / ``input_ids``; a turn with END and neither just closes;
- START/END come from the control inputs when the model declares them, else request flags;
- per-response facts travel as output tensors (this Python backend cannot set response
  parameters): every response has ``text_output`` + ``output_ids``; the final one adds
  ``finish_reason``, ``cached_tokens`` and ``prompt_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from tritonkv.engine.requests import SamplingParams, TurnOutput

FLAG_SEQUENCE_START = 1  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
FLAG_SEQUENCE_END = 2


class BadRequest(ValueError):
    pass


@dataclass
class ParsedRequest:
    corr_id: object
    start: bool
    end: bool
    text: str | None
    input_ids: list[int] | None
    params: SamplingParams
    stream: bool
    cache_salt: str | None

    @property
    def close_only(self) -> bool:
        return self.end and self.text is None and self.input_ids is None


def _input(pb_utils, request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(pb_utils, request, name, cast, default):
    arr = _input(pb_utils, request, name)
    if arr is None or arr.size == 0:
        return default
    if arr.size != 1:
        raise BadRequest(f"input {name!r} must hold one value, got {arr.size}")
    value = arr.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise BadRequest(f"input {name!r} = {value!r} is not a valid {cast.__name__}") from None


def _parameters(request) -> dict:
    try:
        return json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return {}


def parse_request(pb_utils, request, *, stateless: bool, default_max_tokens: int) -> ParsedRequest:
    params = _parameters(request)

    def setting(name, cast, default):
        """Input tensor first, then the request parameter of the same name (HTTP generate)."""
        value = _scalar(pb_utils, request, name, cast, None)
        if value is None and name in params:
            try:
                value = cast(params[name])
            except (TypeError, ValueError):
                raise BadRequest(f"parameter {name!r} = {params[name]!r} is not a valid {cast.__name__}") from None
        return default if value is None else value

    text_arr = _input(pb_utils, request, "text_input")
    ids_arr = _input(pb_utils, request, "input_ids")
    text = None
    if text_arr is not None:
        if text_arr.size != 1:
            raise BadRequest(f"text_input must hold one string, got {text_arr.size}")
        raw = text_arr.reshape(-1)[0]
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    input_ids = None if ids_arr is None else [int(t) for t in ids_arr.reshape(-1)]
    if text is not None and input_ids is not None:
        raise BadRequest("send either text_input or input_ids, not both")

    stop_arr = _input(pb_utils, request, "stop")
    stop = () if stop_arr is None else tuple(
        s.decode() if isinstance(s, bytes) else str(s) for s in stop_arr.reshape(-1) if s)
    if not stop and isinstance(params.get("stop"), (list, str)):
        stop = (params["stop"],) if isinstance(params["stop"], str) else tuple(params["stop"])

    seed = setting("seed", int, None)
    sampling = SamplingParams(
        max_tokens=setting("max_tokens", int, default_max_tokens),
        temperature=setting("temperature", float, 1.0),
        top_k=setting("top_k", int, 0),
        top_p=setting("top_p", float, 1.0),
        seed=seed,
        stop=stop,
        ignore_eos=setting("ignore_eos", _bool, False),
    )
    if stateless:
        start, end, corr_id = True, True, None
    else:
        flags = request.flags()
        start = _scalar(pb_utils, request, "START", _bool, None)
        end = _scalar(pb_utils, request, "END", _bool, None)
        start = bool(flags & FLAG_SEQUENCE_START) if start is None else start
        end = bool(flags & FLAG_SEQUENCE_END) if end is None else end
        corr_id = request.correlation_id()
        if corr_id in (0, ""):
            raise BadRequest("model 'llm' needs a sequence id (correlation id); use llm_stateless "
                             "for one-shot requests")
    salt = params.get("cache_salt")
    return ParsedRequest(corr_id, start, end, text, input_ids, sampling,
                         setting("stream", _bool, not stateless), None if salt is None else str(salt))


def _bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(value)
    return bool(value)


def make_response(pb_utils, out: TurnOutput):
    if out.error is not None:
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(out.error))
    tensors = [
        pb_utils.Tensor("text_output", np.array([out.text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("output_ids", np.array(out.token_ids, dtype=np.int32)),
    ]
    if out.finished:
        tensors += [
            pb_utils.Tensor("finish_reason", np.array([(out.finish_reason or "").encode()], dtype=np.object_)),
            pb_utils.Tensor("cached_tokens", np.array([out.cached_tokens], dtype=np.int32)),
            pb_utils.Tensor("prompt_tokens", np.array([out.prompt_tokens], dtype=np.int32)),
        ]
    return pb_utils.InferenceResponse(output_tensors=tensors)


class ReplyChannel:
    """The engine's ``emit`` for one request: streams each delta, or (not streaming) merges
    them into the single final response that HTTP ``/generate`` requires."""

    def __init__(self, pb_utils, sender, stream: bool):
        self.pb_utils = pb_utils
        self.sender = sender
        self.stream = stream
        self.text: list[str] = []
        self.ids: list[int] = []

    def error(self, message: str) -> None:
        self(TurnOutput("", [], True, "error", error=message))

    def __call__(self, out: TurnOutput) -> None:
        final_flag = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not self.stream and out.error is None:
            self.text.append(out.text)
            self.ids.extend(out.token_ids)
            if not out.finished:
                return
            out = TurnOutput("".join(self.text), self.ids, True, out.finish_reason,
                             out.cached_tokens, out.prompt_tokens)
        self.sender.send(make_response(self.pb_utils, out), flags=final_flag if out.finished else 0)
