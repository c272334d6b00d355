"""Values taken from a Triton request (tensors, request parameters, JSON keys), converted
strictly and checked: every fault is a ``BadRequest`` naming the input or parameter.

Rules:
- a number may come as a Python or numpy scalar or as a string that parses exactly (integers
  as decimal digits, at most 40); a float must be finite;
- a sampling setting is then range-checked against ``tritonkv.sampling.params`` (what the
  runner stores: int32, uint64 seeds, finite float32) before any fixed-width conversion;
- list settings (``stop_token_ids``, ``logit_bias``) come as JSON values in
  ``sampling_parameters`` or as JSON text in a request parameter (nested at most
  ``vllm.MAX_JSON_DEPTH`` levels).
"""

from __future__ import annotations

import math
import re

import numpy as np

from tritonkv.sampling.params import BY_NAME, ParameterError, check_value
from tritonkv.server import vllm_contract as vllm

_INT_TEXT = re.compile(r"[+-]?\d{1,40}")


class BadRequest(ValueError):
    """A client mistake found while reading the request; answered with INVALID_ARG (HTTP 400)."""


def same_value(a, b) -> bool:
    """One setting sent both as a request parameter and in sampling_parameters (e.g. 0.1 and
    "0.1") says the same thing."""
    return a == b or (not isinstance(a, (dict, list)) and str(a).strip().lower() == str(b).strip().lower())


def decode(raw, what: str) -> str:
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


def convert(value, kind: str, what: str):
    """One setting's value (a Python or numpy scalar, or a string) as ``kind``, strictly."""
    if isinstance(value, (bytes, np.bytes_)):
        value = decode(value, what)
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


def tensor_setting(arr: np.ndarray, name: str, kind: str):
    what = f"input {name!r}"
    if arr.size != 1:
        raise BadRequest(f"{what} must hold one value, got {arr.size} (shape {list(arr.shape)})")
    expected = {"int": "iu", "float": "fiu", "bool": "biu"}[kind]
    if arr.dtype.kind not in expected + "OSU":
        raise BadRequest(f"{what} has data type {arr.dtype}; expected {'a boolean' if kind == 'bool' else kind}")
    return convert(arr.reshape(-1)[0], kind, what)


def checked(name: str, value, what: str):
    """A sampling setting's raw value, converted to its kind and range-checked."""
    kind = BY_NAME[name].kind if name in BY_NAME else "bool"
    if kind in ("int", "float", "bool"):
        value = convert(value, kind, what)
    elif kind in ("json", "regex", "choices") and isinstance(value, (bytes, np.bytes_)):
        value = decode(value, what)  # JSON text / a regex: parsed by check_value
    elif kind in ("token_ids", "token_bias") and isinstance(value, (str, bytes, np.bytes_)):
        value = vllm.json_value(decode(value, what), what, BadRequest)
    if name not in BY_NAME:
        return value
    try:
        return check_value(name, value, what)
    except ParameterError as exc:
        raise BadRequest(str(exc)) from None
