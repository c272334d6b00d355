"""Parsing rules of ``parse_request`` (issue 13 items 1, 6, 7): every fault is a BadRequest
naming the input or parameter, and size limits apply before any conversion."""

import json
import math

import numpy as np
import pytest

import fake_pb_utils as pb
from fake_pb_utils import Request
from tritonkv.engine.requests import TurnOutput
from tritonkv.server.triton_request import (KNOWN_PARAMETERS, BadRequest, Limits, ReplyChannel, ReplyForm,
                                           parse_request)

LIMITS = Limits(max_model_len=512, max_text_bytes=2048)


def parse(inputs=None, parameters=None, *, stateless=True, limits=LIMITS, default_max=16, **kw):
    return parse_request(pb, Request(inputs, parameters, **kw), stateless=stateless,
                         default_max_tokens=default_max, limits=limits)


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
    assert s.stop == ("x", "yz") and p.stream == ReplyForm(False)  # one-shot default: one reply
    # HTTP generate / gRPC parameters: same settings, strings accepted where they parse exactly
    q = parse({"input_ids": i32(1, 2)}, {"max_tokens": "5", "temperature": 0.5, "top_k": 3, "top_p": "0.25",
                                         "seed": "18446744073709551615", "ignore_eos": "true", "stop": "x",
                                         "stream": True, "cache_salt": "tenant-a"})
    assert q.input_ids == [1, 2] and q.params.seed == 2**64 - 1 and q.params.stop == ("x",)
    assert (q.params.max_tokens, q.params.temperature, q.params.top_p, q.stream) == (5, 0.5, 0.25, ReplyForm(True))
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
    assert (p.start, p.end, p.corr_id, p.stream) == (True, False, 9, ReplyForm(True))
    p = parse({"START": f32(0), "END": f32(1)}, stateless=False, flags=0, corr_id="conv")
    assert p.end and not p.start and p.close_only
    assert refused({}) == "no prompt: send text_input or input_ids"  # one-shot: never "closed"
    assert "no prompt" in refused({"START": f32(1), "END": f32(1)}, stateless=False, corr_id=3)
    assert "correlation id" in refused({"input_ids": i32(1)}, stateless=False, corr_id=0)


# -- the input contract of Triton's vLLM backend (issue 15 item 7) ---------------------------
def b(*v):
    return np.array(v, dtype=bool)


def vllm_inputs(sampling: dict, **flags):
    return {"text_input": "Hello", "sampling_parameters": json.dumps(sampling),
            **{k: b(v) for k, v in flags.items()}}


def test_vllm_form_sets_sampling_and_reply_form():
    p = parse(vllm_inputs({"max_tokens": "7", "temperature": "0", "top_p": "0.95", "top_k": -1, "seed": 3,
                           "stop": "!", "ignore_eos": True},
                          stream=True, exclude_input_in_output=True, return_finish_reason=True,
                          return_num_input_tokens=True, return_num_output_tokens=True))
    s = p.params
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop, s.ignore_eos) == (
        7, 0.0, 0.95, 0, 3, ("!",), True)  # top_k -1: vLLM's "off"
    assert p.stream == ReplyForm(True, "", True, True, True)
    # vLLM's samples/client.py sends the same keys as request parameters as well (strings)
    q = parse(vllm_inputs({"temperature": 0.1, "max_tokens": "100"}, exclude_input_in_output=False),
              {"temperature": "0.1", "max_tokens": "100"})
    assert (q.params.temperature, q.params.max_tokens) == (0.1, 100)
    assert q.stream == ReplyForm(False, echo="Hello")  # one reply that repeats the prompt
    # left out (issue 22): vLLM's defaults for this form, the prompt echoed and 16 tokens
    v = parse(vllm_inputs({}))
    assert v.stream == ReplyForm(False, echo="Hello") and v.params.max_tokens == 16
    assert parse(vllm_inputs({}, exclude_input_in_output=True)).stream == ReplyForm(False)
    assert parse(vllm_inputs({}, stream=True)).stream == ReplyForm(True)  # streamed: never echoed
    ours = parse({"text_input": "Hello"}, default_max=99)
    assert ours.stream == ReplyForm(False) and ours.params.max_tokens == 99  # our form: our defaults


