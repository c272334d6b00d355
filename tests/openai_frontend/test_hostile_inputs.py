"""Hostile OpenAI requests (issue 21 items 4, 7, 8): out-of-range numbers are 400s naming the
field (never cast), cache_salt separates prefix-cache namespaces (per request, or per API key),
and a 10 MB chat message is refused on its bytes while another stream keeps its pace."""

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

from tritonkv.model.demo_checkpoint import BOS, DEMO_CHAT_TEMPLATE, EOS, byte_level_tokenizer
from tritonkv.openai_frontend.app import create_app
from tritonkv.openai_frontend.served_model import ServedModel
from tritonkv.openai_frontend.triton_bridge import Delta, model_inputs, request_parameters


class PacedBridge:
    """Streams ``n`` one-token deltas, ``gap_s`` apart, and notes when each was taken by the app
    (a stalled event loop shows as a long gap)."""

    def __init__(self, n=1, gap_s=0.0):
        self.n, self.gap_s = n, gap_s
        self.sent, self.taken = [], []

    async def generate(self, gen, prompt_param="prompt"):
        self.sent.append(gen)
        for i in range(self.n):
            last = i == self.n - 1
            yield Delta("a", 1, [97], "length" if last else None, prompt_tokens=3 if last else 0)
            self.taken.append(time.perf_counter())
            if self.gap_s:
                await asyncio.sleep(self.gap_s)

    async def is_ready(self):
        return True

    async def close(self):
        pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "chat_template": DEMO_CHAT_TEMPLATE}))
    return str(path)


def client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120)


def post(app, path, body, headers=None):
    async def run():
        async with client(app) as c:
            return await c.post(path, json=body, headers=headers)

    return asyncio.run(run())


def chat(content="hi", **kw):
    return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}


