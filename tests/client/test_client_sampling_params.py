"""The client's penalty / filter settings become the server's inputs and parameters."""

import json

import numpy as np

from tritonkv_client.params import GenerationParams, grpc_inputs, request_body, salt_parameters


def test_penalties_and_token_lists_travel_as_tensors_and_logit_bias_as_a_parameter():
    p = GenerationParams().merged(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5,
                                  min_p=0.05, min_tokens=3, stop_token_ids=[7, 8], logit_bias={5: -100, "9": 2})
    tensors = {t.name(): t for t in grpc_inputs("hi", None, p, stream=True)}
    assert {n: (t.datatype(), t.shape()) for n, t in tensors.items()} == {
        "text_input": ("BYTES", [1]), "repetition_penalty": ("FP32", [1]), "presence_penalty": ("FP32", [1]),
        "frequency_penalty": ("FP32", [1]), "min_p": ("FP32", [1]), "min_tokens": ("INT32", [1]),
        "stop_token_ids": ("INT32", [2]), "stream": ("BOOL", [1])}
    assert np.frombuffer(tensors["stop_token_ids"]._get_content(), np.int32).tolist() == [7, 8]
    params = salt_parameters("tenant", p)
    assert params["cache_salt"] == "tenant" and json.loads(params["logit_bias"]) == {"5": -100.0, "9": 2.0}
    assert salt_parameters(None, GenerationParams()) is None
    body = request_body("hi", None, p, stream=False)
    assert body["stop_token_ids"] == [7, 8] and json.loads(body["logit_bias"]) == {"5": -100.0, "9": 2.0}
    assert (body["repetition_penalty"], body["min_tokens"]) == (1.2, 3)


def test_logprobs_output_is_read_into_the_result():
    from tritonkv_client._responses import reply_result

    entry = {"7": {"logprob": -0.5, "rank": 1, "decoded_token": "a"}}
    body = json.dumps({"text_output": "a", "output_ids": 7, "finish_reason": "length", "cached_tokens": 0,
                       "prompt_tokens": 2, "logprobs": json.dumps([entry])})
    result = reply_result(body, "llm_stateless", 200, 0.0, 1.0)
    assert result.token_ids == [7] and result.logprobs == [entry]
    p = GenerationParams().merged(logprobs=3)
    assert salt_parameters(None, p) == {"logprobs": 3}
