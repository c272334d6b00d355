"""Client, load-test and summary logic that needs no server: exact values for fixed inputs."""

import io
import queue
import types

import httpx
import numpy as np
import pytest

import summary
import workload
from tritonkv_client._responses import error_from_response, parse_json_event, parse_json_response, reply_result
from tritonkv_client.chat import stats_line
from tritonkv_client.errors import ProtocolError, ServerError
from tritonkv_client.http_client import HttpStream
from tritonkv_client.grpc_client import Conversation
from tritonkv_client.metrics import PoolSnapshot, parse_prometheus
from tritonkv_client.params import GenerationParams, grpc_inputs, request_arrays, request_body
from tritonkv_client.result import GenerationResult, ResultBuilder


def test_params_merge_and_encode():
    p = GenerationParams(max_tokens=8).merged(temperature=0.0, stop="END", top_k=None)
    assert p == GenerationParams(max_tokens=8, temperature=0.0, stop=("END",))
    assert p.as_json() == {"max_tokens": 8, "temperature": 0.0, "stop": ["END"]}
    arrays = request_arrays(p, stream=True)
    assert sorted(arrays) == ["max_tokens", "stop", "stream", "temperature"]
    assert arrays["max_tokens"][0].dtype == np.int32 and arrays["max_tokens"][1] == "INT32"
    assert arrays["stop"][0].tolist() == [b"END"] and arrays["stream"][0].tolist() == [True]
    with pytest.raises(TypeError, match="max_new_tokens"):
        p.merged(max_new_tokens=3)


def test_grpc_inputs_carry_prompt_and_settings():
    tensors = grpc_inputs(None, [256, 65], GenerationParams(seed=7, ignore_eos=True), stream=None)
    assert [(t.name(), t.datatype(), t.shape()) for t in tensors] == [
        ("input_ids", "INT32", [2]), ("seed", "INT64", [1]), ("ignore_eos", "BOOL", [1])]
    with pytest.raises(ValueError, match="not both"):
        grpc_inputs("a", [1], GenerationParams(), stream=None)


def _response(status, content_type, body: bytes):
    return httpx.Response(status, headers={"content-type": content_type}, content=body)


def test_http_body_and_error_replies():
    assert request_body("hi", None, GenerationParams(max_tokens=4), stream=True) == {
        "text_input": "hi", "max_tokens": 4, "stream": True}
    # generate_stream answers a refused request with one event; generate with a JSON body
    err = error_from_response(_response(400, "text/event-stream; charset=utf-8",
                                        b'data: {"error":"token id 999 is outside the vocabulary"}\n\n'),
                              "llm_stateless")
    assert str(err) == "token id 999 is outside the vocabulary" and err.status == 400
    err = error_from_response(_response(400, "application/json", b'{"error":"no prompt"}'), "llm_stateless")
    assert (str(err), err.status, err.model) == ("no prompt", 400, "llm_stateless")
    assert "HTTP 502" in str(error_from_response(_response(502, "text/html", b"<html>bad gateway</html>"), "m"))


def test_http_stream_reads_events_to_the_final_one():
    events = (b'data: {"text_output":"H","output_ids":72}\n\n: comment\n\n'
              b'data: {"text_output":"i!","output_ids":[105,33],\ndata: "finish_reason":"length",'
              b'"cached_tokens":0,"prompt_tokens":3}\n\n')
    stream = HttpStream(_response(200, "text/event-stream", events), "llm_stateless", sent_at=0.0)
    deltas = list(stream)
    assert [(d.token_ids, d.text) for d in deltas] == [([72], "H"), ([105, 33], "i!")]
    r = stream.result()
    assert (r.token_ids, r.text, r.finish_reason, r.prompt_tokens) == ([72, 105, 33], "Hi!", "length", 3)
    cut = HttpStream(_response(200, "text/event-stream", b'data: {"text_output":"H","output_ids":72}\n\n'),
                     "m", sent_at=0.0)
    with pytest.raises(ProtocolError, match="ended without a final event"):
        cut.result()


def test_json_response_with_bare_number_ids():
    mid = parse_json_response({"text_output": "A", "output_ids": 65})
    assert (mid.ids, mid.text, mid.final) == ([65], "A", False)
    last = parse_json_response({"text_output": "", "output_ids": [], "finish_reason": "length",
                                "cached_tokens": 3, "prompt_tokens": 5})
    assert (last.ids, last.final, last.cached_tokens, last.prompt_tokens) == ([], True, 3, 5)


