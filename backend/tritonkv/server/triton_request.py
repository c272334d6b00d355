"""Turns a Triton request into engine arguments, and engine outputs into Triton responses.

Only ``pb_utils``-shaped objects are touched here (passed in, never imported), so this module
imports on any machine. Rules:
- exactly one of ``text_input`` / ``input_ids``; a turn with END and neither just closes, any
  other request without a prompt is refused;
- START/END come from the control inputs when the model declares them, else request flags;
- per-response facts travel as output tensors (this Python backend cannot set response
  parameters): every response has ``text_output`` + ``output_ids``; the final one adds
  ``finish_reason``, ``cached_tokens`` and ``prompt_tokens``;
- the input contract of Triton's vLLM backend is accepted too (``sampling_parameters``,
  ``exclude_input_in_output``, ``return_*`` flags; see ``vllm_contract``): what a request asks
  of its replies is its ``ReplyForm``.

Admission is total: everything taken from a request (tensors, request parameters, their types,
shapes, encodings and sizes) is checked and converted here, in the request's own context, and
any fault is a ``BadRequest`` naming the input or parameter. A setting (``max_tokens``,
``temperature``, ...) comes from its input tensor or, as HTTP ``/generate`` sends fields that
are not inputs and gRPC clients may do, from the request parameter of the same name (not
both); any other parameter is refused with the list of known ones. The keys of a
``sampling_parameters`` JSON object are request parameters too. Size limits are applied
before any work: ``input_ids`` longer than ``max_model_len`` before converting them, and a
``text_input`` longer than ``max_text_bytes`` (what ``max_model_len`` tokens can cover, see
``TextTokenizer.max_text_bytes``) before decoding or tokenising it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from tritonkv.engine.requests import RequestError, SamplingParams, TurnOutput, check_sampling
from tritonkv.server import vllm_contract as vllm

FLAG_SEQUENCE_START = 1  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
FLAG_SEQUENCE_END = 2

# settings that may come as an input tensor or as a request parameter: name -> kind
SETTINGS = {"max_tokens": "int", "temperature": "float", "top_k": "int", "top_p": "float",
            "seed": "int", "ignore_eos": "bool", "stream": "bool"}
KNOWN_PARAMETERS = tuple(sorted((*SETTINGS, "stop", "cache_salt", *vllm.VLLM_KEYS)))
INPUT_ONLY = ("text_input", "input_ids", "START", "END", "CORRID", *vllm.INPUT_ONLY)
MAX_STOP_STRINGS = 64
_INT_TEXT = re.compile(r"[+-]?\d{1,40}")


class BadRequest(ValueError):
    """A client mistake found while reading the request; answered with INVALID_ARG (HTTP 400)."""


@dataclass(frozen=True)
class ReplyForm:
    """What a request asks of its replies. Truthy when streamed (one response per delta); else
    one response holds the whole turn."""

    stream: bool
    echo: str = ""  # prepended to the text of the whole-turn reply (exclude_input_in_output false)
    vllm_finish_reason: bool = False  # finish_reason on every response, in vLLM's words
    num_input_tokens: bool = False
    num_output_tokens: bool = False

    def __bool__(self) -> bool:
        return self.stream


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
    params = vllm.sampling_parameters_object(_decode(arr.reshape(-1)[0], "input 'sampling_parameters'"),
                                             BadRequest)
    _check_parameter_names(params, "sampling_parameters key",
                           tuple(k for k in KNOWN_PARAMETERS if k not in vllm.NOT_SAMPLING))
    return params


def _same_value(a, b) -> bool:
    """One setting sent both as a request parameter and in sampling_parameters (e.g. 0.1 and
    "0.1") says the same thing."""
    return a == b or (not isinstance(a, (dict, list)) and str(a).strip().lower() == str(b).strip().lower())


def _decode(raw, what: str) -> str:
    if isinstance(raw, (bytes, np.bytes_)):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")  # a lone surrogate cannot be sent on
        except UnicodeEncodeError as exc:
            raise BadRequest(f"{what} is not valid UTF-8 (character {exc.start}: {exc.reason})") from None
        return str(raw)
    raise BadRequest(f"{what} must be a string, got {type(raw).__name__}")


def _convert(value, kind: str, what: str):
    """One setting's value (a Python or numpy scalar, or a string) as ``kind``, strictly."""
    if isinstance(value, (bytes, np.bytes_)):
        value = _decode(value, what)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        text = value.strip()
        if kind == "int":
            if not _INT_TEXT.fullmatch(text):
                raise BadRequest(f"{what} = {value[:60]!r} is not an integer")
            return int(text)
        if kind == "float":
            try:
                value = float(text)
            except ValueError:
                raise BadRequest(f"{what} = {value[:60]!r} is not a number") from None
        elif kind == "bool":
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise BadRequest(f"{what} = {value[:60]!r} is not a boolean (true / false)")
    if kind == "bool":
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise BadRequest(f"{what} = {value!r} is not a boolean (true / false)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{what} = {value!r} is not a{'n integer' if kind == 'int' else ' number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{what} = {value!r} is not a finite number")
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise BadRequest(f"{what} = {value!r} is not an integer")
            value = int(value)
        return value
    try:
        value = float(value)
    except OverflowError:
        raise BadRequest(f"{what} = {value!r} is out of range") from None
    if not math.isfinite(value):
        raise BadRequest(f"{what} = {value!r} is not a finite number")
    return value


