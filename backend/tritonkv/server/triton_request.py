"""Turns a Triton request into engine arguments (``triton_response``: engine outputs into
Triton responses; ``request_values``: the conversion and range checks of single values).

Only ``pb_utils``-shaped objects are touched here (passed in, never imported), so this module
imports on any machine. Rules:
- exactly one of ``text_input`` / ``input_ids``; a turn with END and neither just closes, any
  other request without a prompt is refused;
- START/END come from the control inputs when the model declares them, else request flags;
- the input contract of Triton's vLLM backend is accepted too (``sampling_parameters``,
  ``exclude_input_in_output``, ``return_*`` flags; see ``vllm_contract``): what a request asks
  of its replies is its ``ReplyForm``.

Admission is total: everything taken from a request (tensors, request parameters, their types,
shapes, encodings and sizes) is checked and converted here, in the request's own context, and
any fault is a ``BadRequest`` naming the input or parameter. A setting (one of
``tritonkv.sampling.params.PARAMETERS``: ``max_tokens``, ``temperature``, ...) comes from its
input tensor or, as HTTP ``/generate`` sends fields that
are not inputs and gRPC clients may do, from the request parameter of the same name (not
both); any other parameter is refused with the list of known ones. The keys of a
``sampling_parameters`` JSON object are request parameters too. Size limits are applied
before any work: ``input_ids`` longer than ``max_model_len`` before converting them, and a
``text_input`` longer than ``max_text_bytes`` (what ``max_model_len`` tokens can cover, see
``TextTokenizer.max_text_bytes``) before decoding or tokenising it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tritonkv.engine.requests import RequestError, SamplingParams, TurnOutput, check_sampling  # noqa: F401
from tritonkv.sampling.params import MAX_STOP as MAX_STOP_STRINGS, PARAMETERS, check_samples
from tritonkv.server import vllm_contract as vllm
from tritonkv.server.request_values import (BadRequest, checked, convert, decode, same_value,  # noqa: F401
                                            tensor_setting)
from tritonkv.server.triton_response import (PLAIN, ReplyChannel, ReplyForm, error_response,  # noqa: F401
                                             make_response)

FLAG_SEQUENCE_START = 1  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
FLAG_SEQUENCE_END = 2

# settings that may come as an input tensor or as a request parameter: name -> kind (the
# sampling parameters' scalars, from their one definition, and ``stream``)
SETTINGS = {**{p.name: p.kind for p in PARAMETERS if p.kind in ("int", "float", "bool")}, "stream": "bool"}
LIST_INPUTS = tuple(p.name for p in PARAMETERS if p.kind == "token_ids" and p.triton_dtype)
KNOWN_PARAMETERS = tuple(sorted({*SETTINGS, *(p.name for p in PARAMETERS), "cache_salt", *vllm.VLLM_KEYS}))
INPUT_ONLY = ("text_input", "input_ids", "START", "END", "CORRID", *vllm.INPUT_ONLY)


@dataclass
class ParsedRequest:
    corr_id: object
    start: bool
    end: bool
    text: str | None
    input_ids: list[int] | None
    params: SamplingParams
    stream: ReplyForm  # read as a bool where only streaming matters
    cache_salt: str | None

    @property
    def close_only(self) -> bool:
        """END alone closes an open conversation (a one-shot or START request needs a prompt)."""
        return self.end and not self.start and self.text is None and self.input_ids is None


@dataclass(frozen=True)
class Limits:
    """Size limits applied before any work (None: no limit)."""

    max_model_len: int | None = None
    max_text_bytes: int | None = None


def _input(pb_utils, request, name):
    try:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()
    except Exception as exc:  # noqa: BLE001 - whatever the stub raises is this input's fault
        raise BadRequest(f"input {name!r} could not be read: {exc}") from None


def _parameters(request) -> dict:
    try:
        raw = request.parameters()
    except Exception as exc:  # noqa: BLE001 - e.g. a parameter string that is not UTF-8
        raise BadRequest(f"the request parameters could not be read ({type(exc).__name__}: {exc})") from None
    if not raw:
        return {}
    return vllm.json_object(raw, "the request parameters", BadRequest)


def _check_parameter_names(params: dict, where: str = "request parameter", known=KNOWN_PARAMETERS) -> None:
    for name in params:
        if name in INPUT_ONLY:
            raise BadRequest(f"{name!r} must be sent as an input tensor, not as a {where}")
    unknown = sorted(str(name) for name in params if name not in known)
    if unknown:
        raise BadRequest(f"unknown {where}{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(n) for n in unknown)}; known: {', '.join(known)}")


def _sampling_parameters(pb_utils, request) -> dict:
    """The JSON object of vLLM's ``sampling_parameters`` input ({} when absent)."""
    arr = _input(pb_utils, request, "sampling_parameters")
    if arr is None:
        return {}
    if arr.size != 1 or arr.dtype.kind not in "OSU":
        raise BadRequest(f"input 'sampling_parameters' must hold one JSON string, got {arr.size} values "
                         f"of data type {arr.dtype}")
    params = vllm.sampling_parameters_object(decode(arr.reshape(-1)[0], "input 'sampling_parameters'"),
                                             BadRequest)
    _check_parameter_names(params, "sampling_parameters key",
                           tuple(k for k in KNOWN_PARAMETERS if k not in vllm.NOT_SAMPLING))
    return params