def test_result_timings():
    b = ResultBuilder(sent_at=10.0)
    b.add_tokens([1], "a", 10.5)       # first token: TTFT 0.5
    b.add_tokens([2, 3], "bc", 10.75)  # two tokens in one response: the second is 0 apart
    b.add_tokens([4], "d", 11.0)
    r = b.finish(11.25, "length", 7, 9)
    assert r.token_ids == [1, 2, 3, 4] and r.text == "abcd"
    assert r.ttft_s == 0.5 and r.inter_token_s == [0.25, 0.0, 0.25]
    assert r.tpot_s == pytest.approx(0.5 / 3) and r.e2e_s == 1.25
    assert r.output_tokens_per_s == pytest.approx(4 / 1.25)
    assert (r.finish_reason, r.cached_tokens, r.prompt_tokens, r.num_responses) == ("length", 7, 9, 3)
    assert "4 tokens" in stats_line(r) and "TTFT 500 ms" in stats_line(r) and "7 context tokens reused" in stats_line(r)


METRICS = """# HELP tritonkv_kv_blocks_used KV blocks referenced by live sequences
# TYPE tritonkv_kv_blocks_used gauge
tritonkv_kv_blocks_used{instance="llm_0_0",model="llm"} 0
tritonkv_kv_blocks_used{instance="llm_stateless_0_0",model="llm_stateless"} 2
tritonkv_live_sequences{instance="llm_0_0",model="llm"} 0
tritonkv_live_sequences{instance="llm_stateless_0_0",model="llm_stateless"} 1
tritonkv_kv_blocks_cached{instance="llm_0_0",model="llm"} 4
tritonkv_kv_blocks_total{instance="llm_0_0",model="llm"} 2730
nv_cpu_utilization 0.25
"""
COUNTER = """# TYPE nv_inference_request_success counter
nv_inference_request_success_total{model="llm",version="1"} 12 1700000000000
nv_inference_queue_duration_us{model="llm",version="1",le="a\\"b"} 3.5
"""


def test_prometheus_and_baseline():
    samples = parse_prometheus(METRICS + COUNTER)
    assert samples["nv_cpu_utilization"] == [({}, 0.25)]
    assert samples["nv_inference_request_success_total"] == [({"model": "llm", "version": "1"}, 12.0)]
    assert samples["nv_inference_queue_duration_us"] == [({"model": "llm", "version": "1", "le": "a\"b"}, 3.5)]
    assert samples["tritonkv_kv_blocks_used"][1] == ({"instance": "llm_stateless_0_0", "model": "llm_stateless"}, 2.0)
    snap = PoolSnapshot.from_text(METRICS)
    assert not snap.at_baseline and snap.total("tritonkv_kv_blocks_used") == 2
    settled = PoolSnapshot.from_text(METRICS.replace("} 2\n", "} 0\n").replace("} 1\n", "} 0\n"))
    assert settled.at_baseline  # cached blocks (the prefix cache) are not a leak
    assert not PoolSnapshot.from_text("nv_cpu_utilization 0.25\n").at_baseline  # no pool metrics: not proven


def _turn(prompt, out, reason="length"):
    return GenerationResult(token_ids=list(range(out)), finish_reason=reason, prompt_tokens=prompt)


def test_kv_reuse_rule():
    assert workload.expected_cached_tokens([]) is None  # a first turn may hit a shared prefix
    assert workload.expected_cached_tokens([_turn(13, 8), _turn(6, 8)]) == 13 + 8 + 6 + 8 - 1
    assert workload.expected_cached_tokens([_turn(13, 3, "stop")]) is None
    ok = GenerationResult(cached_tokens=20)
    workload.check_kv_reuse(ok, [_turn(13, 8)])
    with pytest.raises(workload.KVReuseError, match="reused 0 context tokens; the conversation had 20"):
        workload.check_kv_reuse(GenerationResult(cached_tokens=0), [_turn(13, 8)])


class _Recorder:
    def __init__(self):
        self.calls = []

    def fire(self, **kw):
        self.calls.append(kw)


def test_report_turn_fires_one_event_per_metric():
    b = ResultBuilder(0.0)
    b.add_tokens([1], "a", 0.1)
    b.add_tokens([2], "b", 0.3)
    r = b.finish(0.4, "length", 5, 6)
    rec = _Recorder()
    workload.report_turn(rec, "grpc multiturn", r)
    got = {c["request_type"]: (c["response_time"], c["response_length"], c["exception"]) for c in rec.calls}
    assert got == {"e2e": (pytest.approx(400), 2, None), "TTFT": (pytest.approx(100), 0, None),
                   "TPOT": (pytest.approx(200), 0, None), "tok/s": (pytest.approx(5.0), 0, None),
                   "cached": (5, 0, None)}
    assert {c["name"] for c in rec.calls} == {"grpc multiturn"}
    failed = _Recorder()
    boom = RuntimeError("max_tokens must be > 0")
    workload.report_turn(failed, "http single", exception=boom)
    assert len(failed.calls) == 1 and failed.calls[0]["request_type"] == "e2e" and failed.calls[0]["exception"] is boom