def _tensor_setting(arr: np.ndarray, name: str, kind: str):
    what = f"input {name!r}"
    if arr.size != 1:
        raise BadRequest(f"{what} must hold one value, got {arr.size} (shape {list(arr.shape)})")
    expected = {"int": "iu", "float": "fiu", "bool": "biu"}[kind]
    if arr.dtype.kind not in expected + "OSU":
        raise BadRequest(f"{what} has data type {arr.dtype}; expected {'a boolean' if kind == 'bool' else kind}")
    return _convert(arr.reshape(-1)[0], kind, what)


def parse_request(pb_utils, request, *, stateless: bool, default_max_tokens: int,
                  limits: Limits = Limits()) -> ParsedRequest:
    params = _parameters(request)
    _check_parameter_names(params)
    params = vllm.merge_parameters(params, _sampling_parameters(pb_utils, request), _same_value, BadRequest)

    def setting(name, default):
        kind = SETTINGS[name]
        arr = _input(pb_utils, request, name)
        if arr is not None and name in params:
            raise BadRequest(f"{name!r} was sent both as an input and as a request parameter; send it once")
        if arr is not None:
            return _tensor_setting(arr, name, kind)
        if name in params:
            value = _convert(params[name], kind, f"parameter {name!r}")
            return 0 if name == "top_k" and value == -1 else value  # vLLM's "off"
        return default

    text, input_ids = _prompt(pb_utils, request, limits)
    stop = _stop(pb_utils, request, params)
    max_tokens = setting("max_tokens", default_max_tokens)
    ignore_eos = setting("ignore_eos", False)
    if _runs_to_max_tokens(params, max_tokens):
        ignore_eos, stop = True, ()
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=setting("temperature", 1.0),
        top_k=setting("top_k", 0),
        top_p=setting("top_p", 1.0),
        seed=setting("seed", None),
        stop=stop,
        ignore_eos=ignore_eos,
    )
    try:
        check_sampling(sampling)
    except RequestError as exc:
        raise BadRequest(str(exc)) from None
    reply = _reply_form(pb_utils, request, setting("stream", not stateless), text, input_ids)
    salt = params.get("cache_salt")
    if salt is not None:
        if isinstance(salt, bool) or not isinstance(salt, (str, int)):
            raise BadRequest(f"parameter 'cache_salt' must be a string, got {type(salt).__name__}")
        salt = _decode(str(salt), "parameter 'cache_salt'")
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


def _runs_to_max_tokens(params: dict, max_tokens: int) -> bool:
    """Checks the vLLM keys without a sampler of their own; True when ``min_tokens`` asks for
    every reply to run to ``max_tokens``."""
    for name in vllm.NEUTRAL_VALUES:
        if name in params:
            vllm.check_neutral(name, params[name], BadRequest)
    if "min_tokens" not in params:
        return False
    min_tokens = _convert(params["min_tokens"], "int", "parameter 'min_tokens'")
    return vllm.min_tokens_rule(min_tokens, max_tokens, BadRequest)


def _flag(pb_utils, request, name: str) -> bool | None:
    arr = _input(pb_utils, request, name)
    return None if arr is None else _tensor_setting(arr, name, "bool")


