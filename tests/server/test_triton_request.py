"""Parsing rules of ``parse_request`` (issue 13 items 1, 6, 7): every fault is a BadRequest
naming the input or parameter, and size limits apply before any conversion."""

import math

import numpy as np
import pytest

import fake_pb_utils as pb
from fake_pb_utils import Request
from tritonkv.server.triton_request import KNOWN_PARAMETERS, BadRequest, Limits, parse_request

LIMITS = Limits(max_model_len=512, max_text_bytes=2048)


def parse(inputs=None, parameters=None, *, stateless=True, limits=LIMITS, **kw):
    return parse_request(pb, Request(inputs, parameters, **kw), stateless=stateless, default_max_tokens=16,
                         limits=limits)


def refused(*args, **kw) -> str:
    with pytest.raises(BadRequest) as info:
        parse(*args, **kw)
    return str(info.value)


def f32(*v):
    return np.array(v, dtype=np.float32)


def i32(*v):
    return np.array(v, dtype=np.int32)


def test_settings_from_tensors_and_from_parameters():
    p = parse({"text_input": "Hi", "max_tokens": i32(5), "temperature": f32(0.5), "top_k": i32(3),
               "top_p": f32(0.25), "seed": np.array([7], dtype=np.int64), "ignore_eos": np.array([True]),
               "stop": ["x", "", "yz"]})
    assert p.text == "Hi" and p.input_ids is None
    s = p.params
    assert (s.max_tokens, s.temperature, s.top_k, s.top_p, s.seed, s.ignore_eos) == (5, 0.5, 3, 0.25, 7, True)
    assert s.stop == ("x", "yz") and p.stream is False  # one-shot default: one reply
    # HTTP generate / gRPC parameters: same settings, strings accepted where they parse exactly
    q = parse({"input_ids": i32(1, 2)}, {"max_tokens": "5", "temperature": 0.5, "top_k": 3, "top_p": "0.25",
                                         "seed": "18446744073709551615", "ignore_eos": "true", "stop": "x",
                                         "stream": True, "cache_salt": "tenant-a"})
    assert q.input_ids == [1, 2] and q.params.seed == 2**64 - 1 and q.params.stop == ("x",)
    assert (q.params.max_tokens, q.params.temperature, q.params.top_p, q.stream) == (5, 0.5, 0.25, True)
    assert q.cache_salt == "tenant-a"
    assert parse({"text_input": "a"}, {"stop": ["a", "b"]}).params.stop == ("a", "b")
    assert parse({"text_input": "a"}, {"max_tokens": 3.0}).params.max_tokens == 3  # integral double


@pytest.mark.parametrize("seed", ["100000000000000000000000", str(2**64), "-1", 2**64])
def test_seed_out_of_range_is_refused_naming_seed(seed):
    assert "seed" in refused({"text_input": "a"}, {"seed": seed})


def test_seed_tensor_negative_and_huge_strings():
    assert "seed" in refused({"text_input": "a", "seed": np.array([-5], dtype=np.int64)})
    assert "not an integer" in refused({"text_input": "a"}, {"seed": "9" * 5000})


