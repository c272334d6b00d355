"""Generation settings and their encoding as requests: gRPC input tensors, HTTP generate JSON
bodies, and the request parameters (shared by the sync and asyncio clients).

Rules:
- a setting left at ``None`` is not sent, so the server's default applies (``temperature``
  1.0, ``max_tokens`` the model's ``default_max_tokens``, ...);
- the settings are the server's sampling parameters (tritonkv.sampling.params, where each
  one's range and meaning are defined; a test keeps the names and datatypes equal): scalars
  and ``stop`` / ``stop_token_ids`` travel as input tensors, ``logit_bias`` (no tensor) as
  JSON text, ``bad_words`` as JSON text and ``logprobs`` / ``prompt_logprobs`` / ``n`` /
  ``best_of`` as an integer in a request parameter (gRPC) or body field (HTTP generate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace

import numpy as np

DEFAULT_TIMEOUT_S = 300.0  # how long a client waits for a response

# input name -> (numpy type, Triton datatype)
_SCALARS = {
    "max_tokens": (np.int32, "INT32"),
    "temperature": (np.float32, "FP32"),
    "top_k": (np.int32, "INT32"),
    "top_p": (np.float32, "FP32"),
    "seed": (np.int64, "INT64"),
    "ignore_eos": (np.bool_, "BOOL"),
    "min_p": (np.float32, "FP32"),
    "repetition_penalty": (np.float32, "FP32"),
    "presence_penalty": (np.float32, "FP32"),
    "frequency_penalty": (np.float32, "FP32"),
    "min_tokens": (np.int32, "INT32"),
}


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    ignore_eos: bool | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    bad_words: tuple[str, ...] | None = None  # words never generated (vLLM's bad_words)
    logprobs: int | None = None  # each token's logprob and this many top ones (``logprobs`` output)
    prompt_logprobs: int | None = None  # each prompt token's logprob and this many top ones (the
    # ``prompt_logprobs`` output, on the first response with tokens; the first token's is None)
    guided_json: dict | str | None = None  # structured output: a JSON schema the output satisfies
    guided_regex: str | None = None  # ... a regular expression the output matches
    guided_choice: tuple[str, ...] | None = None  # ... one of these strings exactly
    n: int | None = None  # choices returned (llm_stateless; ``GenerationResult.choices``)
    best_of: int | None = None  # samples generated, the n best by cumulative logprob returned (not streamed)

    def merged(self, **overrides) -> "GenerationParams":
        """These settings with the non-None ``overrides`` applied (unknown names are a TypeError)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown generation setting(s) {sorted(unknown)}; known: {sorted(names)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        for name in ("stop", "bad_words"):  # one string or a list of them
            if isinstance(given.get(name), str):
                given[name] = (given[name],)
            elif name in given:
                given[name] = tuple(given[name])
        if "stop_token_ids" in given:
            given["stop_token_ids"] = tuple(int(t) for t in given["stop_token_ids"])
        if "logit_bias" in given:
            given["logit_bias"] = {int(t): float(b) for t, b in dict(given["logit_bias"]).items()}
        return replace(self, **given)

    def as_json(self) -> dict:
        """The HTTP generate body entries for these settings."""
        body = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "logit_bias":
                body[f.name] = logit_bias_text(value)
            elif f.name == "bad_words":
                body[f.name] = json.dumps(list(value))
            else:
                body[f.name] = list(value) if isinstance(value, tuple) else value
        return body


def logit_bias_text(bias: dict[int, float]) -> str:
    """``logit_bias`` as the JSON text the server reads (object keys are token ids)."""
    return json.dumps({str(t): b for t, b in bias.items()})


def prompt_arrays(prompt: str | None = None, input_ids=None) -> dict[str, np.ndarray]:
    """``text_input`` or ``input_ids`` as numpy arrays (exactly one, or neither for a bare END)."""
    if prompt is not None and input_ids is not None:
        raise ValueError("give the prompt as text or as input_ids, not both")
    if prompt is not None:
        return {"text_input": np.array([prompt.encode("utf-8")], dtype=np.object_)}
    if input_ids is not None:
        return {"input_ids": np.asarray(list(input_ids), dtype=np.int32)}
    return {}


def request_arrays(params: GenerationParams, stream: bool | None) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (array, Triton datatype) for the settings that are set."""
    out = {}
    for name, (np_type, dtype) in _SCALARS.items():
        value = getattr(params, name)
        if value is not None:
            out[name] = (np.array([value], dtype=np_type), dtype)
    if params.stop:
        out["stop"] = (np.array([s.encode("utf-8") for s in params.stop], dtype=np.object_), "BYTES")
    if params.stop_token_ids:
        out["stop_token_ids"] = (np.array(params.stop_token_ids, dtype=np.int32), "INT32")
    if stream is not None:
        out["stream"] = (np.array([stream], dtype=np.bool_), "BOOL")
    return out


def grpc_inputs(prompt: str | None, input_ids, params: GenerationParams, stream: bool | None):
    """The ``tritonclient.grpc.InferInput`` list for one request (also used by the asyncio client)."""
    import tritonclient.grpc as grpcclient

    tensors = []
    arrays = {name: (arr, "BYTES" if name == "text_input" else "INT32")
              for name, arr in prompt_arrays(prompt, input_ids).items()}
    arrays.update(request_arrays(params, stream))
    for name, (arr, dtype) in arrays.items():
        tensor = grpcclient.InferInput(name, list(arr.shape), dtype)
        tensor.set_data_from_numpy(arr)
        tensors.append(tensor)
    return tensors


def request_body(prompt: str | None, input_ids, params: GenerationParams, stream: bool) -> dict:
    """The JSON body of one HTTP ``generate`` / ``generate_stream`` request."""
    if (prompt is None) == (input_ids is None):
        raise ValueError("give the prompt as text or as input_ids (exactly one)")
    body = {"text_input": prompt} if prompt is not None else {"input_ids": list(map(int, input_ids))}
    body.update(params.as_json())
    body["stream"] = stream
    return body


def salt_parameters(cache_salt: str | None, params: GenerationParams | None = None) -> dict | None:
    """The gRPC request parameters: ``cache_salt`` and the settings without an input tensor
    (``logit_bias``); None when there are none."""
    out = {} if cache_salt is None else {"cache_salt": cache_salt}
    if params is not None and params.logit_bias:
        out["logit_bias"] = logit_bias_text(params.logit_bias)
    for name in ("logprobs", "prompt_logprobs", "n", "best_of"):
        if params is not None and getattr(params, name) is not None:
            out[name] = getattr(params, name)
    if params is not None and params.guided_json is not None:
        schema = params.guided_json
        out["guided_json"] = schema if isinstance(schema, str) else json.dumps(schema)
    if params is not None and params.bad_words:
        out["bad_words"] = json.dumps(list(params.bad_words))
    if params is not None and params.guided_regex is not None:
        out["guided_regex"] = params.guided_regex
    if params is not None and params.guided_choice is not None:
        out["guided_choice"] = json.dumps(list(params.guided_choice))
    return out or None
