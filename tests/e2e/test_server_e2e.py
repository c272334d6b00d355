"""A real tritonserver started by the launcher, driven with tritonclient (gRPC stream + HTTP)."""

import threading
import time

import pytest
import torch

from tiny_models import hf_greedy
from triton_calls import StreamClient, http_generate, http_post, inputs_for, metric_values, wait_for_pool_baseline
from polling import wait_until
from shared_server import MAX_MODEL_LEN
from tritonkv_client.first_token_stages import read_stages, stage_means

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server  # the session's shared server (shared_server.py)


@pytest.fixture
def stream(server):
    client = StreamClient(server.grpc_url)
    yield client
    client.close()


def wait_for_baseline(server, timeout=10.0, hold=1.2):
    return wait_for_pool_baseline(server.metrics_url, timeout, hold)


def test_three_turn_conversation_reuses_kv_and_matches_full_recompute(stream, hf_demo):
    history = []
    turns = [[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [32, 65, 103, 97, 105, 110], [63, 33]]
    for i, new in enumerate(turns):
        t = stream.turn(seq_id=4242, start=i == 0, end=i == 2, ids=new, max_tokens=8, **GREEDY)
        assert t.error is None
        expected, _ = hf_greedy(hf_demo, history + new, 8)
        assert t.ids == expected, f"turn {i + 1}"
        # streamed: one response per token, fewer when the server's sender fell behind and
        # coalesced (server/response_streamer.py); the ids above are complete and in order
        assert 1 <= t.num_responses <= 8
        assert t.finish_reason == "length"
        assert t.cached_tokens == (0 if i == 0 else len(history) - 1)
        history += new + t.ids


def test_http_generate_text_matches_grpc_and_hf(server, stream, hf_demo):
    code, body = http_generate(server.http_url, "llm_stateless",
                               {"text_input": "Hello", "max_tokens": 6, **GREEDY})
    assert code == 200, body
    expected, _ = hf_greedy(hf_demo, [256] + list(b"Hello"), 6)
    assert body["output_ids"] == expected
    assert body["finish_reason"] == "length" and body["prompt_tokens"] == 6
    grpc = StreamClient(server.grpc_url, "llm_stateless")
    try:
        t = grpc.turn(text="Hello", max_tokens=6, **GREEDY)
    finally:
        grpc.close()
    assert t.ids == expected and t.num_responses == 1  # stateless default: one whole reply
    assert t.text == body["text_output"]


def test_http_generate_stream_sends_one_event_per_token(server, hf_demo):
    n = 32
    code, events = http_generate(server.http_url, "llm_stateless",
                                 {"text_input": "Hi", "max_tokens": n, "stream": True, **GREEDY}, stream=True)
    assert code == 200
    # Triton's JSON writes a one-element output_ids as a bare number
    ids = [i for e in events for i in ([e["output_ids"]] if isinstance(e["output_ids"], int) else e["output_ids"])]
    assert ids == hf_greedy(hf_demo, [256] + list(b"Hi"), n)[0]
    # one event per token; the sender coalesces only the tokens waiting when it falls behind
    # (server/response_streamer.py), a few at most on a busy machine: a server that sent the
    # answer in one piece, or in chunks, fails here
    assert len(events) >= n // 2, [len(e["text_output"]) for e in events]
    assert events[-1]["finish_reason"] == "length"
    assert all(e.get("finish_reason") in (None, "") for e in events[:-1])


def test_refused_http_requests_are_400_naming_what_is_wrong(server):
    cases = {
        b'{"max_tokens": 2}': "no prompt: send text_input or input_ids",
        b'{"text_input": "Hi", "temperature": -0.5}': "input 'temperature' must be in [0, 3.4e38], got -0.5",
        b'{"text_input": "Hi", "top_p": 1.5}': "input 'top_p' must be in (0, 1], got 1.5",
        b'{"text_input": "Hi", "top_k": -1}': "input 'top_k' must be in [0, 2**31 - 1], got -1",
    }
    for body, expected in cases.items():
        for endpoint_streams in (False, True):
            code, message, _ = http_post(server.http_url, "llm_stateless", body, stream=endpoint_streams)
            assert (code, message) == (400, expected), body


def test_stream_true_on_generate_is_triton_s_200_error(server):
    # Triton 2.51's /generate starts its reply (status included) at the model's first
    # response and counts responses only at the end: a streamed request there answers HTTP 200
    # with this error body. The model cannot tell /generate from /generate_stream (the same
    # request reaches it), so it cannot refuse earlier; docs/client.md says so.
    code, message, _ = http_post(server.http_url, "llm_stateless",
                                 b'{"text_input": "Hi", "max_tokens": 3, "stream": true}')
    assert (code, message) == (200, "generate expects model to produce exactly 1 response, use generate stream "
                                     "for model that generates various number of responses")
    assert wait_for_baseline(server)


def test_stop_string_and_seeded_sampling(server):
    sampled = [http_generate(server.http_url, "llm_stateless",
                             {"text_input": "abc", "max_tokens": 12, "temperature": 1.0, "seed": 7,
                              "ignore_eos": True})[1]["output_ids"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same tokens
    full = http_generate(server.http_url, "llm_stateless",
                         {"text_input": "abc", "max_tokens": 12, **GREEDY})[1]
    stop = full["text_output"][3:5]
    code, cut = http_generate(server.http_url, "llm_stateless",
                              {"text_input": "abc", "max_tokens": 12, "stop": [stop], **GREEDY})
    assert code == 200 and cut["finish_reason"] == "stop"
    assert cut["text_output"] == full["text_output"][:full["text_output"].index(stop)]


def test_bad_input_gets_clear_errors_and_loses_no_block(server, stream):
    errors = {
        "empty prompt": stream.turn(seq_id=7001, start=True, end=True, text=""),
        "outside the vocabulary": stream.turn(seq_id=7002, start=True, end=True, ids=[256, 999]),
        "'max_tokens' must be in [1, 2**31 - 1], got 0": stream.turn(seq_id=7003, start=True, end=True, ids=[65], max_tokens=0),
        "exceeds the context limit": stream.turn(seq_id=7004, start=True, end=True, ids=[65], max_tokens=10**6),
        f"at most {MAX_MODEL_LEN}": stream.turn(seq_id=7005, start=True, end=True, ids=[65] * (MAX_MODEL_LEN + 88)),
        "START": stream.turn(seq_id=7006, ids=[65], max_tokens=2),  # said by the sequence batcher
        "not both": stream.turn(seq_id=7007, start=True, end=True, text="a", ids=[65]),
    }
    for expected, turn in errors.items():
        assert turn.error is not None and expected in turn.error, (expected, turn.error)
    first = stream.turn(seq_id=7008, start=True, ids=[65, 66, 67], max_tokens=3, **GREEDY)
    assert first.error is None
    again = stream.turn(seq_id=7008, start=True, ids=[65], max_tokens=3, **GREEDY)
    assert "already live" in again.error
    closed = stream.turn(seq_id=7008, end=True)  # END alone closes the conversation
    assert closed.error is None and closed.finish_reason == "closed"
    ok = stream.turn(seq_id=7009, start=True, end=True, ids=[65, 66], max_tokens=4, **GREEDY)
    assert ok.error is None and len(ok.ids) == 4  # still serving
    assert wait_for_baseline(server)


def test_concurrent_conversations_match_hf(server, hf_demo):
    prompts = [[256] + list(range(40 + i, 40 + i + 5 + 7 * i)) for i in range(4)]
    results = {}

    def converse(i):
        client = StreamClient(server.grpc_url)
        try:
            results[i] = client.turn(seq_id=9000 + i, start=True, end=True, ids=prompts[i], max_tokens=10, **GREEDY)
        finally:
            client.close()

    threads = [threading.Thread(target=converse, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(prompts):
        assert results[i].ids == hf_greedy(hf_demo, p, 10)[0]
    assert wait_for_baseline(server)


def test_metrics_report_the_pool(server):
    total = metric_values(server.metrics_url, "tritonkv_kv_blocks_total")
    assert total and all(v > 0 for v in total)
    free = metric_values(server.metrics_url, "tritonkv_kv_blocks_free")
    cached = metric_values(server.metrics_url, "tritonkv_kv_blocks_cached")
    used = metric_values(server.metrics_url, "tritonkv_kv_blocks_used")
    assert [f + c + u for f, c, u in zip(free, cached, used)] == total


def test_first_token_stages_are_published_and_fit_inside_each_clients_wait(server):
    before = read_stages(server.metrics_url)
    client = StreamClient(server.grpc_url)
    waits = []
    try:
        for i in range(3):  # streamed (llm's default): the first response goes out before the end
            t0 = time.monotonic()
            turn = client.turn(seq_id=7100 + i, start=True, end=True, ids=[256, 80 + i, 81], max_tokens=2, **GREEDY)
            waits.append(time.monotonic() - t0)
            assert turn.error is None and len(turn.ids) == 2
    finally:
        client.close()
    # the gauges go out twice a second
    assert wait_until(lambda: read_stages(server.metrics_url)[1] - before[1] >= 3, 10)
    after = read_stages(server.metrics_url)
    assert after[1] - before[1] == 3
    means = stage_means(before, after)
    assert set(means) == {"admit", "queue", "prefill", "deliver"}
    assert all(v >= 0 for v in means.values()) and means["prefill"] > 0, means
    # every stage lies between the frontend taking the request and its first response: inside
    # what the client waited for the whole turn
    assert sum(means.values()) <= 1e3 * sum(waits) / 3


def test_string_conversation_ids_work(stream, hf_demo):
    first = stream.turn(seq_id="conv-α-1", start=True, ids=[256, 65, 66, 67], max_tokens=4, **GREEDY)
    assert first.error is None
    second = stream.turn(seq_id="conv-α-1", end=True, ids=[68, 69], max_tokens=4, **GREEDY)
    history = [256, 65, 66, 67] + first.ids + [68, 69]
    assert second.ids == hf_greedy(hf_demo, history, 4)[0]
    assert second.cached_tokens == 4 + 4 - 1


def test_client_cancel_releases_the_conversation(server):
    client = StreamClient(server.grpc_url)
    client.client.async_stream_infer(model_name="llm", inputs=inputs_for(ids=[256, 70, 71], max_tokens=400, **GREEDY),
                                     sequence_id=5151, sequence_start=True, enable_empty_final_response=True)
    result, error = client.results.get(timeout=60)  # generation is under way
    assert error is None and len(result.as_numpy("output_ids")) == 1
    client.client.stop_stream(cancel_requests=True)
    client.client.close()
    assert wait_for_baseline(server, timeout=20)
    # the cancelled conversation is gone: a new START with the same id is accepted
    fresh = StreamClient(server.grpc_url)
    try:
        t = fresh.turn(seq_id=5151, start=True, end=True, ids=[256, 70], max_tokens=2, **GREEDY)
    finally:
        fresh.close()
    assert t.error is None and len(t.ids) == 2


def test_server_log_and_gauges_state_what_tritonkv_capacity_prints(server, capsys):
    from tritonkv.server.cli import main as cli

    logged = {line.split("KV capacity: ", 1)[1] for line in server.log().splitlines() if "KV capacity: " in line}
    assert cli(["capacity", "--param", f"max_model_len={MAX_MODEL_LEN}", "--param", "kv_cache_memory_mb=64"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith("the server logs: KV capacity: ")
    assert logged == {printed.removeprefix("the server logs: KV capacity: ")}  # every instance alike
    per_token = set(metric_values(server.metrics_url, "tritonkv_kv_bytes_per_token"))
    assert per_token == {float(printed.split("KV capacity: ")[1].split(" B/token")[0].replace(",", ""))}
    if not torch.cuda.is_available():  # the CPU server runs float32: 2 x 6 layers x 2 KV heads x 64 dims x 4 B
        assert per_token == {6144.0}
