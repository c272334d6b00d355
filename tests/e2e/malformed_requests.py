"""The catalogue of malformed requests test_fuzz.py sends to a running server, and how an
answer to one is judged.

Two owners of an answer:
- ``OURS``: the request reached ``parse_request`` / the engine's checks: HTTP 400 (gRPC: an
  error), naming the input or parameter.
- ``TRITON``: tritonserver refuses it before our code runs (JSON it cannot parse, a value of
  the wrong JSON type for an input tensor, a tensor of the wrong data type or shape, an unknown
  input, a missing correlation id). Those answers are Triton's own; over HTTP its JSON-to-tensor
  conversion answers 500 for a value of the wrong type ("Unable to parse 'data'") and for
  unparseable JSON, 400 for a wrong shape or a nested parameter. They are kept as Triton
  returns them and only recognised here by their messages.

The limits are the shared server's (shared_server.py): its max_model_len bounds the prompt.
"""

from __future__ import annotations

import json
import random

import numpy as np
import tritonclient.grpc as grpcclient

from shared_server import MAX_MODEL_LEN
from triton_calls import StreamClient, inputs_for

TEXT_LIMIT = MAX_MODEL_LEN * 4  # the demo tokenizer's longest token is "</s>": 4 bytes
BIG_TEXT_BYTES = 8_000_000  # gRPC; took ~10 s to refuse and stalled every stream before the limit
# HTTP: tritonserver 2.51 itself dies (SIGSEGV) on large request bodies (4.2 MB did; the threshold is not measured), on
# any endpoint (/generate, /infer, unknown models) before any model code runs (upstream
# triton-inference-server/server#5840; its HTTP handler put one iovec per body chunk on the
# stack, fixed after 2.51 by #8305): the HTTP case stays below that; a deployment needs a body
# limit in front of Triton's HTTP port
BIG_HTTP_TEXT_BYTES = 3_000_000
TOO_MANY_IDS = MAX_MODEL_LEN + 88  # a prompt over max_model_len, far below the size limits
OURS, TRITON = "ours", "triton"
# tritonserver's own messages for requests refused before our code
TRITON_MESSAGES = ("Unable to parse", "failed to parse the request JSON", "attempt to get members",
                   "has invalid type", "can not convert input", "data-type is", "unexpected shape",
                   "unexpected inference input", "correlation ID", "Converting keyword", "already exists")


def body(**fields) -> bytes:
    return json.dumps({"text_input": "Hi", "max_tokens": 3, **fields}).encode()


def raw_input(name, arr, dtype):
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def ok_inputs(**kw):
    return inputs_for(**{"text": "Hi", "max_tokens": 3, **kw})


