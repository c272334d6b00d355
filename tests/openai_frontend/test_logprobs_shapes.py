"""OpenAI logprobs: the model's per-token logprobs (vLLM's format, as the Triton model sends
them) reshaped as OpenAI's, and parsed by the openai SDK's own types."""

import asyncio
import json

import httpx
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tritonkv.model.demo_checkpoint import BOS, DEMO_CHAT_TEMPLATE, EOS, byte_level_tokenizer
from tritonkv.openai_frontend.app import create_app
from tritonkv.openai_frontend.served_model import ServedModel
from tritonkv.openai_frontend.triton_bridge import Delta, request_parameters


def lp(chosen, value, rank, *top):
    """One token's vLLM entry: the chosen token first, then (text, logprob, rank) of the top."""
    out = {str(ord(chosen)): {"logprob": value, "rank": rank, "decoded_token": chosen}}
    for i, (text, v, r) in enumerate(top):
        out[str(2000 + i + 10 * r)] = {"logprob": v, "rank": r, "decoded_token": text}
    return out


DELTAS = [Delta("ab", 2, [97, 98], logprobs=[lp("a", -0.1, 1, ("b", -2.5, 2)), lp("b", -3.0, 3, ("a", -0.2, 1),
                                                                                  ("c", -1.0, 2))]),
          Delta("c", 1, [99], "length", prompt_tokens=3, logprobs=[lp("c", -0.7, 1, ("d", -0.9, 2))])]


class Bridge:
    def __init__(self):
        self.sent = []

    async def generate(self, gen, prompt_param="prompt"):
        self.sent.append(gen)
        for d in DELTAS:
            yield d

    async def is_ready(self):
        return True

    async def close(self):
        pass


def app_and_bridge(tmp_path):
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "chat_template": DEMO_CHAT_TEMPLATE}))
    bridge = Bridge()
    return create_app(ServedModel.load(str(tmp_path), "m", max_model_len=512), bridge), bridge


def post(app, path, body):
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(path, json=body)

    return asyncio.run(run())


def test_chat_logprobs_parse_as_the_sdks_chat_completion(tmp_path):
    app, bridge = app_and_bridge(tmp_path)
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                           "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    assert bridge.sent[0].sampling["logprobs"] == 2 and request_parameters(bridge.sent[0]) == {"logprobs": "2"}
    content = ChatCompletion.model_validate(r.json()).choices[0].logprobs.content
    assert [(c.token, c.logprob, c.bytes) for c in content] == [("a", -0.1, [97]), ("b", -3.0, [98]),
                                                               ("c", -0.7, [99])]
    assert [[(t.token, t.logprob) for t in c.top_logprobs] for c in content] == [
        [("a", -0.1), ("b", -2.5)], [("a", -0.2), ("c", -1.0)], [("c", -0.7), ("d", -0.9)]]
    # logprobs without top_logprobs: the chosen tokens only; none asked: null
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                           "logprobs": True})
    assert bridge.sent[1].sampling["logprobs"] == 0
    assert all(c["top_logprobs"] == [] for c in r.json()["choices"][0]["logprobs"]["content"])
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["choices"][0]["logprobs"] is None and "logprobs" not in bridge.sent[2].sampling


def test_streamed_chat_chunks_carry_their_tokens_logprobs(tmp_path):
    app, _ = app_and_bridge(tmp_path)
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                           "logprobs": True, "top_logprobs": 1, "stream": True})
    chunks = [ChatCompletionChunk.model_validate(json.loads(e[6:])) for e in r.text.split("\n\n")
              if e.startswith("data: {")]
    per_chunk = [[c.token for c in ch.choices[0].logprobs.content] if ch.choices[0].logprobs else None
                 for ch in chunks]
    assert per_chunk == [None, ["a", "b"], ["c"]]


def test_completion_logprobs_parse_as_the_sdks_completion(tmp_path):
    app, bridge = app_and_bridge(tmp_path)
    r = post(app, "/v1/completions", {"model": "m", "prompt": "hi", "logprobs": 2})
    assert r.status_code == 200, r.text
    logprobs = Completion.model_validate(r.json()).choices[0].logprobs
    assert logprobs.tokens == ["a", "b", "c"] and logprobs.token_logprobs == [-0.1, -3.0, -0.7]
    assert logprobs.top_logprobs == [{"a": -0.1, "b": -2.5}, {"a": -0.2, "c": -1.0}, {"c": -0.7, "d": -0.9}]
    assert logprobs.text_offset == [0, 1, 2]


def test_logprobs_counts_are_range_checked(tmp_path):
    app, bridge = app_and_bridge(tmp_path)
    r = post(app, "/v1/completions", {"model": "m", "prompt": "hi", "logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    assert "logprobs must be in [0, 20], got 21" in r.json()["error"]["message"]
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                           "top_logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["message"] == "top_logprobs needs logprobs true"
    r = post(app, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                           "logprobs": True, "top_logprobs": 2**31})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    assert bridge.sent == []