def parse_request(pb_utils, request, *, stateless: bool, default_max_tokens: int,
                  limits: Limits = Limits()) -> ParsedRequest:
    params = _parameters(request)
    _check_parameter_names(params)
    params = vllm.merge_parameters(params, _sampling_parameters(pb_utils, request), same_value, BadRequest)

    def setting(name, default):
        arr = _input(pb_utils, request, name)
        if arr is not None and name in params:
            raise BadRequest(f"{name!r} was sent both as an input and as a request parameter; send it once")
        if arr is not None:
            if name in LIST_INPUTS:
                return checked(name, list_tensor(arr, name), f"input {name!r}")
            if name not in SETTINGS:
                raise BadRequest(f"{name!r} must be sent as a request parameter (JSON text), not as an input")
            return checked(name, tensor_setting(arr, name, SETTINGS[name]), f"input {name!r}")
        if name in params:
            value = params[name]
            if value is None:  # JSON null (vLLM's None): the default
                return default
            if name == "top_k" and convert(value, "int", "parameter 'top_k'") == -1:
                return 0  # vLLM's "off"
            return checked(name, value, f"parameter {name!r}")
        return default

    text, input_ids = _prompt(pb_utils, request, limits)
    for name in vllm.NEUTRAL_VALUES:
        if name in params:
            vllm.check_neutral(name, params[name], BadRequest)
    values = {p.name: setting(p.name, p.default) for p in PARAMETERS if p.name != "stop"}
    values["stop"] = _stop(pb_utils, request, params)
    vllm_form = _is_vllm_form(pb_utils, request)
    if values["max_tokens"] is None:
        values["max_tokens"] = vllm.DEFAULT_MAX_TOKENS if vllm_form else default_max_tokens
    reply = _reply_form(pb_utils, request, setting("stream", not stateless), text, input_ids, vllm_form)
    if (reply.logprobs or reply.cumulative_logprob) and values["logprobs"] is None:
        values["logprobs"] = 0  # the chosen tokens' logprobs are needed
    sampling = SamplingParams(**values)
    reply = replace(reply, choices=sampling.n)
    try:
        check_sampling(sampling)
        check_samples(sampling, reply.stream, stateless)
    except RequestError as exc:
        raise BadRequest(str(exc)) from None
    salt = params.get("cache_salt")
    if salt is not None:
        if isinstance(salt, bool) or not isinstance(salt, (str, int)):
            raise BadRequest(f"parameter 'cache_salt' must be a string, got {type(salt).__name__}")
        salt = decode(str(salt), "parameter 'cache_salt'")
    if stateless:
        start, end, corr_id = True, True, None
    else:
        flags = request.flags()
        start = _control(pb_utils, request, "START")
        end = _control(pb_utils, request, "END")
        start = bool(flags & FLAG_SEQUENCE_START) if start is None else start
        end = bool(flags & FLAG_SEQUENCE_END) if end is None else end
        corr_id = request.correlation_id()
        if corr_id in (0, ""):
            raise BadRequest("model 'llm' needs a sequence id (correlation id); use llm_stateless "
                             "for one-shot requests")
    parsed = ParsedRequest(corr_id, start, end, text, input_ids, sampling, reply, salt)
    if text is None and input_ids is None and not parsed.close_only:
        raise BadRequest("no prompt: send text_input or input_ids" + ("" if stateless else " (or END alone to close)"))
    return parsed


def _flag(pb_utils, request, name: str) -> bool | None:
    arr = _input(pb_utils, request, name)
    return None if arr is None else tensor_setting(arr, name, "bool")