# HTTP: (name, model, raw body, stream, owner, expected status, text the error must contain)
HTTP_CASES = [
    ("unknown field", "llm_stateless", body(max_new_tokens=3), False, OURS, 400, "'max_new_tokens'"),
    ("unknown nested parameter", "llm_stateless", body(parameters={"foo": 1}), False, OURS, 400, "'foo'"),
    ("invalid UTF-8 text", "llm_stateless", b'{"text_input": "ab\xff", "max_tokens": 3}', False, OURS, 400,
     "'text_input' is not valid UTF-8"),
    ("invalid UTF-8 stop", "llm_stateless", body(stop=["\udcff"]), False, OURS, 400, "'stop'[0] is not valid UTF-8"),
    ("invalid UTF-8 parameter", "llm_stateless", b'{"text_input": "Hi", "cache_salt": "a\xff"}', False, OURS,
     400, "parameters could not be read"),
    ("temperature NaN", "llm_stateless", b'{"text_input": "Hi", "temperature": NaN}', False, OURS, 400,
     "'temperature' = nan is not a finite number"),
    ("temperature < 0", "llm_stateless", body(temperature=-0.5), False, OURS, 400, "'temperature' must be in [0, "),
    ("top_p 0", "llm_stateless", body(top_p=0.0), False, OURS, 400, "'top_p' must be in (0, 1]"),
    ("top_p > 1", "llm_stateless", body(top_p=1.5), False, OURS, 400, "'top_p' must be in (0, 1]"),
    ("top_k < 0", "llm_stateless", body(top_k=-1), False, OURS, 400, "'top_k' must be in [0, 2**31 - 1]"),
    ("seed < 0", "llm_stateless", body(seed=-1), False, OURS, 400, "'seed' must be in [0, 2**64 - 1]"),
    ("seed < 0, streamed", "llm_stateless", body(seed=-1), True, OURS, 400, "'seed' must be in [0, 2**64 - 1]"),
    ("cache_salt not a string", "llm_stateless", body(cache_salt=True), False, OURS, 400,
     "'cache_salt' must be a string"),
    ("65 stop strings", "llm_stateless", body(stop=["s"] * 65), False, OURS, 400, "at most 64"),
    ("huge text", "llm_stateless", json.dumps({"text_input": "a" * BIG_HTTP_TEXT_BYTES}).encode(), False, OURS,
     400, f"{BIG_HTTP_TEXT_BYTES} bytes"),
    ("text just over the limit", "llm_stateless", json.dumps({"text_input": "a" * (TEXT_LIMIT + 1)}).encode(),
     False, OURS, 400, f"at most {TEXT_LIMIT} bytes"),
    ("input_ids too long", "llm_stateless", json.dumps({"input_ids": [65] * TOO_MANY_IDS}).encode(), False, OURS,
     400, f"at most {MAX_MODEL_LEN} (max_model_len)"),
    ("empty input_ids", "llm_stateless", json.dumps({"input_ids": []}).encode(), False, OURS, 400, "empty prompt"),
    ("id outside the vocabulary", "llm_stateless", json.dumps({"input_ids": [256, 999]}).encode(), False, OURS,
     400, "outside the vocabulary"),
    ("max_tokens 0", "llm_stateless", body(max_tokens=0), False, OURS, 400,
     "'max_tokens' must be in [1, 2**31 - 1], got 0"),
    ("max_tokens too big", "llm_stateless", body(max_tokens=10**6), False, OURS, 400, "exceeds the context limit"),
    ("no prompt", "llm_stateless", b'{"max_tokens": 2}', False, OURS, 400, "no prompt"),
    ("empty text", "llm_stateless", body(text_input=""), False, OURS, 400, "empty prompt"),
    ("text and ids", "llm_stateless", body(input_ids=[65]), False, OURS, 400, "not both"),
    # refused by tritonserver before our code
    ("max_tokens a string", "llm_stateless", body(max_tokens="abc"), False, TRITON, 500, "Unable to parse 'data'"),
    ("max_tokens a list", "llm_stateless", body(max_tokens=[2, 3]), False, TRITON, 400, "can not convert input"),
    ("seed beyond int64", "llm_stateless", body(seed=10**23), False, TRITON, 500, "Unable to parse 'data'"),
    ("text_input a number", "llm_stateless", body(text_input=5), False, TRITON, 500, "Unable to parse JSON bytes"),
    ("lone surrogate", "llm_stateless", b'{"text_input": "ab\\ud800"}', False, TRITON, 500, "surrogate"),
    ("nested parameter value", "llm_stateless", body(foo={"a": 1}), False, TRITON, 400, "has invalid type"),
    ("broken JSON", "llm_stateless", b'{"text_input": "Hi",', False, TRITON, 500, "failed to parse the request JSON"),
    ("JSON array body", "llm_stateless", b"[1, 2]", False, TRITON, 500, "attempt to get members"),
    ("stateful model over HTTP", "llm", body(), False, TRITON, 400, "correlation ID"),
    # nested "parameters" holding an input's name are converted to that input by Triton
    ("seed overflow as nested parameter", "llm_stateless", body(parameters={"seed": "100000000000000000000000"}),
     False, TRITON, 500, "Unable to parse 'data'"),
    ("setting twice", "llm_stateless", body(parameters={"max_tokens": 3}), False, TRITON, 400, "already exists"),
]