def test_vllm_form_refusals_name_the_key():
    assert refused(vllm_inputs({"temperature": 0.1}), {"temperature": 0.2}) == (
        "'temperature' is 0.1 in sampling_parameters but 0.2 in the request parameters; send it once")
    assert "sent both" in refused({**vllm_inputs({"max_tokens": 3}), "max_tokens": i32(3)})
    message = refused(vllm_inputs({"lora_name": "x", "max_tokens": 3}))
    assert message.startswith("unknown sampling_parameters key 'lora_name'; known: ")
    assert "'stream'" in refused(vllm_inputs({"stream": True}))
    assert "not valid JSON" in refused({"text_input": "a", "sampling_parameters": "{max_tokens: 3}"})
    assert "must be a JSON object, got list" in refused({"text_input": "a", "sampling_parameters": "[3]"})
    assert "one JSON string" in refused({"text_input": "a", "sampling_parameters": ["{}", "{}"]})
    assert "'temperature' = 'hot' is not a number" in refused(vllm_inputs({"temperature": "hot"}))
    assert refused(vllm_inputs({"top_k": -2})) == "parameter 'top_k' must be in [0, 2**31 - 1], got -2"
    assert refused({"text_input": "a", "top_k": i32(-1)}) == "input 'top_k' must be in [0, 2**31 - 1], got -1"
    for name in ("sampling_parameters", "exclude_input_in_output", "return_finish_reason"):
        assert f"{name!r} must be sent as an input tensor" in refused({"text_input": "a"}, {name: "1"})


def test_exclude_input_in_output_false_needs_one_reply_and_text():
    message = refused(vllm_inputs({}, stream=True, exclude_input_in_output=False))
    assert "exclude_input_in_output = false is not allowed with stream = true" in message
    message = refused({"input_ids": i32(1, 2), "exclude_input_in_output": b(False)})
    assert "needs the prompt as text_input" in message
    assert parse(vllm_inputs({}, return_logprobs=False)).params.logprobs is None


def test_return_logprobs_asks_the_engine_for_logprobs():
    p = parse(vllm_inputs({"logprobs": 3}, exclude_input_in_output=True, return_logprobs=True))
    assert p.params.logprobs == 3 and p.stream.logprobs
    q = parse(vllm_inputs({"logprobs": None}, exclude_input_in_output=True, return_cumulative_logprob=True))
    assert q.params.logprobs == 0 and q.stream.cumulative_logprob  # the chosen tokens' only
    assert parse({"text_input": "a"}, {"logprobs": 5}).params.logprobs == 5
    assert "parameter 'logprobs' must be in [0, 20], got 21" in refused({"text_input": "a"}, {"logprobs": 21})


def test_vllm_keys_without_a_sampler_are_accepted_only_when_neutral():
    neutral = {"n": 1, "best_of": None, "logprobs": None, "prompt_logprobs": None,
               "include_stop_str_in_output": False}
    p = parse(vllm_inputs({**neutral, "max_tokens": 4, "stop": ["x"]}))
    assert (p.params.max_tokens, p.params.stop, p.params.ignore_eos) == (4, ("x",), False)
    assert "'include_stop_str_in_output' = True" in refused(vllm_inputs({"include_stop_str_in_output": True}))


