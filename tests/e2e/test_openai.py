"""The OpenAI-compatible endpoints against a real server, driven by the ``openai`` SDK (sync and
async, streamed and not). Oracle: the same request on the gRPC path (``llm_stateless``)."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from triton_calls import StreamClient, metric_values, wait_for_pool_baseline
from tritonkv.core.client import DRAIN_MESSAGES
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv.model.tokenizer import TextTokenizer
from tritonkv.openai_frontend.chat_template import ChatTemplate
from shared_server import MAX_MODEL_LEN

BLOCK = 16


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server  # the session's shared server (shared_server.py)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def grpc(server):
    c = StreamClient(server.grpc_url, "llm_stateless")
    yield c
    c.close()


def chat_ids(messages):
    """The demo template rendered and tokenised here, independently of the frontend."""
    ckpt = ensure_demo_checkpoint()
    text = ChatTemplate.from_checkpoint(ckpt).render(messages, add_generation_prompt=True)
    return TextTokenizer(ckpt).encode(text, add_special_tokens=False)


def test_models_lists_the_served_name(server, client):
    assert [m.id for m in client.models.list().data] == ["tritonkv-demo"] == [server.model_name]
    assert client.models.retrieve("tritonkv-demo").owned_by == "tritonkv"


def test_completion_matches_the_grpc_greedy_tokens_streamed_or_not(client, grpc):
    N = DRAIN_MESSAGES + 8
    prompt = "The shared pool keeps"
    ref = grpc.turn(text=prompt, max_tokens=N, temperature=0.0, ignore_eos=True)
    assert ref.error is None and len(ref.ids) == N
    whole = client.completions.create(model="tritonkv-demo", prompt=prompt, max_tokens=N, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == ref.text and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == N
    assert whole.usage.prompt_tokens == 1 + len(prompt.encode())  # BOS + one token per byte
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + N
    chunks = list(client.completions.create(model="tritonkv-demo", prompt=prompt, max_tokens=N, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    # streamed as it was made, not in one piece: a frontend behind its core merges a backlog
    # into fewer chunks, but at most DRAIN_MESSAGES engine steps' outputs into one
    # (core/client.py), and N tokens take more steps than that
    assert len(chunks) >= 2
    assert [c.choices[0].finish_reason for c in chunks[-1:]] == ["length"]
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_uses_the_template_and_matches_the_grpc_tokens(client, grpc):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ids = chat_ids(messages)
    assert ids[0] == 256 and bytes(ids[1:]).decode() == "<|system|>\nBe brief.\n<|user|>\nName a colour.\n<|assistant|>\n"
    ref = grpc.turn(ids=ids, max_tokens=16, temperature=0.0, ignore_eos=True)
    r = client.chat.completions.create(model="tritonkv-demo", messages=messages, max_completion_tokens=16,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 16)


def test_async_streamed_chat_with_usage(server, grpc):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    ids = chat_ids([{"role": "user", "content": "Hello there"}])
    ref = grpc.turn(ids=ids, max_tokens=12, temperature=0.0, ignore_eos=True)

    async def run():
        client = openai.AsyncOpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="tritonkv-demo", messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_async_completion_and_seeded_sampling_repeats(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)
        args = dict(model="tritonkv-demo", prompt="Roll the dice:", max_tokens=16, temperature=1.0, top_p=0.9,
                    seed=1234, extra_body={"ignore_eos": True})
        a, b = await asyncio.gather(client.completions.create(**args), client.completions.create(**args))
        c = await client.completions.create(**{**args, "seed": 99})
        await client.close()
        return a, b, c

    a, b, c = asyncio.run(run())
    assert a.choices[0].text == b.choices[0].text  # same seed, same tokens
    assert a.choices[0].text != c.choices[0].text


def test_stop_string_ends_the_text_before_it(client, grpc):
    prompt = "Stop here:"
    full = grpc.turn(text=prompt, max_tokens=24, temperature=0.0, ignore_eos=True).text
    stop = full[5:7]
    r = client.completions.create(model="tritonkv-demo", prompt=prompt, max_tokens=24, temperature=0,
                                  stop=[stop, "never-made"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]
    chunks = list(client.chat.completions.create(model="tritonkv-demo", max_tokens=24, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": prompt}], stop=stop))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert stop not in "".join(c.choices[0].delta.content or "" for c in chunks)


def test_a_resent_chat_reuses_the_history_from_the_prefix_cache(client):
    history = [{"role": "system", "content": "You are a terse assistant for the tritonkv project."},
               {"role": "user", "content": "What does the prefix cache keep between requests?"}]
    first = client.chat.completions.create(model="tritonkv-demo", messages=history, max_tokens=20, temperature=0)
    first_prompt = first.usage.prompt_tokens
    assert first_prompt == len(chat_ids(history))
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And for how long?"}]
    second = client.chat.completions.create(model="tritonkv-demo", messages=history, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens == len(chat_ids(history))
    # every full block of the first prompt (a prefix of the second one) is a hit
    assert cached % BLOCK == 0 and first_prompt // BLOCK * BLOCK <= cached < second.usage.prompt_tokens
    assert cached >= 64


@pytest.mark.parametrize("args, status, param, words", [
    (dict(model="nope"), 404, "model", "does not exist"),
    (dict(temperature=2.5), 400, "temperature", "[0, 2]"),
    (dict(top_p=0.0), 400, "top_p", "(0, 1]"),
    (dict(max_tokens=0), 400, "max_tokens", "must be in [1, 2**31 - 1]"),
    (dict(n=2, best_of=1), 400, "best_of", "best_of (1) must be >= n (2)"),
    (dict(seed=2**70), 400, "seed", "'seed'"),
    (dict(seed=2**63), 400, "seed", "[0, 2**63 - 1]"),
    (dict(extra_body={"best_of_n": 3}), 400, "best_of_n", "unrecognized request argument"),
    (dict(prompt="x" * (MAX_MODEL_LEN + 4)), 400, "prompt", "max_model_len"),
    (dict(max_tokens=MAX_MODEL_LEN + 1), 400, None, "max_model_len"),
    (dict(stream=True, prompt="x" * (MAX_MODEL_LEN + 4)), 400, "prompt", "max_model_len"),
    (dict(stream=True, model="nope"), 404, "model", "does not exist"),
])
def test_bad_completion_requests_get_openai_errors(client, args, status, param, words):
    kw = dict(model="tritonkv-demo", prompt="Hello", max_tokens=4)
    kw.update(args)
    with pytest.raises(openai.APIStatusError) as info:
        out = client.completions.create(**kw)
        list(out) if kw.get("stream") else out
    err = info.value
    assert err.status_code == status, err.body
    assert words in err.body["message"] and (param is None or err.body["param"] == param), err.body


def test_bad_chat_requests_name_what_was_wrong(client):
    cases = [
        (dict(messages=[{"role": "robot", "content": "hi"}]), "unknown role robot"),
        (dict(messages=[]), "'messages' is empty"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "only text parts"),
        (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=3, max_completion_tokens=4), "not both"),
        (dict(messages=[{"role": "user", "content": "hi"}], stream_options={"include_usage": True}),
         "only allowed when 'stream' is true"),
    ]
    for args, words in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tritonkv-demo", **args)
        assert words in info.value.body["message"], (args, info.value.body)


def test_malformed_json_and_unknown_routes(server):
    r = httpx.post(f"{server.openai_url}/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.openai_url}/completions", content=b" " * (17 << 20), timeout=60)
    assert r.status_code == 413 and "larger than 16 MiB" in r.json()["error"]["message"]
    r = httpx.post(f"{server.openai_url}/embeddings", json={"model": "tritonkv-demo", "input": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


@pytest.fixture(scope="module")
def per_token_s(client):
    """Seconds per output token of one sequence alone on this machine, now."""
    t0 = time.monotonic()
    client.completions.create(model="tritonkv-demo", prompt="Warm up:", max_tokens=256, temperature=0,
                              extra_body={"ignore_eos": True})
    return (time.monotonic() - t0) / 256


def generated_tokens(server) -> float:
    """Tokens the server generated so far (every instance), once the pool is idle and the
    counters published (metrics every 0.5 s: the baseline's hold covers it)."""
    assert wait_for_pool_baseline(server.metrics_url, timeout=60, hold=1.2)
    return sum(metric_values(server.metrics_url, "tritonkv_generated_tokens_total"))


# Rule for the two disconnect tests: the proof of a cancel is the token count, not a time. The
# request asks for MAX_MODEL_LEN - 32 tokens; a cancelled one generates fewer than half of them
# (on a fast GPU the whole answer takes well under a second, so elapsed time proves nothing).
def test_a_client_gone_mid_stream_cancels_the_request(server):
    """The client reads a few chunks of a long answer and disconnects: the server cancels the
    request (its KV blocks return to the pool) long before the answer would have ended."""
    before = generated_tokens(server)
    body = {"model": "tritonkv-demo", "prompt": "Tell a long story:", "max_tokens": MAX_MODEL_LEN - 32,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.openai_url}/completions", json=body) as r:
            assert r.status_code == 200
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                if len(events) == 20:
                    break
    made = generated_tokens(server) - before
    print(f"the request generated {made:.0f} of {body['max_tokens']} tokens")
    assert 20 <= made < body["max_tokens"] / 2


def test_a_crashed_frontend_is_restarted_and_tritonserver_keeps_serving(server, grpc):
    import os
    import signal

    old = server.openai.process
    os.killpg(old.pid, signal.SIGKILL)
    old.wait()
    # tritonserver does not notice: the gRPC path answers meanwhile
    assert grpc.turn(text="still here", max_tokens=3, temperature=0.0).error is None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (server.openai.process is not old and server.openai.is_ready()):
        time.sleep(0.2)
    assert server.openai.process is not old and server.openai.restarts == 1
    client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)
    r = client.completions.create(model="tritonkv-demo", prompt="Back", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_a_client_gone_before_a_whole_answer_cancels_the_request(server, per_token_s):
    """Not streamed: the client gives up (timeout) and closes the connection; the server sees
    the disconnect and cancels the request before the answer is done."""
    before = generated_tokens(server)
    body = {"model": "tritonkv-demo", "prompt": "Tell a long story:", "max_tokens": MAX_MODEL_LEN - 32,
            "temperature": 0, "ignore_eos": True}
    # give up a quarter of the way through the answer (at most 1 s in)
    read_s = min(1.0, per_token_s * body["max_tokens"] / 4)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.openai_url}/completions", json=body, timeout=httpx.Timeout(60, read=read_s))
    made = generated_tokens(server) - before
    print(f"the request generated {made:.0f} of {body['max_tokens']} tokens (client gone after {read_s:.2f} s)")
    assert made < body["max_tokens"] / 2