# gRPC: (name, model, inputs, parameters, owner, text the error must contain)
GRPC_CASES = [
    ("seed overflow parameter", "llm_stateless", ok_inputs(), {"seed": "100000000000000000000000"}, OURS,
     "'seed' must be in [0, 2**64 - 1]"),
    ("seed overflow parameter on llm", "llm", ok_inputs(), {"seed": "100000000000000000000000"}, OURS,
     "'seed' must be in [0, 2**64 - 1]"),
    ("temperature NaN", "llm_stateless", ok_inputs(temperature=float("nan")), None, OURS,
     "'temperature' = nan is not a finite number"),
    ("temperature NaN on llm", "llm", ok_inputs(temperature=float("nan")), None, OURS,
     "'temperature' = nan is not a finite number"),
    ("temperature inf", "llm_stateless", ok_inputs(temperature=float("inf")), None, OURS, "'temperature' = inf"),
    ("top_p NaN", "llm_stateless", ok_inputs(top_p=float("nan")), None, OURS, "'top_p' = nan"),
    ("seed tensor < 0", "llm_stateless", ok_inputs(seed=-3), None, OURS, "'seed' must be in [0, 2**64 - 1]"),
    ("top_k 1e20 parameter", "llm_stateless", ok_inputs(), {"top_k": 1e20}, OURS,
     "parameter 'top_k' must be in [0, 2**31 - 1]"),
    ("top_k 2**31 parameter on llm", "llm", ok_inputs(), {"top_k": 2**31}, OURS,
     "parameter 'top_k' must be in [0, 2**31 - 1], got 2147483648"),
    ("invalid UTF-8 stop", "llm_stateless",
     ok_inputs() + [raw_input("stop", np.array([b"ok", b"\xff\xfe"], dtype=np.object_), "BYTES")], None, OURS,
     "'stop'[1] is not valid UTF-8"),
    ("invalid UTF-8 text", "llm_stateless",
     [raw_input("text_input", np.array([b"ab\xc3"], dtype=np.object_), "BYTES")], None, OURS,
     "'text_input' is not valid UTF-8"),
    ("unknown parameter", "llm_stateless", ok_inputs(), {"max_new_tokens": 3}, OURS, "'max_new_tokens'"),
    ("temperature parameter not a number", "llm_stateless", ok_inputs(), {"temperature": "warm"}, OURS,
     "'temperature' = 'warm' is not a number"),
    ("max_tokens parameter a bool", "llm_stateless", inputs_for(text="Hi"), {"max_tokens": True}, OURS,
     "'max_tokens' = True is not an integer"),
    ("max_tokens twice", "llm_stateless", ok_inputs(), {"max_tokens": 3}, OURS, "sent both"),
    ("input_ids as parameter", "llm_stateless", ok_inputs(), {"input_ids": "1"}, OURS, "input tensor"),
    ("huge text", "llm_stateless",
     [raw_input("text_input", np.array([b"a" * BIG_TEXT_BYTES], dtype=np.object_), "BYTES")], None, OURS,
     f"{BIG_TEXT_BYTES} bytes"),
    ("huge input_ids", "llm_stateless", inputs_for(ids=[65] * 100_000), None, OURS, "holds 100000 tokens"),
    ("huge input_ids on llm", "llm", inputs_for(ids=[65] * TOO_MANY_IDS), None, OURS,
     f"holds {TOO_MANY_IDS} tokens"),
    # refused by tritonserver before our code
    ("text_input shape [2]", "llm_stateless",
     [raw_input("text_input", np.array([b"a", b"b"], dtype=np.object_), "BYTES")], None, TRITON, "unexpected shape"),
    ("temperature FP64", "llm_stateless",
     inputs_for(text="Hi") + [raw_input("temperature", np.array([0.5]), "FP64")], None, TRITON, "data-type is"),
    ("input_ids 2-D", "llm_stateless", [raw_input("input_ids", np.ones((2, 2), dtype=np.int32), "INT32")], None,
     TRITON, "unexpected shape"),
    ("unknown input", "llm_stateless", ok_inputs() + [raw_input("foo", np.ones(1, dtype=np.int32), "INT32")],
     None, TRITON, "unexpected inference input 'foo'"),
]

