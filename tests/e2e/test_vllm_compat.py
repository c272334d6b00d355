"""Clients of Triton's vLLM backend, unchanged, against ``llm_stateless`` (issue 15 item 7).

Requests are built the way triton-inference-server/vllm_backend's samples/client.py,
its docs (additional outputs) and genai-perf's ``--backend vllm`` payloads build them:
``text_input`` + ``stream`` + a ``sampling_parameters`` JSON string (string values) +
``exclude_input_in_output`` + the ``return_*`` flags. Greedy tokens must equal those of our own
form and HF's; the extra outputs must hold the right values.
"""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from tiny_models import hf_greedy
from triton_calls import StreamClient, http_generate, http_post, wait_for_pool_baseline
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint


PROMPT = "Hello"
PROMPT_IDS = [256] + list(b"Hello")  # the demo tokenizer: BOS + one token per byte
N = 8
GREEDY_JSON = {"max_tokens": str(N), "temperature": "0", "ignore_eos": True}
ALL_FLAGS = dict(return_finish_reason=True, return_num_input_tokens=True, return_num_output_tokens=True)


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server  # the session's shared server (shared_server.py)


@pytest.fixture(scope="module")
def hf_run():
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(ensure_demo_checkpoint(), dtype=torch.float32).eval()
    return hf_greedy(hf, PROMPT_IDS, N)


@pytest.fixture(scope="module")
def expected(hf_run):
    return hf_run[0]


@pytest.fixture(scope="module")
def ours(server, expected):
    """Our own form, streamed over gRPC: the tokens and text to compare with."""
    client = StreamClient(server.grpc_url, "llm_stateless")
    try:
        t = client.turn(text=PROMPT, max_tokens=N, temperature=0.0, ignore_eos=True, stream=True)
    finally:
        client.close()
    assert t.error is None and t.ids == expected
    return t


def vllm_inputs(sampling: dict, stream: bool, exclude_input_in_output: bool | None = None, **flags):
    """The tensors of vLLM's samples/client.py ``create_request`` (plus the return_* flags)."""
    tensors = []

    def add(name, arr, dtype):
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)

    add("text_input", np.array([PROMPT.encode("utf-8")], dtype=np.object_), "BYTES")
    add("stream", np.array([stream], dtype=bool), "BOOL")
    add("sampling_parameters", np.array([json.dumps(sampling).encode("utf-8")], dtype=np.object_), "BYTES")
    if exclude_input_in_output is not None:
        add("exclude_input_in_output", np.array([exclude_input_in_output], dtype=bool), "BOOL")
    for name, value in flags.items():
        add(name, np.array([value], dtype=bool), "BOOL")
    return tensors


def grpc_responses(url: str, inputs, parameters=None, outputs=None) -> list[dict]:
    """Every response of one request on a gRPC stream, as {output name: numpy array}; the
    stream's final flag (not an output) ends it."""
    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model_name="llm_stateless", inputs=inputs, parameters=parameters,
                                  outputs=outputs, enable_empty_final_response=True, request_id="7")
        responses = []
        while True:
            try:
                result, error = results.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"no response for 60 s after {len(responses)} responses (and no final flag)")
            assert error is None, str(error)
            response = result.get_response()
            named = {o.name: result.as_numpy(o.name) for o in response.outputs}
            if named:
                assert response.id == "7"
                responses.append(named)
            if response.parameters["triton_final_response"].bool_param:
                return responses
    finally:
        # cancel what is still running: a request the server never finishes must not hang
        # the test in stop_stream (a GPU run waited there 300 s)
        client.stop_stream(cancel_requests=True)
        client.close()


def text(arr) -> str:
    return arr.reshape(-1)[0].decode("utf-8")


def test_grpc_streaming_vllm_form_matches_our_form(server, ours, expected):
    responses = grpc_responses(server.grpc_url, vllm_inputs(GREEDY_JSON, True, True, **ALL_FLAGS))
    ids = [i for r in responses for i in r["output_ids"].tolist()]
    assert ids == expected and "".join(text(r["text_output"]) for r in responses) == ours.text
    # vLLM's additional outputs, on every response: finish reason in vLLM's words ("None"
    # until the last), the tokens of this response; the prompt's size where known (the last)
    assert [text(r["finish_reason"]) for r in responses] == ["None"] * (len(responses) - 1) + ["length"]
    assert [r["num_output_tokens"].tolist() for r in responses] == [[len(r["output_ids"])] for r in responses]
    assert all(r["num_output_tokens"].dtype == np.uint32 for r in responses)
    assert responses[-1]["num_input_tokens"].tolist() == [len(PROMPT_IDS)]
    assert all(r["num_input_tokens"].tolist() == [len(PROMPT_IDS)] for r in responses if "num_input_tokens" in r)


