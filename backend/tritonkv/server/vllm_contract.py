"""The request contract of Triton's vLLM backend (triton-inference-server/vllm_backend,
src/utils/request.py), as ``llm_stateless`` accepts it beside its own.

Inputs (all optional, declared in model_repository/llm_stateless/config.pbtxt):
- ``sampling_parameters``: one BYTES element, a JSON object of vLLM ``SamplingParams`` keys,
  values as numbers, booleans or numeric strings. Its keys are request parameter names:
  the same keys may come as request parameters, and a key sent both ways must hold the same
  value (vLLM's sample client sends both).
- ``exclude_input_in_output`` (BOOL): false echoes the prompt text before the generated text
  of a one-reply request; false with ``stream`` true is refused, as vLLM does. Left out, a
  request in this form (``sampling_parameters`` or any of these flags sent) is echoed when it
  does not stream, as vLLM does; ``max_tokens`` then defaults to 16 (vLLM's default).
- ``return_finish_reason`` / ``return_num_input_tokens`` / ``return_num_output_tokens``:
  outputs ``finish_reason`` (on every response, vLLM's words: "None" until the last, then
  "stop" / "length" / "abort"), ``num_input_tokens`` (UINT32, the prompt's token count) and
  ``num_output_tokens`` (UINT32, the tokens in this response).
- ``return_logprobs``: output ``logprobs`` (BYTES, one JSON string per response: a list, one
  entry per token of the response, of {token id: {logprob, rank, decoded_token}}: the chosen
  token and the ``logprobs`` most likely ones, vLLM's ``SampleLogprobs``); without a
  ``logprobs`` key only the chosen token's. ``return_cumulative_logprob``: output
  ``cumulative_logprob`` (FP32, the sum of the chosen tokens' logprobs so far).
- ``prompt_logprobs`` (a sampling_parameters key, k in [0, 20]): output ``prompt_logprobs``
  (BYTES, one JSON string on the turn's first response with tokens: a list, one entry per
  prompt token, null for a conversation's first token, else {token id: {logprob, rank,
  decoded_token}} of the prompt token and the k most likely there, vLLM's ``PromptLogprobs``).

The sampling keys and their ranges are ``tritonkv.sampling.params``' (``PARAMETERS``, the
keys marked ``vllm``; ``n`` / ``best_of`` > 1 answer in the vLLM backend's shape, one element
per choice: server/triton_choices.py). vLLM keys tritonkv has no sampler for
(``include_stop_str_in_output``) are accepted at the value that changes nothing and refused,
by name, at any other; ``top_k`` -1 means off (vLLM's spelling of 0). JSON is nested at most ``MAX_JSON_DEPTH`` levels.
"""

from __future__ import annotations

import json
import math

from tritonkv.sampling.params import NEUTRAL_VALUES, PARAMETERS

# vLLM SamplingParams keys beside ours (PARAMETERS marked vllm)
VLLM_KEYS = (*NEUTRAL_VALUES, *(p.name for p in PARAMETERS if p.vllm))
MAX_JSON_DEPTH = 16  # nesting levels of a JSON value in a request
# keys of our own that vLLM's SamplingParams does not have
NOT_SAMPLING = ("stream", "cache_salt")
FLAG_INPUTS = ("exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
               "return_num_output_tokens", "return_logprobs", "return_cumulative_logprob")
DEFAULT_MAX_TOKENS = 16  # vLLM SamplingParams' default, for requests in this form
INPUT_ONLY = ("sampling_parameters", *FLAG_INPUTS)
# finish reasons in vLLM's words (RequestOutput.finish_reason)
VLLM_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}
NOT_FINISHED = "None"  # vLLM's str(None) on every response before the last


def vllm_finish_reason(reason: str | None) -> str:
    return NOT_FINISHED if reason is None else VLLM_FINISH_REASONS.get(reason, reason)


def json_value(text: str, what: str, error):
    """``text`` as JSON nested at most ``MAX_JSON_DEPTH`` levels; anything else raises
    ``error`` (the exception class for a client mistake) naming ``what`` was sent."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise error(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise error(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def json_depth(value) -> int:
    """Nesting levels of a parsed JSON value (a scalar: 0), counted without recursion."""
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, d)
            if depth > MAX_JSON_DEPTH:
                return depth
            level.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def json_object(text: str, what: str, error) -> dict:
    """``text`` as a JSON object (``json_value``)."""
    value = json_value(text, what, error)
    if not isinstance(value, dict):
        raise error(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def sampling_parameters_object(text: str, error) -> dict:
    """The JSON object held by a ``sampling_parameters`` tensor (``error``: the exception
    class raised for a client mistake)."""
    params = json_object(text, "input 'sampling_parameters'", error)
    for name in params:
        if name in NOT_SAMPLING:
            raise error(f"input 'sampling_parameters' holds {name!r}, which is not a vLLM sampling "
                        f"parameter: send it as an input or a request parameter")
    return params


def merge_parameters(params: dict, sampling: dict, same, error) -> dict:
    """Request parameters and ``sampling_parameters`` as one table; a key in both must hold
    the same value (``same(a, b)`` compares two raw values)."""
    merged = dict(params)
    for name, value in sampling.items():
        if name in merged and not same(merged[name], value):
            raise error(f"{name!r} is {value!r} in sampling_parameters but {merged[name]!r} in the "
                        "request parameters; send it once")
        merged[name] = value
    return merged


def check_neutral(name: str, value, error) -> None:
    """A vLLM key tritonkv has no sampler for: only its neutral value is accepted."""
    neutral = NEUTRAL_VALUES[name]
    if _equal(value, neutral) or (name == "best_of" and value is None):
        return
    raise error(f"parameter {name!r} = {value!r:.60} is not supported by tritonkv; send {json.dumps(neutral)} "
                "or leave it out")


def _equal(value, neutral) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if isinstance(neutral, bool):
            return text == str(neutral).lower()
        if isinstance(neutral, (int, float)):
            try:
                value = float(text)
            except ValueError:
                return False
    if isinstance(neutral, bool) or neutral is None or isinstance(neutral, list):
        return value == neutral and type(value) is type(neutral)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value == neutral
