"""Malformed requests against a real server while well-formed conversations run (issue 13,
items 1, 2, 6, 7).

Every bad request is answered with an error that names the problem; the conversations
running meanwhile finish with HF's greedy tokens and no stall; the pool returns to baseline.

Two owners of an answer:
- ``OURS``: the request reached ``parse_request`` / the engine's checks: HTTP 400 (gRPC: an
  error), naming the input or parameter.
- ``TRITON``: tritonserver refuses it before our code runs (JSON it cannot parse, a value of
  the wrong JSON type for an input tensor, a tensor of the wrong data type or shape, an unknown
  input, a missing correlation id). Those answers are Triton's own; over HTTP its JSON-to-tensor
  conversion answers 500 for a value of the wrong type ("Unable to parse 'data'") and for
  unparseable JSON, 400 for a wrong shape or a nested parameter. They are kept as Triton
  returns them and only recognised here by their messages.
"""

from __future__ import annotations

import json
import os
import queue
import random
import sys
import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from tiny_models import hf_greedy
from triton_calls import StreamClient, http_post, inputs_for, wait_for_pool_baseline
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "loadtest"))
from managed_server import managed_server  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)
MAX_MODEL_LEN = 512
TEXT_LIMIT = MAX_MODEL_LEN * 4  # the demo tokenizer's longest token is "</s>": 4 bytes
BIG_TEXT_BYTES = 8_000_000  # gRPC; took ~10 s to refuse and stalled every stream before the limit
# HTTP: tritonserver 2.51 itself dies (SIGSEGV) on a request body of about 4.1 MB or more, on
# any endpoint (/generate, /infer, unknown models) before any model code runs (upstream
# triton-inference-server/server#5840; its HTTP handler put one iovec per body chunk on the
# stack, fixed after 2.51 by #8305): the HTTP case stays below that; a deployment needs a body
# limit in front of Triton's HTTP port
BIG_HTTP_TEXT_BYTES = 3_000_000
OURS, TRITON = "ours", "triton"
# tritonserver's own messages for requests refused before our code
TRITON_MESSAGES = ("Unable to parse", "failed to parse the request JSON", "attempt to get members",
                   "has invalid type", "can not convert input", "data-type is", "unexpected shape",
                   "unexpected inference input", "correlation ID", "Converting keyword", "already exists")


@pytest.fixture(scope="module")
def server():
    with managed_server(pool_name=f"fuzz{os.getpid()}",
                        extra_params={"max_model_len": str(MAX_MODEL_LEN), "kv_cache_memory_mb": "64"}) as s:
        yield s


@pytest.fixture(scope="module")
def hf_demo():
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(ensure_demo_checkpoint(), dtype=torch.float32).eval()


# -- well-formed conversations --------------------------------------------------------------
MAX_TURNS = 40  # 40 x (3 + 6) tokens stay inside max_model_len


class Conversation(threading.Thread):
    """Turns on ``llm`` (one gRPC stream) until told to stop; records the largest wait for a
    response (first token or next token)."""

    def __init__(self, url: str, index: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.index, self.stop_event = url, index, stop
        self.seq_id = 880_000 + index
        self.turns: list[tuple[list[int], list[int] | None, str | None]] = []  # (prompt, output, error)
        self.max_gap = 0.0
        self.outlived_fuzz = False  # still running when the last malformed request was answered
        self.failure: BaseException | None = None

    def run(self):
        try:
            self._converse()
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def _converse(self):
        client = grpcclient.InferenceServerClient(self.url)
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((time.monotonic(), result, error)))
        try:
            rng = random.Random(self.index)
            n = 0
            while True:
                prompt = ([256] if n == 0 else []) + [rng.randrange(32, 127) for _ in range(3)]
                if n == MAX_TURNS - 1:
                    # the context holds one more turn: the conversation stays open (idle, its KV
                    # kept) until the fuzz is over, so that it spans the whole fuzz on a fast machine
                    self.stop_event.wait(300)
                self.outlived_fuzz = n >= 1 and self.stop_event.is_set()
                last = n == MAX_TURNS - 1 or self.outlived_fuzz
                client.async_stream_infer(model_name="llm", inputs=inputs_for(ids=prompt, max_tokens=6, **GREEDY),
                                          sequence_id=self.seq_id, sequence_start=n == 0, sequence_end=last,
                                          enable_empty_final_response=True)
                ids, error, before = [], None, time.monotonic()
                while True:
                    at, result, err = results.get(timeout=60)
                    self.max_gap = max(self.max_gap, at - before)
                    before = at
                    if err is not None:
                        error = str(err)
                        break
                    out = result.as_numpy("output_ids")
                    if out is not None:
                        ids += out.tolist()
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        break
                self.turns.append((prompt, ids, error))
                n += 1
                if last or error:
                    return
        finally:
            client.stop_stream()
            client.close()


# -- the catalogue ----------------------------------------------------------------------------
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
    ("input_ids too long", "llm_stateless", json.dumps({"input_ids": [65] * 600}).encode(), False, OURS, 400,
     "at most 512 (max_model_len)"),
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
    ("huge input_ids on llm", "llm", inputs_for(ids=[65] * 1000), None, OURS, "holds 1000 tokens"),
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