def test_the_frontend_logged_no_error(server):
    """Every refusal and disconnect above was answered, none became an unhandled exception."""
    import os

    with open(os.path.join(server.workdir, "openai.log")) as f:
        log = f.read()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert log.count("tritonkv OpenAI frontend: model 'tritonkv-demo'") == 2  # the start and the restart


@pytest.fixture(scope="module")
def hf_oracle():
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(ensure_demo_checkpoint(), dtype=torch.float32).eval()


def test_penalties_and_logprobs_through_openai_and_the_client_equal_hf(server, client, hf_oracle):
    """issue 24 items 1-2 end to end: repetition_penalty + logit_bias greedy tokens equal HF's
    processors, and each token's logprob equals HF's log_softmax (fp32 CPU server)."""
    import torch
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                         SequenceBiasLogitsProcessor)
    from tritonkv_client import Client

    prompt = "The shared pool keeps"
    ids = TextTokenizer(ensure_demo_checkpoint()).encode(prompt, add_special_tokens=True)
    processors = [SequenceBiasLogitsProcessor({(ord("e"),): 3.0}), RepetitionPenaltyLogitsProcessor(1.6)]
    context, want, want_lp = list(ids), [], []
    with torch.no_grad():
        for _ in range(12):
            logits = hf_oracle(torch.tensor([context])).logits[:, -1].float()
            scores = logits
            for p in processors:
                scores = p(torch.tensor([context]), scores)
            token = int(scores[0].argmax())
            want.append(token)
            want_lp.append(float(torch.log_softmax(logits[0], -1)[token]))
            context.append(token)
    settings = dict(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.6,
                    logit_bias={ord("e"): 3.0}, logprobs=2)
    with Client(server.grpc_url) as c:
        ours = c.generate(prompt, **settings)
    assert ours.token_ids == want
    assert max(abs(next(iter(e.values()))["logprob"] - w) for e, w in zip(ours.logprobs, want_lp)) < 1e-4
    r = client.completions.create(model="tritonkv-demo", prompt=prompt, max_tokens=12, temperature=0, logprobs=2,
                                  logit_bias={str(ord("e")): 3.0},
                                  extra_body={"ignore_eos": True, "repetition_penalty": 1.6})
    assert r.choices[0].text == ours.text
    assert max(abs(a - w) for a, w in zip(r.choices[0].logprobs.token_logprobs, want_lp)) < 1e-4
    assert all(len(top) <= 3 for top in r.choices[0].logprobs.top_logprobs)


