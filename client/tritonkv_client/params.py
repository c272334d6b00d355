"""Generation settings and their encoding as requests: gRPC input tensors, HTTP generate JSON
bodies, and the request parameters (shared by the sync and asyncio clients).

Rule: a setting left at ``None`` is not sent, so the server's default applies
(``temperature`` 1.0, ``max_tokens`` the model's ``default_max_tokens``, ...).
"""

from __future__ import annotations

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

    def merged(self, **overrides) -> "GenerationParams":
        """These settings with the non-None ``overrides`` applied (unknown names are a TypeError)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown generation setting(s) {sorted(unknown)}; known: {sorted(names)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(given.get("stop"), str):
            given["stop"] = (given["stop"],)
        elif "stop" in given:
            given["stop"] = tuple(given["stop"])
        return replace(self, **given)

    def as_json(self) -> dict:
        """The HTTP generate body entries for these settings."""
        body = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                body[f.name] = list(value) if f.name == "stop" else value
        return body


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


def salt_parameters(cache_salt: str | None) -> dict | None:
    """The gRPC request parameters that carry ``cache_salt`` (None: no parameters)."""
    return None if cache_salt is None else {"cache_salt": cache_salt}
