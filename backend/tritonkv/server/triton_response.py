"""Engine outputs as Triton responses (the half of the Python backend's contract that
``triton_request`` does not read).

Rules:
- per-response facts travel as output tensors (this Python backend cannot set response
  parameters): every response has ``text_output`` + ``output_ids``; the final one adds
  ``finish_reason``, ``cached_tokens`` and ``prompt_tokens``;
- what a request asks of its replies (vLLM's ``return_*`` flags, prompt echo, streaming) is its
  ``ReplyForm``; the vLLM outputs are added only where it asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import json

import numpy as np

from tritonkv.engine.requests import TurnOutput
from tritonkv.server import vllm_contract as vllm


@dataclass(frozen=True)
class ReplyForm:
    """What a request asks of its replies. Truthy when streamed (one response per delta); else
    one response holds the whole turn."""

    stream: bool
    echo: str = ""  # prepended to the text of the whole-turn reply (exclude_input_in_output false)
    vllm_finish_reason: bool = False  # finish_reason on every response, in vLLM's words
    num_input_tokens: bool = False
    num_output_tokens: bool = False
    logprobs: bool = False  # return_logprobs: the ``logprobs`` output on every response
    cumulative_logprob: bool = False
    choices: int = 1  # n: more than one is answered by server/triton_choices.py
    # the outputs the request asked for (None: all). Rule: a response holds no other output.
    # Triton 2.51's stub drops the others itself with the GIL released, so their numpy arrays
    # are freed without it: a segfault of the stub under Python 3.12 (python_backend#390)
    outputs: frozenset[str] | None = None

    def __bool__(self) -> bool:
        return self.stream


PLAIN = ReplyForm(stream=True)  # no output asked beyond our own


def make_response(pb_utils, out: TurnOutput, form: ReplyForm = PLAIN, echo: str = "",
                  cumulative_logprob: float = 0.0):
    """One response of a one-choice request; ``echo`` is prepended to its text."""
    if out.error is not None:
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(out.error))
    return choices_response(pb_utils, form, [[out]], [out.finish_reason if out.finished else None],
                            [cumulative_logprob], out, echo)


def choices_response(pb_utils, form: ReplyForm, outs: list[list[TurnOutput]], reasons: list[str | None],
                     cumulative: list[float], last: TurnOutput, echo: str = ""):
    """One response holding, for each of the request's choices, the outputs ``outs[i]`` (none:
    nothing new), in one element per choice of each output (triton_choices.py's rules); ``last``
    is the output that triggered it (its ``finished`` makes the response the final one),
    ``reasons`` each choice's finish reason so far. The vLLM outputs are added where ``form``
    asks for them; ``num_input_tokens`` where the engine reported the prompt's size;
    ``logprobs`` wherever the engine computed them (``logprobs`` asked by parameter, or
    ``return_logprobs``): one JSON list per choice, or ``null`` for a single choice without
    them."""
    n = len(outs)
    tensors = []

    def add(name, arr):
        if form.outputs is None or name in form.outputs:
            tensors.append(pb_utils.Tensor(name, arr))

    def strings(name, values):
        add(name, np.array([v.encode("utf-8") for v in values], dtype=np.object_))

    ids = [[t for o in choice for t in o.token_ids] for choice in outs]
    strings("text_output", [echo + "".join(o.text for o in choice) for choice in outs])
    add("output_ids", np.array([t for choice in ids for t in choice], dtype=np.int32))
    if n > 1 or form.num_output_tokens:  # n > 1: always, output_ids is split by it
        add("num_output_tokens", np.array([len(c) for c in ids], dtype=np.uint32))
    if form.vllm_finish_reason:
        strings("finish_reason", [vllm.vllm_finish_reason(r) for r in reasons])
    elif last.finished:
        strings("finish_reason", [r or "" for r in reasons])
    if last.finished:
        add("cached_tokens", np.array([last.cached_tokens], dtype=np.int32))
        add("prompt_tokens", np.array([last.prompt_tokens], dtype=np.int32))
    if form.num_input_tokens and last.prompt_tokens:
        add("num_input_tokens", np.array([last.prompt_tokens], dtype=np.uint32))
    computed = [[e for o in choice for e in o.logprobs or ()] if any(o.logprobs is not None for o in choice)
                else None for choice in outs]
    if form.logprobs or any(c is not None for c in computed):
        strings("logprobs", ["null" if c is None and n == 1 else json.dumps([e.as_vllm() for e in c or ()])
                             for c in computed])
    firsts = [o.prompt_logprobs for choice in outs for o in choice if o.prompt_logprobs is not None]
    if firsts:  # vLLM's PromptLogprobs: null where a token has none
        strings("prompt_logprobs", [json.dumps([None if e is None else e.as_vllm() for e in firsts[0]])])
    if form.cumulative_logprob:
        add("cumulative_logprob", np.array(cumulative, dtype=np.float32))
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
        self.logprobs: list | None = None
        self.prompt_logprobs: tuple | None = None
        self.cumulative_logprob = 0.0

    def error(self, message: str, code: str | None = None) -> None:
        """The request's final answer: an error (``code``: a Triton error code name)."""
        if code is None:
            self(TurnOutput("", [], True, "error", error=message))
        else:
            self.sender.send(error_response(self.pb_utils, message, code),
                             flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def __call__(self, out: TurnOutput) -> None:
        final_flag = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if out.logprobs:
            self.cumulative_logprob += sum(e.logprob for e in out.logprobs)
        if not self.stream and out.error is None:
            self.text.append(out.text)
            self.ids.extend(out.token_ids)
            if out.logprobs is not None:
                self.logprobs = self.logprobs or []
                self.logprobs.extend(out.logprobs)
            if out.prompt_logprobs is not None:
                self.prompt_logprobs = out.prompt_logprobs
            if not out.finished:
                return
            out = TurnOutput("".join(self.text), self.ids, True, out.finish_reason,
                             out.cached_tokens, out.prompt_tokens, logprobs=self.logprobs,
                             prompt_logprobs=self.prompt_logprobs)
        echo = "" if self.stream else self.form.echo
        self.sender.send(make_response(self.pb_utils, out, self.form, echo, self.cumulative_logprob),
                         flags=final_flag if out.finished else 0)
