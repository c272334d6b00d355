"""One OpenAI request = one gRPC stream into Triton's ``llm_stateless`` model.

Rules:
- the request's inputs are the model's own tensors: text_input or input_ids, ``stream``, and
  each sampling setting the request set, as the tensor its definition names
  (``tritonkv.sampling.params``: ``triton_dtype``); a setting without a tensor
  (``logit_bias``) and ``cache_salt`` travel as request parameters (JSON text / string);
- the stream stays open until the final response (the one carrying ``finish_reason``) or an
  error; the model's error text is mapped to an OpenAI error (errors.from_model_error);
- leaving the ``generate`` iterator early (client gone, task cancelled) cancels the gRPC call,
  which Triton passes on to the model as a cancelled request: the engine frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aio_client

from tritonkv.openai_frontend.errors import OpenAIError, from_model_error, unavailable
from tritonkv.openai_frontend.schema import Generation
from tritonkv.sampling.params import BY_NAME


@dataclass
class Delta:
    """One streamed piece of output; the last one has ``finish_reason`` and the counts."""

    text: str
    num_tokens: int
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[dict] | None = None  # per token: {token id: {logprob, rank, decoded_token}}
    prompt_logprobs: list[dict | None] | None = None  # per prompt token, the same (None: the first)
    index: int = 0  # the choice (n > 1)
    last: bool = False  # the request's last delta (every choice ended)


def _tensor(name: str, arr: np.ndarray, dtype: str) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


_NUMPY = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}


def model_inputs(gen: Generation) -> list[grpcclient.InferInput]:
    tensors = []
    if gen.text is not None:
        tensors.append(_tensor("text_input", np.array([gen.text.encode("utf-8")], dtype=np.object_), "BYTES"))
    else:
        tensors.append(_tensor("input_ids", np.array(gen.input_ids, dtype=np.int32), "INT32"))
    for name, value in gen.sampling.items():
        dtype = BY_NAME[name].triton_dtype
        if dtype == "BYTES":
            tensors.append(_tensor(name, np.array([v.encode("utf-8") for v in value], dtype=np.object_), dtype))
        elif dtype is not None:
            arr = np.array(list(value) if isinstance(value, tuple) else [value], dtype=_NUMPY[dtype])
            tensors.append(_tensor(name, arr, dtype))
    tensors.append(_tensor("stream", np.array([gen.stream]), "BOOL"))
    return tensors


def request_parameters(gen: Generation) -> dict | None:
    """The settings without an input tensor, and ``cache_salt``, as request parameters."""
    params = {name: _parameter_text(name, value) for name, value in gen.sampling.items()
              if BY_NAME[name].triton_dtype is None}
    if gen.cache_salt is not None:
        params["cache_salt"] = gen.cache_salt
    return params or None


def _parameter_text(name: str, value) -> str:
    kind = BY_NAME[name].kind
    if kind in ("json", "regex"):
        return value  # a schema's JSON text, a regex
    return json.dumps(dict(value) if kind == "token_bias" else list(value) if isinstance(value, tuple) else value)


class TritonBridge:
    def __init__(self, grpc_url: str, triton_model: str = "llm_stateless"):
        self.grpc_url = grpc_url
        self.triton_model = triton_model
        self._client: aio_client.InferenceServerClient | None = None

    def client(self) -> aio_client.InferenceServerClient:
        if self._client is None:  # made inside the running loop (grpc.aio binds to it)
            self._client = aio_client.InferenceServerClient(self.grpc_url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def is_ready(self) -> bool:
        try:
            return await self.client().is_model_ready(self.triton_model)
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    async def generate(self, gen: Generation, prompt_param: str = "prompt") -> AsyncIterator[Delta]:
        """Deltas until the final one; raises OpenAIError for a refused or failed request."""
        done = asyncio.Event()

        async def one_request():
            yield {"model_name": self.triton_model, "inputs": model_inputs(gen),
                   "parameters": request_parameters(gen)}
            await done.wait()  # half-closing early would end the stream before the responses

        try:
            responses = self.client().stream_infer(one_request())
        except Exception as exc:  # noqa: BLE001
            raise unavailable(f"the Triton server at {self.grpc_url} cannot be reached: {exc}") from None
        finished = False
        n = gen.sampling.get("n", 1)
        try:
            async for result, error in responses:
                if error is not None:
                    raise from_model_error(error.message(), prompt_param)
                deltas = _deltas(result, n)
                finished = any(d.finish_reason is not None for d in deltas)
                deltas[-1].last = finished
                for delta in deltas:
                    yield delta
                if finished:
                    return
            raise unavailable("the Triton stream ended before the final response")
        except OpenAIError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a gRPC failure (server gone, stream reset)
            raise unavailable(f"the Triton server at {self.grpc_url} failed the request: {exc}") from None
        finally:
            done.set()
            if not finished:
                responses.cancel()  # the model sees is_cancelled(): its KV blocks are freed


def _deltas(result, n: int) -> list[Delta]:
    """The deltas of one response (server/triton_choices.py for n > 1: n elements per output,
    ``output_ids`` split by ``num_output_tokens``, every choice's ``finish_reason`` on the
    final response; with n = 1 the one choice holds every id). Never empty: a response
    without news gives an empty delta of choice 0."""
    texts = _strings(result, "text_output") or [""] * n
    ids = result.as_numpy("output_ids")
    ids = [] if ids is None else ids.reshape(-1).tolist()
    counts = result.as_numpy("num_output_tokens")
    counts = [len(ids)] if n == 1 else counts.reshape(-1).tolist()
    reasons = _strings(result, "finish_reason") or [None] * n
    logprobs = _strings(result, "logprobs")
    logprobs = None if logprobs is None else [json.loads(x) for x in logprobs]
    deltas, at = [], 0
    for i in range(n):
        mine, at = ids[at:at + counts[i]], at + counts[i]
        if texts[i] or mine or reasons[i] is not None or (logprobs and logprobs[i]):
            deltas.append(Delta(texts[i], len(mine), mine, reasons[i], index=i,
                                logprobs=logprobs[i] if logprobs is not None else None))
    deltas = deltas or [Delta("", 0, [])]
    prompt_logprobs = _strings(result, "prompt_logprobs")
    if prompt_logprobs is not None:
        deltas[0].prompt_logprobs = json.loads(prompt_logprobs[0])
    cached, prompt = result.as_numpy("cached_tokens"), result.as_numpy("prompt_tokens")
    if cached is not None:
        for d in deltas:
            d.cached_tokens, d.prompt_tokens = int(cached[0]), 0 if prompt is None else int(prompt[0])
    return deltas


def _strings(result, name: str) -> list[str] | None:
    arr = result.as_numpy(name)
    return None if arr is None else [x.decode("utf-8") for x in arr.reshape(-1)]