FUZZ_KEYS = ["text_input", "input_ids", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
             "ignore_eos", "stream", "cache_salt", "max_new_tokens", "best_of"]
FUZZ_VALUES = [None, True, False, 0, -1, 7, 2**31, 2**63, 2**70, 0.5, -1e300, 1e-45, float("nan"), "", "x", "nan",
               "1e999", "é" * 3, [], [1, 2], ["a"], [[1]], {"a": 1}]
TENSOR_DTYPES = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "FP64": np.float64, "BOOL": bool,
                 "UINT8": np.uint8, "BYTES": np.object_}
TENSOR_NAMES = ["text_input", "input_ids", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop",
                "ignore_eos", "stream"]


def random_http_cases(rng: random.Random, n: int):
    for i in range(n):
        fields = {"text_input": "fuzz", "max_tokens": 3}
        mutated = rng.sample(FUZZ_KEYS, rng.randint(1, 3))
        for key in mutated:
            fields[key] = rng.choice(FUZZ_VALUES)
        yield f"random HTTP #{i} {fields!r:.80}", json.dumps(fields).encode(), mutated


def random_tensor(rng: random.Random, name: str):
    dtype = rng.choice(list(TENSOR_DTYPES))
    shape = rng.choice([[1], [2], [0], [1, 1]])
    size = int(np.prod(shape))
    if dtype == "BYTES":
        arr = np.array([rng.choice([b"x", b"\xff", b"", b"3", b"nan"]) for _ in range(size)], dtype=np.object_)
    elif dtype in ("FP32", "FP64"):
        arr = np.array([rng.choice([0.5, float("nan"), float("inf"), -1.0, 3.0]) for _ in range(size)],
                       dtype=TENSOR_DTYPES[dtype])
    elif dtype == "BOOL":
        arr = np.array([rng.random() < 0.5 for _ in range(size)], dtype=bool)
    else:
        arr = np.array([rng.choice([0, 1, 3, 255]) for _ in range(size)], dtype=TENSOR_DTYPES[dtype])
    return raw_input(name, arr.reshape(shape), dtype)


def random_grpc_cases(rng: random.Random, n: int):
    for i in range(n):
        if i % 2 == 0:  # a random tensor for one of our inputs
            name = rng.choice(TENSOR_NAMES)
            base = [t for t in inputs_for(text="fuzz", max_tokens=3) if t.name() != name]
            if name == "input_ids":
                base = [t for t in base if t.name() != "text_input"]
            yield f"random tensor #{i} {name}", base + [random_tensor(rng, name)], None, [name]
        else:  # random request parameters
            keys = rng.sample(FUZZ_KEYS, rng.randint(1, 2))
            params = {k: rng.choice([True, -1, 7, 2**40, 0.5, "x", "nan", "100000000000000000000000", ""])
                      for k in keys}
            yield f"random parameters #{i} {params!r:.80}", inputs_for(text="fuzz"), params, keys


def check_answer(problems, name, owner, ok, message, expected, status=None, expected_status=None):
    """Appends what is wrong with one answer to ``problems`` (all are reported at once)."""
    if ok:
        problems.append(f"{name}: answered without an error")
    elif not message or "Traceback" in message or "internal error" in message or expected not in message:
        problems.append(f"{name}: error {message!r}, expected one containing {expected!r}")
    elif owner == OURS and status is not None and status != 400:
        problems.append(f"{name}: HTTP {status} ({message})")
    elif expected_status is not None and status != expected_status:
        problems.append(f"{name}: HTTP {status}, expected {expected_status} ({message})")


def grpc_call(client: StreamClient, model: str, inputs, params, seq_id: int):
    """(answered without error, the error message)."""
    if model == "llm":
        turn = client.send(inputs, seq_id, start=True, end=True, timeout=60, parameters=params)
    else:
        turn = client.send(inputs, timeout=60, parameters=params)
    return turn.error is None, turn.error