def hf_greedy_matches(model, turns) -> bool:
    """HF's greedy choice at every generated position of the whole conversation, in one
    forward pass over it (teacher forcing; the same answers as ``hf_greedy`` turn by turn,
    since each turn's context is exactly the tokens before it)."""
    history, generated = [], []
    for prompt, ids, _ in turns:
        history += prompt
        generated += [(len(history) + j, t) for j, t in enumerate(ids)]
        history += ids
    with torch.no_grad():
        logits = model(torch.tensor([history])).logits[0]
    choices = logits.argmax(-1).tolist()
    return all(choices[pos - 1] == token for pos, token in generated) and len(turns[-1][1]) == 6


def test_malformed_requests_while_conversations_run(server, hf_demo):
    started = time.monotonic()
    stop = threading.Event()
    conversations = [Conversation(server.grpc_url, i, stop) for i in range(3)]
    for c in conversations:
        c.start()
    answered, slow, problems = [], [], []
    rng = random.Random(13)
    grpc_clients = {m: StreamClient(server.grpc_url, m) for m in ("llm", "llm_stateless")}
    try:
        for name, model, data, stream, owner, status, expected in HTTP_CASES:
            t0 = time.monotonic()
            try:
                code, message, _ = http_post(server.http_url, model, data, stream=stream)
            except OSError as exc:
                problems.append(f"HTTP {name}: {exc!r}")
                continue
            check_answer(problems, f"HTTP {name}", owner, code == 200 and message is None, message, expected, code, status)
            answered.append(name)
            if time.monotonic() - t0 > 2.0:
                slow.append((name, time.monotonic() - t0))
        for i, (name, model, inputs, params, owner, expected) in enumerate(GRPC_CASES):
            t0 = time.monotonic()
            ok, message = grpc_call(grpc_clients[model], model, inputs, params, 770_000 + i)
            check_answer(problems, f"gRPC {name}", owner, ok, message, expected)
            answered.append(name)
            if time.monotonic() - t0 > 2.0:
                slow.append((name, time.monotonic() - t0))
        # random: an answer is either a success or an error that names a field we changed
        # (ours, 400) or is one of Triton's parse errors; never a traceback, never our 500
        for name, data, mutated in random_http_cases(rng, 14):
            code, message, events = http_post(server.http_url, "llm_stateless", data)
            answered.append(name)
            if code == 200:
                if message is not None or "output_ids" not in events[0]:
                    problems.append(f"{name}: 200 with {events!r:.200}")
            elif not message or "Traceback" in message or "internal error" in message:
                problems.append(f"{name}: HTTP {code} {message!r}")
            elif any(m in message for m in TRITON_MESSAGES):
                if code not in (400, 500):
                    problems.append(f"{name}: HTTP {code} {message!r}")
            elif code != 400 or not (any(k in message for k in mutated) or "prompt" in message
                                     or "context limit" in message):
                problems.append(f"{name}: HTTP {code} {message!r} names none of {mutated}")
        for i, (name, inputs, params, mutated) in enumerate(random_grpc_cases(rng, 12)):
            ok, message = grpc_call(grpc_clients["llm_stateless"], "llm_stateless", inputs, params, 0)
            answered.append(name)
            if ok:
                continue
            if "Traceback" in message or "internal error" in message or not (
                    any(m in message for m in TRITON_MESSAGES) or any(k in message for k in mutated)
                    or "prompt" in message or "context limit" in message):
                problems.append(f"{name}: {message!r} names none of {mutated}")
    finally:
        stop.set()
        for client in grpc_clients.values():
            client.close()
        for c in conversations:
            c.join(90)
    fuzz_s = time.monotonic() - started
    assert not problems, "\n".join(problems)
    assert len(answered) >= 40 + 10, len(answered)
    assert not slow, f"slow refusals: {slow}"

    # every conversation ran through the whole fuzz, finished with HF's greedy tokens, and no
    # stream stalled meanwhile
    for c in conversations:
        assert c.failure is None, repr(c.failure)
        assert c.outlived_fuzz, f"conversation {c.index} ended before the fuzz did ({len(c.turns)} turns)"
        assert all(error is None for _, _, error in c.turns), [e for _, _, e in c.turns if e]
        assert hf_greedy_matches(hf_demo, c.turns), f"conversation {c.index}"
        assert c.max_gap < 3.0, f"conversation {c.index}: a {c.max_gap:.1f} s gap between responses"

    # the instances still serve, and the pool is back to baseline
    code, message, events = http_post(server.http_url, "llm_stateless",
                                      json.dumps({"input_ids": [256, 72, 105], "max_tokens": 4, **GREEDY}).encode())
    assert code == 200 and events[0]["output_ids"] == hf_greedy(hf_demo, [256, 72, 105], 4)[0]
    assert server.is_ready()
    checked_s = time.monotonic() - started
    assert wait_for_pool_baseline(server.metrics_url, timeout=15)
    print(f"\n{len(answered)} malformed requests answered in {fuzz_s:.1f} s (checked at {checked_s:.1f} s, "
          f"baseline at {time.monotonic() - started:.1f} s); "
          f"largest response gap {max(c.max_gap for c in conversations):.2f} s; "
          f"turns {[len(c.turns) for c in conversations]}")