@pytest.mark.parametrize("field, value", [("top_k", 2**32 + 1), ("top_k", 2**31), ("max_tokens", 2**31),
                                          ("presence_penalty", 2.5)])
def test_out_of_range_numbers_are_400s_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tritonkv-demo", prompt="x", **({"extra_body": {field: value}}))
    assert info.value.body["param"] == field and f"{field} must be in" in info.value.body["message"]


def test_cache_salt_separates_prefix_cache_namespaces(client):
    """issue 21 item 7: a user re-sending another's prompt got its cached KV; cache_salt (as in
    vLLM) confines the cache to requests with the same salt."""
    prompt = "Salted prompt: " + "the pool keeps every full block of this text " * 3

    def cached(salt):
        extra = {"ignore_eos": True} if salt is None else {"ignore_eos": True, "cache_salt": salt}
        r = client.completions.create(model="tritonkv-demo", prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("alice") == 0
    assert cached("bob") == 0  # another namespace: nothing reused
    assert cached("alice") > 0  # the same one: the prompt's full blocks
    assert cached(None) == 0  # unsalted requests share a namespace of their own


def test_n_choices_share_one_prefill_and_equal_requests_sent_alone(server, client):
    """n = 2 with seed s through the SDK: choice i equals the request sent alone with seed s + i
    (engine/sample_group.py), streamed or not; usage counts the prompt once."""
    prompt, args = "Samples of one prompt share", dict(model="tritonkv-demo", max_tokens=12, temperature=1.8,
                                                         extra_body={"ignore_eos": True})
    alone = [client.completions.create(prompt=prompt, seed=7 + i, **args).choices[0].text for i in range(2)]
    assert alone[0] != alone[1]
    whole = client.completions.create(prompt=prompt, seed=7, n=2, **args)
    assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [(0, alone[0], "length"),
                                                                           (1, alone[1], "length")]
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens == 1 + len(prompt.encode())
    texts = ["", ""]
    for chunk in client.completions.create(prompt=prompt, seed=7, n=2, stream=True, **args):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == alone
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], seed=3, n=2,
                                          **{**args, "model": "tritonkv-demo"})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 24
    assert wait_for_pool_baseline(server.metrics_url)
