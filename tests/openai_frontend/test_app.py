"""The routes with a recording bridge in place of Triton: what a request becomes (the model's
inputs) and what a checkpoint without a chat template answers."""

import asyncio
import json

import httpx
import numpy as np

from tritonkv.model.demo_checkpoint import BOS, EOS, byte_level_tokenizer
from tritonkv.openai_frontend.app import create_app
from tritonkv.openai_frontend.served_model import ServedModel
from tritonkv.openai_frontend.triton_bridge import Delta, model_inputs


class RecordingBridge:
    """Answers every request with the deltas given, and keeps the Generation it was sent."""

    def __init__(self, deltas):
        self.deltas = deltas
        self.sent = []

    async def generate(self, gen, prompt_param="prompt"):
        self.sent.append(gen)
        for d in self.deltas:
            yield d

    async def is_ready(self):
        return True

    async def close(self):
        pass


def checkpoint_without_template(tmp_path):
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    return str(tmp_path)


def post(app, path, body):
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post(path, json=body)

    return asyncio.run(run())


DELTAS = [Delta("ab", 2, [97, 98]), Delta("c", 1, [99], "eos", prompt_tokens=6, cached_tokens=0)]


def test_without_a_chat_template_chat_is_refused_and_completions_work(tmp_path):
    bridge = RecordingBridge(DELTAS)
    app = create_app(ServedModel.load(checkpoint_without_template(tmp_path), "plain"), bridge)
    r = post(app, "/v1/chat/completions", {"model": "plain", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "has no chat template" in err["message"] and err["param"] == "messages"
    assert err["code"] == "chat_template_missing" and bridge.sent == []
    r = post(app, "/v1/completions", {"model": "plain", "prompt": "hello", "max_tokens": 3, "stop": "x"})
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["text"] == "abc" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    gen = bridge.sent[0]
    assert (gen.text, gen.input_ids, gen.stream) == ("hello", None, False)
    assert gen.sampling == {"max_tokens": 3, "stop": ("x",)}


def test_a_request_becomes_the_models_input_tensors(tmp_path):
    bridge = RecordingBridge(DELTAS)
    app = create_app(ServedModel.load(checkpoint_without_template(tmp_path), "plain"), bridge)
    body = {"model": "plain", "prompt": [256, 104, 105], "max_tokens": 5, "temperature": 0.5, "top_p": 0.25,
            "top_k": 7, "seed": 2**40, "stop": ["a", "bc"], "ignore_eos": True, "stream": True}
    r = post(app, "/v1/completions", body)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events] == ["ab", "c"]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, "stop"]
    tensors = {t.name(): t for t in model_inputs(bridge.sent[0])}
    assert set(tensors) == {"input_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                            "ignore_eos", "stream"}
    assert (tensors["input_ids"].datatype(), tensors["input_ids"].shape()) == ("INT32", [3])
    assert tensors["seed"].datatype() == "INT64" and tensors["stop"].shape() == [2]

    def value(name, dtype):
        return np.frombuffer(tensors[name]._get_content(), dtype).tolist()

    assert value("input_ids", np.int32) == [256, 104, 105] and value("max_tokens", np.int32) == [5]
    assert value("temperature", np.float32) == [0.5] and value("top_p", np.float32) == [0.25]
    assert value("top_k", np.int32) == [7] and value("seed", np.int64) == [2**40]
    assert value("ignore_eos", np.bool_) == [True] and value("stream", np.bool_) == [True]


def test_an_unreachable_triton_is_a_503_naming_it(tmp_path):
    import socket

    from tritonkv.openai_frontend.triton_bridge import TritonBridge

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServedModel.load(checkpoint_without_template(tmp_path), "plain"), TritonBridge(f"127.0.0.1:{port}"))
    r = post(app, "/v1/completions", {"model": "plain", "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["type"] == "service_unavailable" and f"127.0.0.1:{port}" in err["message"]


N_DELTAS = [Delta("a", 1, [97], index=1), Delta("b", 1, [98], index=0),
            Delta("c", 1, [99], "stop", index=1), Delta("", 0, [], "length", index=0, prompt_tokens=6, last=True)]


def test_n_choices_are_indexed_and_usage_counts_every_choice_once(tmp_path):
    bridge = RecordingBridge(N_DELTAS)
    app = create_app(ServedModel.load(checkpoint_without_template(tmp_path), "plain"), bridge)
    body = post(app, "/v1/completions", {"model": "plain", "prompt": "hello", "n": 2, "max_tokens": 3}).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "b", "length"), (1, "ac", "stop")]
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == 3
    assert bridge.sent[-1].sampling["n"] == 2
    r = post(app, "/v1/completions", {"model": "plain", "prompt": "hello", "n": 2, "stream": True,
                                      "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    chunks = [(c["index"], c["text"], c["finish_reason"]) for e in events for c in e["choices"]]
    assert chunks == [(1, "a", None), (0, "b", None), (1, "c", "stop"), (0, "", "length")]
    assert events[-1]["usage"]["completion_tokens"] == 3 and r.text.endswith("data: [DONE]\n\n")
    for bad, words in [({"n": 2, "best_of": 1}, "best_of (1) must be >= n (2)"),
                       ({"best_of": 2, "stream": True}, "cannot be streamed"),
                       ({"n": 65}, "n must be in [1, 64]")]:
        r = post(app, "/v1/completions", {"model": "plain", "prompt": "hello", **bad})
        assert r.status_code == 400 and words in r.json()["error"]["message"], bad