def test_vllm_penalties_and_filters_are_parsed_with_their_ranges():
    p = parse(vllm_inputs({"max_tokens": 6, "repetition_penalty": "1.3", "presence_penalty": 0.5,
                           "frequency_penalty": -1, "min_p": 0.05, "min_tokens": 3, "stop_token_ids": [7, 9],
                           "logit_bias": {"5": -100, "11": 2.5}}))
    s = p.params
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.min_p, s.min_tokens) == (
        1.3, 0.5, -1.0, 0.05, 3)
    assert s.stop_token_ids == (7, 9) and s.logit_bias == ((5, -100.0), (11, 2.5))
    # the same as request parameters (lists as JSON text) and as input tensors
    q = parse({"text_input": "a", "min_tokens": i32(2), "stop_token_ids": i32(3, 4), "min_p": f32(0.5)},
              {"logit_bias": '{"5": 1}', "presence_penalty": "2"})
    assert (q.params.min_tokens, q.params.stop_token_ids, q.params.min_p) == (2, (3, 4), 0.5)
    assert (q.params.logit_bias, q.params.presence_penalty) == (((5, 1.0),), 2.0)
    assert refused(vllm_inputs({"presence_penalty": 2.5})) == (
        "parameter 'presence_penalty' must be in [-2, 2], got 2.5")
    assert refused(vllm_inputs({"repetition_penalty": 0})) == (
        "parameter 'repetition_penalty' must be in (0, 3.4e38], got 0.0")
    assert "parameter 'min_p' must be in [0, 1]" in refused(vllm_inputs({"min_p": 1.5}))
    assert "min_tokens (9) must be <= max_tokens (5)" in refused(vllm_inputs({"max_tokens": 5, "min_tokens": 9}))
    assert "parameter 'logit_bias'[5] must be a number in [-100, 100]" in refused(
        vllm_inputs({"logit_bias": {"5": 101}}))
    assert "parameter 'stop_token_ids'[1] must be a token id" in refused(vllm_inputs({"stop_token_ids": [1, -3]}))
    assert "parameter 'logit_bias' key 'x' must be a token id" in refused(vllm_inputs({"logit_bias": {"x": 1}}))


@pytest.mark.parametrize("name", ["top_k", "max_tokens", "min_tokens"])
@pytest.mark.parametrize("value", [1e20, 2**31, 10**30, "100000000000000000000"])
def test_int32_settings_out_of_range_name_the_setting_on_every_contract(name, value):
    """issue 21 item 4: top_k = 1e20 failed every request of the instance in the engine step."""
    want = f"parameter {name!r} must be in ["
    assert want in refused({"text_input": "a"}, {name: value})
    assert want in refused(vllm_inputs({name: value}))
    if not isinstance(value, str):
        message = refused({"text_input": "a", name: np.array([min(int(value), 2**63 - 1)], dtype=np.int64)})
        assert message.startswith(f"input {name!r} must be in [") and "-2147483648" not in message


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty"])
def test_float_settings_beyond_float32_are_refused(name):
    assert f"parameter {name!r} must be in [" in refused({"text_input": "a"}, {name: 1e39}) \
        or f"parameter {name!r} must be in (" in refused({"text_input": "a"}, {name: 1e39})


def test_deeply_nested_json_is_a_bad_request_naming_the_field():
    """issue 21 item 3: 100k levels answered "internal error ... RecursionError"."""
    deep = '{"stop": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert refused({"text_input": "a", "sampling_parameters": deep}) == (
        "input 'sampling_parameters' is nested deeper than 16 levels")
    shallow_but_over = '{"stop": ' + "[" * 20 + "]" * 20 + "}"
    assert "nested deeper than 16 levels" in refused({"text_input": "a", "sampling_parameters": shallow_but_over})
    message = refused({"text_input": "a"}, {"logit_bias": "[" * 50_000 + "]" * 50_000})
    assert message == "parameter 'logit_bias' is nested deeper than 16 levels"


def reply_tensors(response) -> dict:
    return {t.name: t.as_numpy().tolist() for t in response.output_tensors}