@pytest.mark.parametrize("field, value, want", [
    ("top_k", 2**32 + 1, "top_k must be in [0, 2**31 - 1], got 4294967297"),
    ("top_k", 2**31, "top_k must be in [0, 2**31 - 1], got 2147483648"),
    ("top_k", 1e20, "invalid value for 'top_k'"),
    ("max_tokens", 2**31, "max_tokens must be in [1, 2**31 - 1], got 2147483648"),
    ("max_completion_tokens", 2**40, "max_completion_tokens must be in [1, 2**31 - 1]"),
    ("min_tokens", 2**31, "min_tokens must be in [0, 2**31 - 1]"),
    ("seed", 2**63, "seed must be in [0, 2**63 - 1]"),
    ("seed", -1, "seed must be in [0, 2**64 - 1], got -1"),
    ("temperature", 2.5, "temperature must be in [0, 2], got 2.5"),
    ("presence_penalty", 3, "presence_penalty must be in [-2, 2], got 3"),
    ("repetition_penalty", 0, "repetition_penalty must be in (0, 3.4e38], got 0"),
    ("min_p", 1.5, "min_p must be in [0, 1], got 1.5"),
    ("logit_bias", {"5": 200}, "logit_bias[5] must be a number in [-100, 100], got 200"),
    ("logit_bias", {"x": 1}, "logit_bias key 'x' must be a token id"),
    ("stop_token_ids", [2**31], "stop_token_ids[0] must be a token id"),
])
def test_out_of_range_numbers_are_400_naming_the_field(checkpoint, field, value, want):
    bridge = PacedBridge()
    app = create_app(ServedModel.load(checkpoint, "m", max_model_len=512), bridge)
    r = post(app, "/v1/chat/completions", chat(**{field: value}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith(want) and err["param"] == field
    assert bridge.sent == []


def test_sampling_fields_reach_the_model_as_its_inputs(checkpoint):
    bridge = PacedBridge()
    app = create_app(ServedModel.load(checkpoint, "m", max_model_len=512), bridge)
    r = post(app, "/v1/completions", {
        "model": "m", "prompt": "hello", "max_tokens": 5, "top_k": -1, "presence_penalty": 0.5,
        "frequency_penalty": -0.25, "repetition_penalty": 1.2, "min_p": 0.1, "min_tokens": 2,
        "stop_token_ids": [7], "logit_bias": {"9": -100, "11": 3}, "cache_salt": "tenant-a", "seed": 2**62})
    assert r.status_code == 200, r.text
    gen = bridge.sent[0]
    assert gen.sampling == {"max_tokens": 5, "presence_penalty": 0.5, "frequency_penalty": -0.25,
                            "repetition_penalty": 1.2, "min_p": 0.1, "min_tokens": 2, "stop_token_ids": (7,),
                            "logit_bias": ((9, -100.0), (11, 3.0)), "seed": 2**62}
    tensors = {t.name(): t for t in model_inputs(gen)}
    assert set(tensors) == {"text_input", "max_tokens", "presence_penalty", "frequency_penalty",
                            "repetition_penalty", "min_p", "min_tokens", "stop_token_ids", "seed", "stream"}
    assert np.frombuffer(tensors["seed"]._get_content(), np.int64).tolist() == [2**62]
    assert np.frombuffer(tensors["stop_token_ids"]._get_content(), np.int32).tolist() == [7]
    params = request_parameters(gen)
    assert json.loads(params["logit_bias"]) == {"9": -100.0, "11": 3.0} and params["cache_salt"] == "tenant-a"


def test_cache_salt_per_api_key_separates_users_and_keeps_the_request_salt(checkpoint):
    bridge = PacedBridge()
    app = create_app(ServedModel.load(checkpoint, "m", max_model_len=512), bridge, salt_per_api_key=True)
    for key, salt in (("alice", None), ("bob", None), ("alice", "s1"), (None, "s1"), (None, None)):
        headers = {"Authorization": f"Bearer {key}"} if key else None
        assert post(app, "/v1/chat/completions", chat(cache_salt=salt), headers).status_code == 200
    salts = [g.cache_salt for g in bridge.sent]
    assert salts[0].startswith("api-key-") and salts[1].startswith("api-key-") and salts[0] != salts[1]
    assert salts[2] == salts[0] + "/s1" and "alice" not in salts[0]
    assert salts[3:] == ["s1", None]
    # without the option the request's salt goes as sent, the key plays no part
    plain = PacedBridge()
    app = create_app(ServedModel.load(checkpoint, "m", max_model_len=512), plain)
    post(app, "/v1/chat/completions", chat(cache_salt="x"), {"Authorization": "Bearer alice"})
    assert plain.sent[0].cache_salt == "x"


def test_a_10_mb_chat_message_is_refused_fast_while_another_stream_keeps_its_pace(checkpoint):
    model = ServedModel.load(checkpoint, "m", max_model_len=512)
    bridge = PacedBridge(n=60, gap_s=0.005)
    app = create_app(model, bridge)
    big = json.dumps(chat("x" * (10 << 20))).encode()  # encoded here: the client's own work stays off the loop

    async def run():
        async with client(app) as c:
            stream = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat("hi", stream=True)))
            while len(bridge.taken) < 5:
                await asyncio.sleep(0.001)
            t0 = time.perf_counter()
            refused = await c.post("/v1/chat/completions", content=big,
                                   headers={"Content-Type": "application/json"})
            return refused, time.perf_counter() - t0, await stream

    refused, seconds, streamed = asyncio.run(run())
    assert refused.status_code == 400
    err = refused.json()["error"]
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"
    assert f"at most {model.max_prompt_bytes} bytes" in err["message"]
    assert seconds < 0.5, seconds
    assert streamed.status_code == 200 and len(bridge.taken) == 59  # each but the last, which ends the answer
    assert max(np.diff(bridge.taken)) < 0.25  # the stream was never held up for long
    assert len(bridge.sent) == 1  # the big one never reached the model


def test_chat_templating_and_tokenising_run_off_the_event_loop(checkpoint):
    """Under the size limit a large prompt is rendered and tokenised on a worker thread (the
    tokenizer lets go of the GIL): another stream keeps moving meanwhile."""
    model = ServedModel.load(checkpoint, "m", max_model_len=2_000_000)
    bridge = PacedBridge(n=400, gap_s=0.005)
    app = create_app(model, bridge)

    async def run():
        async with client(app) as c:
            stream = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat("hi", stream=True)))
            while len(bridge.taken) < 5:
                await asyncio.sleep(0.001)
            big = await c.post("/v1/chat/completions", json=chat("hello world " * 40_000))
            return big, await stream

    big, streamed = asyncio.run(run())
    assert big.status_code == 200 and streamed.status_code == 200
    assert len(bridge.sent[1].input_ids) > 480_000  # it was tokenised (byte-level: one id a byte)
    gaps = np.diff(bridge.taken)
    assert max(gaps) < 0.25, max(gaps)


def test_prompt_token_ids_outside_int32_are_400_not_a_cast(checkpoint):
    bridge = PacedBridge()
    app = create_app(ServedModel.load(checkpoint, "m", max_model_len=512), bridge)
    for bad in (2**40, -1, 2**31):
        r = post(app, "/v1/completions", {"model": "m", "prompt": [1, bad, 3]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert f"token id {bad}, outside [0, 2**31 - 1]" in r.json()["error"]["message"]
    assert bridge.sent == []