def _reply_form(pb_utils, request, stream: bool, text: str | None, input_ids, vllm_form: bool) -> ReplyForm:
    """The vLLM backend's output flags (see ``vllm_contract``)."""
    echo = ""
    exclude = _flag(pb_utils, request, "exclude_input_in_output")
    if exclude is False:
        if stream:
            raise BadRequest("exclude_input_in_output = false is not allowed with stream = true (as in "
                             "Triton's vLLM backend): streamed responses never repeat the prompt")
        if text is None:
            raise BadRequest("exclude_input_in_output = false needs the prompt as text_input (it is echoed "
                             "as text); input_ids cannot be echoed")
    if (exclude is False or (exclude is None and vllm_form and not stream)) and text is not None:
        echo = text
    return ReplyForm(stream, echo, bool(_flag(pb_utils, request, "return_finish_reason")),
                     bool(_flag(pb_utils, request, "return_num_input_tokens")),
                     bool(_flag(pb_utils, request, "return_num_output_tokens")),
                     bool(_flag(pb_utils, request, "return_logprobs")),
                     bool(_flag(pb_utils, request, "return_cumulative_logprob")),
                     outputs=_requested_outputs(request))


def _requested_outputs(request) -> frozenset[str] | None:
    """The output names the request asked for; None where it names none (Triton then fills in
    every output)."""
    names = request.requested_output_names()
    return frozenset(names) if names else None


def _is_vllm_form(pb_utils, request) -> bool:
    """The request uses the vLLM backend's contract: its defaults apply (vllm_contract)."""
    return any(_input(pb_utils, request, name) is not None for name in vllm.INPUT_ONLY)


def _prompt(pb_utils, request, limits: Limits) -> tuple[str | None, list[int] | None]:
    text_arr = _input(pb_utils, request, "text_input")
    ids_arr = _input(pb_utils, request, "input_ids")
    if text_arr is not None and ids_arr is not None:
        raise BadRequest("send either text_input or input_ids, not both")
    text = None
    if text_arr is not None:
        if text_arr.size != 1:
            raise BadRequest(f"input 'text_input' must hold one string, got {text_arr.size} "
                             f"(shape {list(text_arr.shape)})")
        if text_arr.dtype.kind not in "OSU":
            raise BadRequest(f"input 'text_input' has data type {text_arr.dtype}; expected a string (BYTES)")
        raw = text_arr.reshape(-1)[0]
        if isinstance(raw, (bytes, np.bytes_, str)):
            size = len(raw) if not isinstance(raw, str) else len(raw.encode("utf-8", "surrogatepass"))
            if limits.max_text_bytes is not None and size > limits.max_text_bytes:
                raise BadRequest(f"input 'text_input' is {size} bytes: more than this model's "
                                 f"{limits.max_model_len} tokens (max_model_len) can hold with this "
                                 f"tokenizer (at most {limits.max_text_bytes} bytes)")
        text = decode(raw, "input 'text_input'")
    input_ids = None
    if ids_arr is not None:
        if ids_arr.dtype.kind not in "iu":
            raise BadRequest(f"input 'input_ids' has data type {ids_arr.dtype}; expected integers (INT32)")
        if limits.max_model_len is not None and ids_arr.size > limits.max_model_len:
            raise BadRequest(f"input 'input_ids' holds {ids_arr.size} tokens; this model serves at most "
                             f"{limits.max_model_len} (max_model_len)")
        input_ids = [int(t) for t in ids_arr.reshape(-1).tolist()]
    return text, input_ids


def _stop(pb_utils, request, params: dict) -> tuple[str, ...]:
    stop_arr = _input(pb_utils, request, "stop")
    if stop_arr is not None and "stop" in params:
        raise BadRequest("'stop' was sent both as an input and as a request parameter; send it once")
    if stop_arr is not None:
        if stop_arr.dtype.kind not in "OSU":
            raise BadRequest(f"input 'stop' has data type {stop_arr.dtype}; expected strings (BYTES)")
        values = list(stop_arr.reshape(-1))
        where = "input 'stop'"
    elif "stop" in params:
        values = params["stop"]
        where = "parameter 'stop'"
        if isinstance(values, str):
            values = [values]
        elif not isinstance(values, list):
            raise BadRequest(f"parameter 'stop' must be a string or a list of strings, got {type(values).__name__}")
    else:
        return ()
    if len(values) > MAX_STOP_STRINGS:
        raise BadRequest(f"{where} holds {len(values)} strings; at most {MAX_STOP_STRINGS}")
    stop = tuple(decode(s, f"{where}[{i}]") for i, s in enumerate(values))
    return tuple(s for s in stop if s)


def _control(pb_utils, request, name):
    """START / END from the sequence batcher's control tensors (absent: None)."""
    arr = _input(pb_utils, request, name)
    if arr is None or arr.size == 0:
        return None
    try:
        return bool(arr.reshape(-1)[0])
    except (TypeError, ValueError):
        raise BadRequest(f"control input {name!r} is not a boolean") from None


def list_tensor(arr: np.ndarray, name: str) -> list[int]:
    if arr.dtype.kind not in "iu":
        raise BadRequest(f"input {name!r} has data type {arr.dtype}; expected integers (INT32)")
    return [int(v) for v in arr.reshape(-1).tolist()]