@pytest.mark.parametrize("name", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_tensors_are_refused(name, value):
    message = refused({"text_input": "a", name: f32(value)})
    assert repr(name) in message and "finite" in message


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e999"])
def test_non_finite_float_parameters_are_refused(value):
    message = refused({"text_input": "a"}, {"temperature": value})
    assert "'temperature'" in message and "finite" in message


def test_out_of_range_sampling_values_name_the_parameter():
    assert "temperature" in refused({"text_input": "a", "temperature": f32(-0.5)})
    assert "top_p" in refused({"text_input": "a", "top_p": f32(0.0)})
    assert "top_p" in refused({"text_input": "a"}, {"top_p": 1.5})
    assert "top_k" in refused({"text_input": "a", "top_k": i32(-1)})
    assert parse({"text_input": "a", "temperature": f32(1e-45)}).params.temperature < 1e-5  # greedy


def test_invalid_utf8_names_the_input():
    assert "input 'text_input' is not valid UTF-8" in refused({"text_input": b"ab\xc3"})
    assert "input 'stop'[1] is not valid UTF-8" in refused({"text_input": "a", "stop": [b"ok", b"\xff\xfe"]})
    assert "parameter 'stop'[0] is not valid UTF-8" in refused({"text_input": "a"}, {"stop": ["\udcff"]})
    lone = np.array(["a\ud800"], dtype=np.object_)  # a str tensor with a lone surrogate
    assert "text_input" in refused({"text_input": lone})


def test_unreadable_or_malformed_parameters():
    err = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    assert "parameters could not be read" in refused({"text_input": "a"}, raw_parameters=err)
    assert "not valid JSON" in refused({"text_input": "a"}, raw_parameters="{nope")
    assert "JSON object" in refused({"text_input": "a"}, raw_parameters="[1, 2]")
    assert parse({"text_input": "a"}, raw_parameters="").params.max_tokens == 16


def test_unknown_parameters_are_refused_listing_the_known_ones():
    message = refused({"text_input": "a"}, {"max_new_tokens": 3, "foo": True})
    assert "'foo', 'max_new_tokens'" in message
    for name in KNOWN_PARAMETERS:
        assert name in message
    assert "cache_salt" in KNOWN_PARAMETERS and "stop" in KNOWN_PARAMETERS
    for name in ("text_input", "input_ids", "START"):
        assert "input tensor" in refused({"text_input": "a"}, {name: "x"})


def test_a_setting_sent_twice_is_refused():
    assert "both" in refused({"text_input": "a", "max_tokens": i32(3)}, {"max_tokens": 3})
    assert "both" in refused({"text_input": "a", "stop": ["x"]}, {"stop": "x"})


@pytest.mark.parametrize("params, expected", [
    ({"max_tokens": "abc"}, "parameter 'max_tokens' = 'abc' is not an integer"),
    ({"max_tokens": 2.5}, "parameter 'max_tokens' = 2.5 is not an integer"),
    ({"max_tokens": True}, "parameter 'max_tokens' = True is not an integer"),
    ({"top_k": "3.0"}, "parameter 'top_k' = '3.0' is not an integer"),
    ({"temperature": "warm"}, "parameter 'temperature' = 'warm' is not a number"),
    ({"temperature": False}, "parameter 'temperature' = False is not a number"),
    ({"ignore_eos": "maybe"}, "parameter 'ignore_eos' = 'maybe' is not a boolean"),
    ({"stream": 2}, "parameter 'stream' = 2 is not a boolean"),
    ({"stop": 5}, "parameter 'stop' must be a string or a list of strings"),
    ({"stop": [1]}, "parameter 'stop'[0] must be a string"),
    ({"stop": ["s"] * 65}, "at most 64"),
    ({"cache_salt": True}, "parameter 'cache_salt' must be a string"),
])
def test_parameter_types(params, expected):
    assert expected in refused({"text_input": "a"}, params)


@pytest.mark.parametrize("inputs, expected", [
    ({"text_input": "a", "max_tokens": i32(1, 2)}, "input 'max_tokens' must hold one value, got 2"),
    ({"text_input": "a", "max_tokens": i32()}, "input 'max_tokens' must hold one value, got 0"),
    ({"text_input": "a", "max_tokens": f32(3)}, "input 'max_tokens' has data type float32"),
    ({"text_input": "a", "ignore_eos": f32(1)}, "input 'ignore_eos' has data type float32"),
    ({"text_input": ["a", "b"]}, "input 'text_input' must hold one string, got 2"),
    ({"text_input": i32(65)}, "input 'text_input' has data type int32"),
    ({"input_ids": f32(1, 2)}, "input 'input_ids' has data type float32"),
    ({"text_input": "a", "stop": i32(1)}, "input 'stop' has data type int32"),
    ({"text_input": "a", "input_ids": i32(1)}, "not both"),
])
def test_tensor_types_and_shapes(inputs, expected):
    assert expected in refused(inputs)


def test_oversized_text_is_refused_before_decoding():
    # invalid UTF-8 *and* too long: the size is what is reported (nothing was decoded)
    message = refused({"text_input": b"\xff" * 2049})
    assert "2049 bytes" in message and "max_model_len" in message and "2048" in message
    assert parse({"text_input": "a" * 2048}).text == "a" * 2048
    assert parse({"text_input": "a" * 10_000}, limits=Limits(512, None)).text  # no bound known: tokenised


class NoList(np.ndarray):
    def tolist(self):
        raise AssertionError("converted before the size check")


def test_oversized_input_ids_are_refused_before_conversion():
    ids = np.zeros(513, dtype=np.int32).view(NoList)
    assert "holds 513 tokens; this model serves at most 512" in refused({"input_ids": ids})
    assert len(parse({"input_ids": np.zeros(512, dtype=np.int32)}).input_ids) == 512
    big = np.array([2**63 + 1], dtype=np.uint64)  # passes through exactly; the engine's vocab check refuses it
    assert parse({"input_ids": big}).input_ids == [2**63 + 1]


def test_sequence_controls_and_close_only():
    p = parse({"input_ids": i32(1)}, stateless=False, flags=1, corr_id=9)
    assert (p.start, p.end, p.corr_id, p.stream) == (True, False, 9, True)
    p = parse({"START": f32(0), "END": f32(1)}, stateless=False, flags=0, corr_id="conv")
    assert p.end and not p.start and p.close_only
    assert not parse({"START": f32(1), "END": f32(1)}, stateless=False, corr_id=3).close_only  # needs a prompt
    assert not parse({}).close_only  # one-shot without a prompt: refused later, never "closed"
    assert "correlation id" in refused({"input_ids": i32(1)}, stateless=False, corr_id=0)