STATS_CSV = """Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
e2e,grpc single,10,1,280,275.0,184,321,7.2,2.0,0.2,280,290,300,310,320,320,320,320,320,320,320
TTFT,grpc single,9,0,86,80.0,43,114,0,1.8,0,86,95,99,100,110,110,110,110,110,110,110
TPOT,grpc single,9,0,27,27.0,20,35,0,1.8,0,27,28,33,34,35,35,35,35,35,35,35
tok/s,grpc single,9,0,29,30.0,24,43,0,1.8,0,29,31,31,33,43,43,43,43,43,43,43
cached,grpc single,9,0,0,0.0,0,0,0,1.8,0,0,0,0,0,0,0,0,0,0,0,0
,Aggregated,46,1,47,117,0,321,1.5,9.2,0.2,47,88,160,210,280,370,720,720,1000,1000,1000
"""


def test_summary_rows(tmp_path):
    path = tmp_path / "locust_stats.csv"
    path.write_text(STATS_CSV)
    rows = summary.summarize(summary.read_stats(str(path)))
    assert len(rows) == 1
    r = rows[0]
    assert (r["name"], r["turns"], r["failures"]) == ("grpc single", 10, 1)
    assert (r["ttft_p50_ms"], r["tpot_p95_ms"], r["e2e_p95_ms"], r["mean_cached_tokens"]) == (86, 35, 320, 0)
    # 9 successful turns of 8 tokens each (content size 7.2 averages over all 10) at 2 turns/s
    assert r["output_tokens_per_s"] == pytest.approx(2.0 * 0.9 * 8)
    table = summary.markdown_table(rows)
    assert "| grpc single | 10 | 1 | 86 / 110 |" in table


def test_chat_cli_without_server_reports_usage_error():
    from tritonkv_client.chat import main

    err = io.StringIO()
    assert main(["--http", "127.0.0.1:1"], stdin=io.StringIO(""), out=io.StringIO(), err=err) == 2
    assert "needs gRPC" in err.getvalue()


def test_json_events_and_whole_replies():
    mid = parse_json_event('{"text_output": "A", "output_ids": 65}', "m")
    assert (mid.ids, mid.final) == ([65], False)
    with pytest.raises(ServerError, match="boom") as e:
        parse_json_event('{"error": "boom"}', "m")
    assert (e.value.model, e.value.status) == ("m", 200)
    r = reply_result(b'{"text_output": "AB", "output_ids": [65, 66], "finish_reason": "length", '
                     b'"cached_tokens": 0, "prompt_tokens": 3}', "m", 200, sent_at=1.0, at=1.5)
    assert (r.token_ids, r.text, r.finish_reason, r.prompt_tokens) == ([65, 66], "AB", "length", 3)
    assert (r.ttft_s, r.e2e_s, r.inter_token_s, r.num_responses) == (0.5, 0.5, [0.0], 1)
    with pytest.raises(ServerError, match="bad"):
        reply_result('{"error": "bad"}', "m", 200, 0.0, 1.0)


# -- conversation state, over a scripted stream (no server) ------------------------------------

class _Result:
    """Stands for a tritonclient InferResult of the llm model."""

    def __init__(self, ids=(), text="", finish=None):
        self._arrays = {"output_ids": np.array(ids, dtype=np.int32),
                        "text_output": np.array([text.encode()], dtype=np.object_)}
        if finish is not None:
            self._arrays["finish_reason"] = np.array([finish.encode()], dtype=np.object_)
            self._arrays["prompt_tokens"] = np.array([len(ids)], dtype=np.int32)

    def as_numpy(self, name):
        return self._arrays.get(name)

    def get_response(self):
        return types.SimpleNamespace(parameters={})


class _Error:
    def __init__(self, message):
        self._message = message

    def message(self):
        return self._message

    def status(self):
        return None  # a model's error response: the stream stays usable


class _ScriptedStream:
    """A grpc_client._Stream whose replies are queued, send by send, from ``script``."""

    def __init__(self, script):
        self.script = script
        self.responses = queue.Queue()
        self.sent = []
        self.busy = self.closed = False
        self.cancelled = False

    def send(self, model, inputs, *, sequence_id=0, start=False, end=False, parameters=None):
        self.busy = True
        self.sent.append((model, sequence_id, start, end, [t.name() for t in inputs], parameters))
        for result, error in self.script.pop(0):
            self.responses.put((1.0, result, error))
        return 0.5

    def close(self, cancel=False):
        self.closed, self.cancelled = True, cancel


