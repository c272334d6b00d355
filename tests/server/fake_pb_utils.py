"""A stand-in for Triton's ``triton_python_backend_utils`` (only what the server code uses)."""

from __future__ import annotations

import json

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError:
    INTERNAL, INVALID_ARG, UNAVAILABLE = 13, 3, 14

    def __init__(self, message, code=INTERNAL):
        self.text, self.code = message, code

    def message(self):
        return self.text


class Tensor:
    def __init__(self, name, arr):
        self.name, self.arr = name, arr

    def as_numpy(self):
        return self.arr


class InferenceResponse:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


def get_input_tensor_by_name(request, name):
    arr = request.inputs.get(name)
    return None if arr is None else Tensor(name, arr)


class Sender:
    def __init__(self, fail=False):
        self.sent = []
        self.fail = fail

    def send(self, response, flags=0):
        if self.fail:
            raise RuntimeError("sender is closed")
        self.sent.append((response, flags))

    @property
    def error(self):
        """(message, code) of the final error response, or None."""
        (response, flags), = self.sent
        assert flags == TRITONSERVER_RESPONSE_COMPLETE_FINAL
        return None if response.error is None else (response.error.text, response.error.code)


class Request:
    def __init__(self, inputs=None, parameters=None, flags=0, corr_id=0, raw_parameters=None, outputs=None):
        self.inputs = {k: _array(v) for k, v in (inputs or {}).items()}
        self._outputs = list(outputs or ())  # the outputs asked for by name (Triton: all when none)
        self._parameters = raw_parameters if raw_parameters is not None else json.dumps(parameters or {})
        self._flags, self._corr_id = flags, corr_id
        self.sender = Sender()

    def parameters(self):
        if isinstance(self._parameters, Exception):
            raise self._parameters
        return self._parameters

    def flags(self):
        return self._flags

    def correlation_id(self):
        return self._corr_id

    def requested_output_names(self):
        return self._outputs

    def get_response_sender(self):
        return self.sender

    def is_cancelled(self):
        return False


def _array(value):
    """Tensors as the stub hands them over: BYTES -> object arrays of bytes."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (str, bytes)):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], (str, bytes)):
        return np.array([v.encode() if isinstance(v, str) else v for v in value], dtype=np.object_)
    raise TypeError(f"give tensors as numpy arrays or strings: {value!r}")
