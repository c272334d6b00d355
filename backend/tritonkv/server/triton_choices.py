"""The Triton responses of a request with n > 1 choices (engine/sample_group.py), in the shape
of Triton's vLLM backend (src/utils/request.py: one element per choice in each output).

Rules:
- every response holds n elements, in choice order, in ``text_output`` (the choice's new text;
  "" for a choice with nothing new) and ``num_output_tokens`` (the choice's new token count;
  always sent, so that ``output_ids``, every choice's new ids concatenated in choice order,
  can be split); with logprobs, ``logprobs`` holds one JSON list per choice and
  ``cumulative_logprob`` one sum per choice; ``finish_reason`` (each choice's) comes on the
  final response, or on every response in vLLM's words with ``return_finish_reason`` ("None"
  for a choice still running);
- streamed, each engine output (one choice's delta) is one response; otherwise one response
  holds every choice whole, the prompt echoed before each text when asked;
- the final response (every choice ended) adds ``cached_tokens`` and ``prompt_tokens``; an
  error is the request's final answer.
"""

from __future__ import annotations

from tritonkv.engine.requests import TurnOutput
from tritonkv.server.triton_response import (ReplyChannel, ReplyForm, choices_response, error_response,
                                             make_response)


def reply_channel(pb_utils, sender, form: ReplyForm | bool):
    """The engine's ``emit`` for one request (``ReplyChannel`` for one choice)."""
    if isinstance(form, ReplyForm) and form.choices > 1:
        return ChoicesChannel(pb_utils, sender, form)
    return ReplyChannel(pb_utils, sender, form)


class ChoicesChannel:
    def __init__(self, pb_utils, sender, form: ReplyForm):
        self.pb_utils = pb_utils
        self.sender = sender
        self.form = form
        self.stream = form.stream
        n = form.choices
        self.reasons: list[str | None] = [None] * n
        self.cumulative = [0.0] * n
        self.held: list[list[TurnOutput]] = [[] for _ in range(n)]  # not streamed: each choice's outputs

    def error(self, message: str, code: str | None = None) -> None:
        self.sender.send(error_response(self.pb_utils, message, code or "INVALID_ARG"),
                         flags=self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def __call__(self, out: TurnOutput) -> None:
        final = self.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if out.error is not None:
            self.sender.send(make_response(self.pb_utils, out), flags=final)
            return
        i = out.index
        if out.finish_reason is not None:
            self.reasons[i] = out.finish_reason
        self.cumulative[i] += sum(e.logprob for e in out.logprobs or ())
        if self.stream:
            parts = [[out] if j == i else [] for j in range(self.form.choices)]
            self.sender.send(self._response(parts, out, ""), flags=final if out.finished else 0)
            return
        self.held[i].append(out)
        if out.finished:
            self.sender.send(self._response(self.held, out, self.form.echo), flags=final)

    def _response(self, outs: list[list[TurnOutput]], last: TurnOutput, echo: str):
        return choices_response(self.pb_utils, self.form, outs, self.reasons, self.cumulative, last, echo)
