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

    def __bool__(self) -> bool:
        return self.stream


PLAIN = ReplyForm(stream=True)  # no output asked beyond our own


def make_response(pb_utils, out: TurnOutput, form: ReplyForm = PLAIN, echo: str = "",
                  cumulative_logprob: float = 0.0):
    """One response; ``echo`` is prepended to its text. The vLLM outputs are added where
    ``form`` asks for them; ``num_input_tokens`` where the engine reported the prompt's size;
    ``logprobs`` wherever the engine computed them (``logprobs`` asked by parameter, or
    ``return_logprobs``)."""
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
    if form.logprobs or out.logprobs is not None:
        text = "null" if out.logprobs is None else json.dumps([e.as_vllm() for e in out.logprobs])
        tensors.append(strings("logprobs", text))
    if out.prompt_logprobs is not None:  # vLLM's PromptLogprobs: null where a token has none
        tensors.append(strings("prompt_logprobs", json.dumps(
            [None if e is None else e.as_vllm() for e in out.prompt_logprobs])))
    if form.cumulative_logprob:
        tensors.append(pb_utils.Tensor("cumulative_logprob", np.array([cumulative_logprob], dtype=np.float32)))
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
