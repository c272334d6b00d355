"""``TritonPythonModel._enqueue``: whatever goes wrong while admitting one request is answered
to that request (never raised out of ``execute``); without a core that can be attached, the
request is answered at once."""

import time

import numpy as np
import pytest

import fake_pb_utils as pb
from fake_pb_utils import Request, Sender
from tritonkv.core.client import CoreUnavailable
from tritonkv.engine.requests import RequestError, TurnOutput
from tritonkv.server.first_token_stages import FirstTokenStages
from tritonkv.server.triton_model import TritonPythonModel
from tritonkv.server.triton_request import Limits


class FakeCore:
    """The core client's surface that admission uses."""

    def __init__(self):
        self.down = None
        self.connect_error = None
        self.submitted = []
        self.emits = []
        self.encode_error = None

    def connect(self):
        raise CoreUnavailable(self.connect_error)

    def encode(self, text, first_turn):
        if self.encode_error:
            raise self.encode_error
        return [ord(c) for c in text]

    def validate(self, ids, params):
        if params.max_tokens > 100:
            raise RequestError("max_tokens too big")

    def submit(self, corr_id, ids, params, emit, **kw):
        self.submitted.append((corr_id, ids, kw))
        self.emits.append(emit)


class config:
    default_max_tokens = 8
    stream_interval = 1


def model(stateless=True) -> TritonPythonModel:
    m = TritonPythonModel.__new__(TritonPythonModel)
    m.pb_utils, m.engine, m.config, m.stateless = pb, FakeCore(), config, stateless
    m.core = m.engine
    m.limits, m._next_stateless_id = Limits(512, 2048), 0
    return m


def run(m, request):
    assert m.execute([request]) is None
    return request.sender


def test_good_request_is_submitted():
    m = model()
    sender = run(m, Request({"text_input": "hi"}))
    assert sender.sent == [] and m.engine.submitted[0][1] == [104, 105]


def test_bad_request_is_answered_invalid_arg_and_never_reaches_the_engine():
    m = model()
    sender = run(m, Request({"text_input": "hi"}, {"seed": "100000000000000000000000"}))
    message, code = sender.error
    assert "seed" in message and code == pb.TritonError.INVALID_ARG and not m.engine.submitted


def test_engine_validation_error_is_submitted_in_order():
    m = model()
    run(m, Request({"text_input": "hi", "max_tokens": np.array([1000], dtype=np.int32)}))
    (_, ids, kw), = m.engine.submitted
    assert ids == [] and kw["error"] == "max_tokens too big"


def test_no_core_answers_at_once_naming_why():
    m = model()
    m.engine.down = "the engine core (pid 1) exited"
    m.engine.connect_error = "RuntimeError: boom"
    message, code = run(m, Request({"text_input": "hi"})).error
    assert "RuntimeError: boom" in message and code == pb.TritonError.UNAVAILABLE
    assert not m.engine.submitted


@pytest.mark.parametrize("where", ["encode", "flags", "parameters"])
def test_unexpected_fault_fails_that_request_alone(where):
    m = model(stateless=where == "parameters")
    request = Request({"text_input": "hi"}, corr_id=5, flags=1)
    if where == "encode":
        m.engine.encode_error = RuntimeError("tokenizer panicked")
    elif where == "flags":
        request.flags = lambda: (_ for _ in ()).throw(RuntimeError("flags unreadable"))
    else:
        request.parameters = lambda: (_ for _ in ()).throw(MemoryError("no memory"))
    message, code = run(m, request).error
    if where == "parameters":
        assert "parameters could not be read" in message and code == pb.TritonError.INVALID_ARG
    else:
        assert "internal error while admitting the request" in message and code == pb.TritonError.INTERNAL
    # the next request is served as usual
    m.engine.encode_error = None
    assert run(m, Request({"text_input": "ok"}, corr_id=6, flags=1)).sent == [] and m.engine.submitted


def test_a_broken_sender_or_request_never_escapes_execute():
    m = model()
    request = Request({"text_input": "hi"}, {"nope": 1})
    request.sender = Sender(fail=True)
    assert m.execute([request]) is None
    request = Request({"text_input": "hi"})
    request.get_response_sender = lambda: (_ for _ in ()).throw(RuntimeError("no sender"))
    assert m.execute([request, Request({"text_input": "x"})]) is None
    assert len(m.engine.submitted) == 1


def test_the_first_response_adds_its_stages_once():
    m = model()
    m.first_token_stages = stages = FirstTokenStages()
    taken_before = time.monotonic()
    sender = run(m, Request({"text_input": "hi", "stream": np.array([True])}))
    (emit,) = m.engine.emits
    t = time.monotonic()
    emit(TurnOutput("h", [104], first_token_times=(t + 0.010, t + 0.030, t + 0.060)))
    emit(TurnOutput("i", [105], finished=True, finish_reason="length"))
    sent_after = time.monotonic()
    sums, count = stages.snapshot()
    assert count == 1 and len(sender.sent) == 2
    assert sums["queue"] == pytest.approx(0.020) and sums["prefill"] == pytest.approx(0.030)
    # the four stages add up to the frontend's own span: execute took it -> first response sent
    assert 0 <= sum(sums.values()) <= sent_after - taken_before


def test_a_request_answered_whole_adds_no_stages():
    m = model()
    m.first_token_stages = stages = FirstTokenStages()
    run(m, Request({"text_input": "hi"}))
    t = time.monotonic()
    m.engine.emits[0](TurnOutput("h", [104], finished=True, finish_reason="length", first_token_times=(t, t, t)))
    assert stages.snapshot()[1] == 0