def test_reply_channel_vllm_outputs_one_reply():
    form = parse(vllm_inputs({}, exclude_input_in_output=False, return_finish_reason=True,
                             return_num_input_tokens=True, return_num_output_tokens=True)).stream
    sender = pb.Sender()
    channel = ReplyChannel(pb, sender, form)
    channel(TurnOutput(" wor", [1, 2]))
    channel(TurnOutput("ld", [3], True, "eos", cached_tokens=0, prompt_tokens=6))
    (response, flags), = sender.sent
    assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert reply_tensors(response) == {
        "text_output": [b"Hello world"], "output_ids": [1, 2, 3], "finish_reason": [b"stop"],
        "cached_tokens": [0], "prompt_tokens": [6], "num_input_tokens": [6], "num_output_tokens": [3]}
    assert response.output_tensors[-1].as_numpy().dtype == np.uint32


def test_a_reply_holds_only_the_outputs_the_request_asked_for():
    """vLLM's samples/client.py asks for text_output alone. Triton 2.51's stub removes the other
    outputs itself with the GIL released; on the GPU machine (Python 3.12) the stub died on
    that request (bench/results/gpu_check.md): the response must not hold them at all."""
    sent = {}
    for stream, asked in ((False, ["text_output"]), (True, ["output_ids", "finish_reason"])):
        flags = {"stream": stream} if stream else {"stream": False, "exclude_input_in_output": False}
        form = parse(vllm_inputs({}, return_finish_reason=True, **flags), outputs=asked).stream
        sender = pb.Sender()
        channel = ReplyChannel(pb, sender, form)
        channel(TurnOutput(" wor", [1, 2]))
        channel(TurnOutput("ld", [3], True, "length", cached_tokens=0, prompt_tokens=6))
        sent[stream] = [reply_tensors(r) for r, _ in sender.sent]
    assert sent[False] == [{"text_output": [b"Hello world"]}]
    assert sent[True] == [{"output_ids": [1, 2], "finish_reason": [b"None"]},
                          {"output_ids": [3], "finish_reason": [b"length"]}]
    # a request that names no output (Triton then asks for all): every output, as before
    form = parse(vllm_inputs({}, stream=False)).stream
    sender = pb.Sender()
    ReplyChannel(pb, sender, form)(TurnOutput("x", [9], True, "length", cached_tokens=0, prompt_tokens=6))
    assert set(reply_tensors(sender.sent[0][0])) == {"text_output", "output_ids", "finish_reason",
                                                     "cached_tokens", "prompt_tokens"}


def test_reply_channel_vllm_outputs_streamed():
    form = parse(vllm_inputs({}, stream=True, return_finish_reason=True, return_num_output_tokens=True)).stream
    sender = pb.Sender()
    channel = ReplyChannel(pb, sender, form)
    channel(TurnOutput("a", [1]))
    channel(TurnOutput("bc", [2, 3]))
    channel(TurnOutput("d", [4], True, "length", prompt_tokens=2))
    sent = [reply_tensors(r) for r, _ in sender.sent]
    assert [s["finish_reason"] for s in sent] == [[b"None"], [b"None"], [b"length"]]
    assert [s["num_output_tokens"] for s in sent] == [[1], [2], [1]]
    assert [s["text_output"] for s in sent] == [[b"a"], [b"bc"], [b"d"]]
    assert "num_input_tokens" not in sent[0]  # not asked for
    assert [f for _, f in sender.sent] == [0, 0, pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL]
    # our own form: finish_reason (our words) and counts on the last response only
    sender = pb.Sender()
    channel = ReplyChannel(pb, sender, True)
    channel(TurnOutput("a", [1]))
    channel(TurnOutput("d", [4], True, "eos", prompt_tokens=2))
    first, last = [reply_tensors(r) for r, _ in sender.sent]
    assert set(first) == {"text_output", "output_ids"}
    assert last["finish_reason"] == [b"eos"] and last["prompt_tokens"] == [2]