def _reply_form(pb_utils, request, stream: bool, text: str | None, input_ids) -> ReplyForm:
    """The vLLM backend's output flags (see ``vllm_contract``)."""
    for name, what in vllm.UNSUPPORTED_FLAGS.items():
        if _flag(pb_utils, request, name):
            raise BadRequest(f"input {name!r} = true is not supported: tritonkv does not compute {what}")
    echo = ""
    if _flag(pb_utils, request, "exclude_input_in_output") is False:
        if stream:
            raise BadRequest("exclude_input_in_output = false is not allowed with stream = true (as in "
                             "Triton's vLLM backend): streamed responses never repeat the prompt")
        if text is None:
            raise BadRequest("exclude_input_in_output = false needs the prompt as text_input (it is echoed "
                             "as text); input_ids cannot be echoed")
        echo = text
    return ReplyForm(stream, echo, bool(_flag(pb_utils, request, "return_finish_reason")),
                     bool(_flag(pb_utils, request, "return_num_input_tokens")),
                     bool(_flag(pb_utils, request, "return_num_output_tokens")))


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
        text = _decode(raw, "input 'text_input'")
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
    stop = tuple(_decode(s, f"{where}[{i}]") for i, s in enumerate(values))
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


PLAIN = ReplyForm(stream=True)  # no output asked beyond our own


def make_response(pb_utils, out: TurnOutput, form: ReplyForm = PLAIN, echo: str = ""):
    """One response; ``echo`` is prepended to its text. The vLLM outputs are added where
    ``form`` asks for them; ``num_input_tokens`` where the engine reported the prompt's size."""
    if out.error is not None:
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(out.error))

    def strings(name, text):
        return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))

    tensors = [strings("text_output", echo + out.text),
               pb_utils.Tensor("output_ids", np.array(out.token_ids, dtype=np.int32))]
    if form.vllm_finish_reason:
        tensors.append(strings("finish_reason", vllm.vllm_finish_reason(out.finish_reason if out.finished else None)))
    elif out.finished:
        tensors.append(strings("finish_reason", out.finish_reason or ""))
    if out.finished:
        tensors += [
            pb_utils.Tensor("cached_tokens", np.array([out.cached_tokens], dtype=np.int32)),
            pb_utils.Tensor("prompt_tokens", np.array([out.prompt_tokens], dtype=np.int32)),
        ]
    if form.num_input_tokens and out.prompt_tokens:
        tensors.append(pb_utils.Tensor("num_input_tokens", np.array([out.prompt_tokens], dtype=np.uint32)))
    if form.num_output_tokens:
        tensors.append(pb_utils.Tensor("num_output_tokens", np.array([len(out.token_ids)], dtype=np.uint32)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error_response(pb_utils, message: str, code: str = "INVALID_ARG"):
    """An error response with a Triton error code (INVALID_ARG: HTTP 400; UNAVAILABLE: 503;
    INTERNAL: 500), where this stub's ``TritonError`` takes one."""
    error_cls = pb_utils.TritonError
    code_value = getattr(error_cls, code, None)
    try:
        error = error_cls(message) if code_value is None else error_cls(message, code_value)
    except TypeError:  # an older stub: message only
        error = error_cls(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class ReplyChannel:
    """The engine's ``emit`` for one request: streams each delta, or (not streaming) merges
    them into the single final response that HTTP ``/generate`` requires. ``form``: a
    ``ReplyForm``, or a bool (stream or not, nothing else asked)."""

    def __init__(self, pb_utils, sender, form: ReplyForm | bool):
        self.pb_utils = pb_utils
        self.sender = sender
        self.form = form if isinstance(form, ReplyForm) else ReplyForm(bool(form))
        self.stream = self.form.stream
        self.text: list[str] = []
        self.ids: list[int] = []

    def error(self, message: str, code: str | None = None) -> None:
        """The request's final answer: an error (``code``: a Triton error code name)."""
        if code is None:
            self(TurnOutput("", [], True, "error", error=message))
        else:
            self.sender.send(error_response(self.pb_utils, message, code),
                             flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def __call__(self, out: TurnOutput) -> None:
        final_flag = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not self.stream and out.error is None:
            self.text.append(out.text)
            self.ids.extend(out.token_ids)
            if not out.finished:
                return
            out = TurnOutput("".join(self.text), self.ids, True, out.finish_reason,
                             out.cached_tokens, out.prompt_tokens)
        echo = "" if self.stream else self.form.echo
        self.sender.send(make_response(self.pb_utils, out, self.form, echo), flags=final_flag if out.finished else 0)