def test_vllm_sample_client_request_one_reply_echoes_the_prompt(server, ours, expected):
    # samples/client.py, not streaming: parameters both as the tensor and as request
    # parameters (string values), exclude_input_in_output false, only text_output requested
    sampling = {"temperature": "0", "top_p": "0.95", "max_tokens": str(N), "ignore_eos": "true"}
    responses = grpc_responses(server.grpc_url, vllm_inputs(sampling, False, False), parameters=sampling,
                               outputs=[grpcclient.InferRequestedOutput("text_output")])
    assert len(responses) == 1
    assert set(responses[0]) == {"text_output"}
    assert text(responses[0]["text_output"]) == PROMPT + ours.text


def test_return_logprobs_and_cumulative_logprob_equal_hf(server, hf_run):
    """issue 24 item 2: vLLM's ``logprobs`` output (JSON per response) and ``cumulative_logprob``."""
    tokens, logits = hf_run
    sampling = {**GREEDY_JSON, "logprobs": 2}
    responses = grpc_responses(server.grpc_url, vllm_inputs(sampling, True, True, return_logprobs=True,
                                                            return_cumulative_logprob=True))
    entries = [e for r in responses for e in json.loads(text(r["logprobs"]))]
    assert [int(next(iter(e))) for e in entries] == tokens  # the chosen token first
    ref = [torch.log_softmax(x, -1) for x in logits]
    chosen = [e[str(t)]["logprob"] for e, t in zip(entries, tokens)]
    assert max(abs(c - float(r[t])) for c, r, t in zip(chosen, ref, tokens)) < 1e-4
    assert all(e[str(t)]["rank"] == 1 and len(e) == 2 for e, t in zip(entries, tokens))  # greedy: top 2
    assert abs(float(responses[-1]["cumulative_logprob"][0]) - sum(chosen)) < 1e-3


def test_vllm_defaults_echo_the_prompt_and_stop_at_16_tokens(server):
    """issue 22 item 10: a vLLM-form request without exclude_input_in_output / max_tokens."""
    responses = grpc_responses(server.grpc_url, vllm_inputs({"temperature": "0", "ignore_eos": True}, False))
    assert len(responses) == 1 and len(responses[0]["output_ids"]) == 16
    assert text(responses[0]["text_output"]).startswith(PROMPT)


def test_genai_perf_vllm_payload_runs_to_max_tokens(server, expected):
    # genai-perf --backend vllm with a deterministic output length: exclude_input_in_output
    # true, max_tokens = min_tokens (no ignore_eos): every turn runs to max_tokens
    sampling = {"max_tokens": str(N), "min_tokens": str(N), "temperature": "0"}
    responses = grpc_responses(server.grpc_url, vllm_inputs(sampling, True, True, return_num_output_tokens=True))
    assert [i for r in responses for i in r["output_ids"].tolist()] == expected
    assert sum(int(r["num_output_tokens"][0]) for r in responses) == N


def test_http_generate_vllm_form(server, ours, expected):
    body = {"text_input": PROMPT, "sampling_parameters": json.dumps(GREEDY_JSON), "exclude_input_in_output": False,
            **ALL_FLAGS}
    code, reply = http_generate(server.http_url, "llm_stateless", body)
    assert code == 200, reply
    assert reply["output_ids"] == expected and reply["text_output"] == PROMPT + ours.text
    assert (reply["finish_reason"], reply["num_input_tokens"], reply["num_output_tokens"]) == (
        "length", len(PROMPT_IDS), N)
    # the vLLM backend README's curl: settings as nested parameters (Triton makes them inputs)
    code, reply = http_generate(server.http_url, "llm_stateless",
                                {"text_input": PROMPT, "parameters": {"stream": False, "temperature": 0,
                                                                      "max_tokens": N, "ignore_eos": True}})
    assert code == 200 and reply["output_ids"] == expected and reply["text_output"] == ours.text
    # streamed events: the same tokens, one event per response
    body.update(stream=True, exclude_input_in_output=True)
    code, events = http_generate(server.http_url, "llm_stateless", body, stream=True)
    assert code == 200
    ids = [i for e in events for i in (e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]])]
    assert ids == expected and "".join(e["text_output"] for e in events) == ours.text
    assert [e["finish_reason"] for e in events] == ["None"] * (len(events) - 1) + ["length"]
    assert sum(e["num_output_tokens"] for e in events) == N