class _ScriptedClient:
    def __init__(self, script):
        self.model, self.timeout_s, self.params = "llm", 5.0, GenerationParams(max_tokens=2)
        self.stream = _ScriptedStream(script)
        self.released = []

    def _acquire(self):
        return self.stream

    def _release(self, stream):
        self.released.append(stream)


def _reply(*tokens, finish="length"):
    return [(_Result([t], chr(t)), None) for t in tokens] + [(_Result(finish=finish), None)]


def test_conversation_sends_start_once_and_a_bare_end_on_close():
    client = _ScriptedClient([_reply(65, 66), _reply(67), [(_Result(finish="closed"), None)]])
    conv = Conversation(client, 7, cache_salt="t")
    first = conv.send("hi")
    assert [d.token_ids for d in first] == [[65], [66]]
    assert conv.ask("more").token_ids == [67]
    conv.close()
    conv.close()  # idempotent: nothing more is sent
    salt = {"cache_salt": "t"}
    assert client.stream.sent == [
        ("llm", 7, True, False, ["text_input", "max_tokens", "stream"], salt),
        ("llm", 7, False, False, ["text_input", "max_tokens", "stream"], salt),
        ("llm", 7, False, True, [], None),
    ]
    assert [t.token_ids for t in conv.turns] == [[65, 66], [67]]
    assert conv.ended and client.released == [client.stream]


def test_conversation_whose_opening_turn_failed_starts_again():
    client = _ScriptedClient([[(None, _Error("max_tokens must be > 0"))], _reply(65)])
    conv = Conversation(client, 7)
    with pytest.raises(ServerError, match="max_tokens must be > 0"):
        conv.ask("hi", max_tokens=0)
    assert not conv.started and not conv.ended
    assert conv.ask("hi", end=True).token_ids == [65]  # START again, and END with it
    conv.close()  # the last turn carried END: no bare END
    assert [(start, end) for _, _, start, end, _, _ in client.stream.sent] == [(True, False), (True, True)]
    assert conv.ended and client.released == [client.stream]


def test_a_failed_opening_is_closed_with_a_bare_end():
    # Triton holds a sequence slot for a refused START until END: close() sends one and
    # ignores its "not live" answer
    client = _ScriptedClient([[(None, _Error("token id 999 is outside the vocabulary"))],
                              [(None, _Error("sequence 7 is not live"))]])
    conv = Conversation(client, 7)
    with pytest.raises(ServerError, match="vocabulary"):
        conv.ask("hi")
    conv.close()
    assert [(start, end) for _, _, start, end, _, _ in client.stream.sent] == [(True, False), (False, True)]
    assert conv.ended


def test_cancelling_a_turn_ends_the_conversation():
    # the bare END after a cancel is answered "not live" (the server saw the cancel): ignored
    not_live = [(None, _Error("sequence 7 is not live"))]
    client = _ScriptedClient([_reply(65, 66), not_live])
    conv = Conversation(client, 7)
    turn = conv.send("hi")
    assert next(turn).token_ids == [65]
    turn.cancel()
    assert conv.ended and client.stream.cancelled
    with pytest.raises(ServerError, match="cancelled") as e:
        turn.result()
    assert e.value.status == "cancelled"
    conv.close()
    # the turn may have finished on the server before the cancel arrived: close() still sends a
    # bare END so that the conversation is not left open there
    assert [(start, end) for _m, _s, start, end, _i, _p in client.stream.sent] == [(True, False), (False, True)]
    assert client.stream.sent[1][4] == []
    conv.close()  # idempotent
    assert len(client.stream.sent) == 2
    with pytest.raises(RuntimeError, match="is over"):
        conv.send("again")


def test_soak_counts_a_cores_pool_wide_gauges_once(monkeypatch):
    """Both models' instances report their one engine core's live sequences and used blocks:
    the soak's bound reads them once (a sum doubled them: 8 live read as 16 > 12)."""
    import soak

    page = "".join(f'{name}{{model="{model}",instance="{model}_0_0"}} {value}\n'
                   for model in ("llm", "llm_stateless")
                   for name, value in (("tritonkv_live_sequences", 8), ("tritonkv_kv_blocks_used", 100)))
    monkeypatch.setattr(soak, "fetch_metrics", lambda url: page)
    monitor = soak.SoakMonitor("http://unused/metrics", None, 10.0)
    monitor.sample()
    assert (monitor.samples[0].live_sequences, monitor.samples[0].blocks_used) == (8, 100)