def test_reply_channel_logprobs_outputs_in_vllms_format():
    from tritonkv.sampling.logprobs import TokenLogprob

    form = parse(vllm_inputs({"logprobs": 1}, exclude_input_in_output=True, return_logprobs=True,
                             return_cumulative_logprob=True)).stream
    sender = pb.Sender()
    channel = ReplyChannel(pb, sender, form)
    first = TokenLogprob(5, -0.5, 1, [(5, -0.5)], {5: "a"})
    second = TokenLogprob(7, -2.0, 2, [(9, -0.25)], {7: "b", 9: "c"})
    channel(TurnOutput("a", [5], logprobs=[first]))
    channel(TurnOutput("b", [7], True, "length", logprobs=[second]))
    (response, _), = sender.sent
    out = reply_tensors(response)
    assert json.loads(out["logprobs"][0]) == [
        {"5": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}},
        {"7": {"logprob": -2.0, "rank": 2, "decoded_token": "b"}, "9": {"logprob": -0.25, "rank": 1,
                                                                       "decoded_token": "c"}}]
    assert out["cumulative_logprob"] == [-2.5]


def test_n_and_best_of_are_parsed_and_refused_where_they_mean_nothing():
    p = parse(vllm_inputs({"n": "3", "best_of": 5}))
    assert (p.params.n, p.params.best_of, p.stream.choices) == (3, 5, 3)
    assert parse({"text_input": "a"}, {"n": 2}).params.n == 2
    assert refused(vllm_inputs({"n": 3, "best_of": 2})) == "best_of (2) must be >= n (3)"
    assert refused(vllm_inputs({"n": 65})) == "parameter 'n' must be in [1, 64], got 65"
    assert "cannot be streamed" in refused(vllm_inputs({"n": 2, "best_of": 3}, stream=True))
    assert parse(vllm_inputs({"n": 2}, stream=True)).params.n == 2  # n alone streams
    message = refused({"text_input": "a"}, {"n": 2}, stateless=False, flags=1, corr_id=7)
    assert "for one-shot requests (llm_stateless)" in message


def test_choices_channel_sends_one_element_per_choice():
    from tritonkv.server.triton_choices import reply_channel

    form = parse(vllm_inputs({"n": 2}, exclude_input_in_output=False, return_num_output_tokens=True)).stream
    sender = pb.Sender()
    channel = reply_channel(pb, sender, form)
    channel(TurnOutput(" a", [4, 5], index=1))
    channel(TurnOutput(" b", [6], finish_reason="eos", index=0))
    channel(TurnOutput("c", [7], True, "length", index=1, prompt_tokens=3))
    (response, flags), = sender.sent
    assert flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    out = reply_tensors(response)
    assert out["text_output"] == [b"Hello b", b"Hello ac"]  # the prompt echoed before each choice
    assert out["output_ids"] == [6, 4, 5, 7] and out["num_output_tokens"] == [1, 3]
    assert out["finish_reason"] == [b"eos", b"length"] and out["prompt_tokens"] == [3]
    # streamed: one response per output, only its choice's element filled; reasons at the end
    sender = pb.Sender()
    channel = reply_channel(pb, sender, parse(vllm_inputs({"n": 2}, stream=True)).stream)
    channel(TurnOutput("x", [4], index=1))
    channel(TurnOutput("y", [6], finish_reason="length", index=0))
    channel(TurnOutput("", [], True, "eos", index=1))
    sent = [reply_tensors(r) for r, _ in sender.sent]
    assert [s["text_output"] for s in sent] == [[b"", b"x"], [b"y", b""], [b"", b""]]
    assert [s["num_output_tokens"] for s in sent] == [[0, 1], [1, 0], [0, 0]]
    assert "finish_reason" not in sent[0] and sent[-1]["finish_reason"] == [b"length", b"eos"]
    assert [f for _, f in sender.sent] == [0, 0, pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL]