@pytest.mark.parametrize("body, message", [
    ({"sampling_parameters": json.dumps({"lora_name": "x"})}, "unknown sampling_parameters key 'lora_name'"),
    ({"sampling_parameters": json.dumps({"n": "2", "best_of": "1"})}, "best_of (1) must be >= n (2)"),
    ({"sampling_parameters": json.dumps({"presence_penalty": "2.5"})},
     "parameter 'presence_penalty' must be in [-2, 2], got 2.5"),
    ({"sampling_parameters": json.dumps({"top_k": 1e20})}, "parameter 'top_k' must be in [0, 2**31 - 1]"),
    ({"sampling_parameters": json.dumps({"max_tokens": "4", "min_tokens": "5"})},
     "min_tokens (5) must be <= max_tokens (4)"),
    ({"sampling_parameters": '{"stop": ' + "[" * 100_000 + "]" * 100_000 + "}"},
     "input 'sampling_parameters' is nested deeper than 16 levels"),
    ({"sampling_parameters": "{not json"}, "input 'sampling_parameters' is not valid JSON"),
    ({"exclude_input_in_output": False, "stream": True},
     "exclude_input_in_output = false is not allowed with stream = true"),
    ({"sampling_parameters": json.dumps({"logprobs": 21})}, "parameter 'logprobs' must be in [0, 20], got 21"),
])
def test_vllm_form_refusals_are_400_naming_the_key(server, body, message):
    code, error, _ = http_post(server.http_url, "llm_stateless", json.dumps({"text_input": PROMPT, **body}).encode(),
                               stream=body.get("stream", False))
    assert code == 400 and message in error


def test_pool_back_to_baseline(server):
    assert wait_for_pool_baseline(server.metrics_url, timeout=15)


SAMPLED_JSON = {"max_tokens": str(N), "temperature": "0.8", "ignore_eos": True}


def test_n_choices_in_the_vllm_backends_shape_equal_requests_sent_alone(server):
    """n = 2 with seed s: text_output holds one element per choice; choice i equals the
    request sent alone with seed s + i (engine/sample_group.py); streamed, each response
    carries one choice's delta. The pool returns to its baseline."""
    def sent_alone(seed):
        (reply,) = grpc_responses(server.grpc_url, vllm_inputs({**SAMPLED_JSON, "seed": seed}, False, True))
        return reply["output_ids"].tolist(), text(reply["text_output"])

    # the first seed s from 41 whose s and s + 1 draw differently (the demo model is peaked:
    # two seeds often draw the same tokens, and which do depends on the device's generator)
    alone = [sent_alone(41)]
    for s in range(41, 71):
        alone = [alone[-1], sent_alone(s + 1)]  # seed s's answer carried over, not asked again
        if alone[0][0] != alone[1][0]:
            break
    else:
        pytest.fail("seeds 41 to 71 all drew the same tokens as the next seed")
    (reply,) = grpc_responses(server.grpc_url, vllm_inputs({**SAMPLED_JSON, "seed": s, "n": 2}, False, True,
                                                           return_finish_reason=True))
    assert [t.decode() for t in reply["text_output"]] == [alone[0][1], alone[1][1]]
    assert reply["num_output_tokens"].tolist() == [N, N]
    assert reply["output_ids"].tolist() == alone[0][0] + alone[1][0]
    assert [t.decode() for t in reply["finish_reason"]] == ["length", "length"]
    streamed = grpc_responses(server.grpc_url, vllm_inputs({**SAMPLED_JSON, "seed": s, "n": "2"}, True, True))
    per_choice = [[], []]
    for r in streamed:
        counts, ids = r["num_output_tokens"].tolist(), r["output_ids"].tolist()
        assert len(r["text_output"]) == 2 and sum(c > 0 for c in counts) <= 1  # one choice per response
        per_choice[0] += ids[:counts[0]]
        per_choice[1] += ids[counts[0]:]
    assert per_choice == [alone[0][0], alone[1][0]]
    assert [t.decode() for t in streamed[-1]["finish_reason"]] == ["length", "length"]
    assert wait_for_pool_baseline(server.metrics_url)
