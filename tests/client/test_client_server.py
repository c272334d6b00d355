"""tritonkv_client against a real server (the launcher's, on free loopback ports): token ids
against full recompute in HF, KV reuse counts, finish reasons, server errors, END / cancel
leaving the pool at baseline, and the chat CLI."""

import asyncio
import io
import re

import pytest

from polling import wait_until
from tiny_models import hf_greedy
from tritonkv.core.client import DRAIN_MESSAGES
from tritonkv.model.demo_checkpoint import ensure_demo_checkpoint
from tritonkv_client import AsyncClient, AsyncHttpClient, Client, HttpClient, ServerError
from tritonkv_client.chat import main as chat_main
from tritonkv_client.metrics import pool_snapshot, wait_for_baseline

GREEDY = dict(temperature=0.0, ignore_eos=True)
BOS = 256


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server  # the session's shared server (tests/e2e/shared_server.py)


@pytest.fixture
def client(server):
    with Client(server.grpc_url, **GREEDY) as c:
        yield c


def text_ids(text: str, bos: bool) -> list[int]:  # the demo tokenizer is byte-level
    return ([BOS] if bos else []) + list(text.encode())


def test_conversation_streams_each_turn_and_reuses_kv(server, client, hf_demo):
    history = []
    with client.conversation(max_tokens=6) as conv:
        for i, text in enumerate(["Hello, world", " again", "?!"]):
            turn = conv.send(text)
            deltas = list(turn)
            result = turn.result()
            new = text_ids(text, bos=i == 0)
            expected, _ = hf_greedy(hf_demo, history + new, 6)
            # deltas as they arrive: one per token unless the server's sender fell behind and
            # coalesced some (server/response_streamer.py); never empty, never reordered
            assert [t for d in deltas for t in d.token_ids] == expected and all(d.token_ids for d in deltas)
            assert result.token_ids == expected and result.finish_reason == "length"
            assert result.prompt_tokens == len(new)
            assert result.cached_tokens == (0 if i == 0 else len(history) - 1)
            assert result.ttft_s > 0 and len(result.inter_token_s) == 5 and result.e2e_s >= result.ttft_s
            history += new + expected
        # the gauges are published every 0.5 s: wait for the open conversation to show
        assert wait_until(lambda: pool_snapshot(server.metrics_url).total("tritonkv_live_sequences") >= 1, 5)
    assert conv.ended and len(conv.turns) == 3
    assert wait_for_baseline(server.metrics_url, 10).at_baseline  # the bare END released it


def test_end_on_last_turn_and_one_shot_paths_agree(server, client, hf_demo):
    expected, _ = hf_greedy(hf_demo, text_ids("Hello", True), 6)
    with client.conversation() as conv:
        last = conv.ask("Hello", max_tokens=6, end=True)
    assert last.token_ids == expected and conv.ended
    grpc = client.generate("Hello", max_tokens=6)
    http = HttpClient(server.http_url, **GREEDY)
    whole = http.generate("Hello", max_tokens=6)
    stream = http.generate_stream("Hello", max_tokens=6)
    events = list(stream)
    streamed = stream.result()
    assert grpc.token_ids == whole.token_ids == streamed.token_ids == expected
    assert grpc.text == whole.text == streamed.text == bytes(expected).decode("utf-8", errors="replace")
    assert 1 <= len(events) <= 6 and [t for e in events for t in e.token_ids] == expected
    # streamed, not in one piece: a frontend behind its core merges a backlog into fewer
    # events, but at most DRAIN_MESSAGES engine steps' outputs into one (core/client.py), so
    # a stream of more tokens than that comes in at least two
    n = DRAIN_MESSAGES + 8
    long_stream = http.generate_stream("Hello", max_tokens=n)
    events = list(long_stream)
    assert len(events) >= 2 and all(e.token_ids for e in events)
    assert [t for e in events for t in e.token_ids] == http.generate("Hello", max_tokens=n).token_ids
    assert whole.num_responses == 1 and whole.inter_token_s == [0.0] * 5
    assert whole.prompt_tokens == 6 and whole.finish_reason == streamed.finish_reason == "length"


def test_asyncio_clients_match_sync(server, client):
    sync_turns = []
    with client.conversation(max_tokens=5) as conv:
        sync_turns = [conv.ask("abc").token_ids, conv.ask("def").token_ids]

    async def go():
        async with AsyncClient(server.grpc_url, **GREEDY) as ac:
            async with ac.conversation(max_tokens=5) as conv:
                first = await conv.send("abc")
                deltas = [d async for d in first]
                second = await conv.ask("def")
            one_shot = await ac.generate("abc", max_tokens=5)
            with pytest.raises(ServerError, match="outside the vocabulary"):
                await ac.generate(input_ids=[BOS, 999])
        async with AsyncHttpClient(server.http_url, **GREEDY) as hc:
            http = await hc.generate("abc", max_tokens=5)
            items = [x async for x in hc.generate_stream("abc", max_tokens=5)]
        return deltas, (await first.result()), second, one_shot, http, items

    deltas, first, second, one_shot, http, items = asyncio.run(go())
    assert [first.token_ids, second.token_ids] == sync_turns
    # one delta per token unless the server's sender fell behind and coalesced some
    assert 1 <= len(deltas) <= 5 and all(d.token_ids for d in deltas) and second.cached_tokens == 4 + 5 - 1
    assert one_shot.token_ids == http.token_ids == items[-1].token_ids == sync_turns[0]
    assert 2 <= len(items) <= 6  # up to five token deltas (fewer when coalesced), then the result
    assert wait_for_baseline(server.metrics_url, 10).at_baseline


def test_server_errors_raise_with_the_servers_message(server, client):
    with pytest.raises(ServerError, match=r"token id 999 is outside the vocabulary"):
        client.generate(input_ids=[BOS, 999], max_tokens=2)
    with pytest.raises(ServerError, match=r"'max_tokens' must be in \[1, "):
        HttpClient(server.http_url).generate("x", max_tokens=0)
    with pytest.raises(ServerError, match="outside the vocabulary"):
        list(HttpClient(server.http_url).generate_stream(input_ids=[BOS, 999]))
    with client.conversation(max_tokens=3) as conv:
        first = conv.ask("abc")
        with pytest.raises(ServerError, match=r"'max_tokens' must be in \[1, "):
            conv.ask("d", max_tokens=0)
        after = conv.ask("d")  # the conversation survives a rejected turn
    assert after.cached_tokens == 4 + len(first.token_ids) - 1
    assert client.generate("abc", max_tokens=3).token_ids == first.token_ids  # still serving
    assert wait_for_baseline(server.metrics_url, 10).at_baseline


def test_cancelling_a_turn_releases_the_conversation(server, client):
    conv = client.conversation()
    turn = conv.send("abc", max_tokens=400)
    first = next(turn)
    assert len(first.token_ids) == 1
    turn.cancel()
    assert conv.ended
    with pytest.raises(ServerError, match="cancelled"):
        turn.result()
    conv.close()  # nothing left to send
    assert wait_for_baseline(server.metrics_url, 20).at_baseline


def test_chat_cli_one_prompt_and_interactive(server):
    expected = HttpClient(server.http_url, **GREEDY).generate("Hello", max_tokens=6)
    out, err = io.StringIO(), io.StringIO()
    args = ["--url", server.grpc_url, "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--stats", "--raw"]
    assert chat_main(args + ["-p", "Hello"], out=out, err=err) == 0
    assert out.getvalue() == expected.text + "\n"
    assert "6 tokens, finish length" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert chat_main(args, stdin=io.StringIO("Hello\nmore\n/new\nHello\n"), out=out, err=err) == 0
    replies = out.getvalue().split("\n")
    assert replies[0] == expected.text and replies[2] == expected.text  # /new starts afresh
    stats = [line for line in err.getvalue().splitlines() if line.startswith("[")]
    assert "6 new prompt tokens, 0 context tokens reused" in stats[0]
    assert f"4 new prompt tokens, {6 + 6 - 1} context tokens reused" in stats[1]  # " more" on the kept KV
    assert "[new conversation]" in err.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert chat_main(["--http", server.http_url, "-p", "Hello", "--max-tokens", "0", "--raw"], out=out, err=err) == 1
    assert "'max_tokens' must be in [1, " in err.getvalue()
    assert wait_for_baseline(server.metrics_url, 10).at_baseline


def test_chat_cli_renders_the_chat_template_as_the_openai_api_does(server):
    """The chat CLI's turns go through the checkpoint's chat template (found through the
    server's model config): each reply equals the OpenAI chat endpoint's greedy reply to the
    same messages, the second turn sends only what the template adds (the rest is reused KV)."""
    import openai

    api = openai.OpenAI(base_url=server.openai_url, api_key="-", max_retries=0)

    def openai_reply(messages):
        r = api.chat.completions.create(model=server.model_name, messages=messages, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        return r.choices[0].message.content

    system = "Be brief."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello"}]
    first = openai_reply(messages)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = openai_reply(messages)
    out, err = io.StringIO(), io.StringIO()
    args = ["--url", server.grpc_url, "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "--stats",
            "--system", system]
    assert chat_main(args, stdin=io.StringIO("Hello\nAnd then?\n"), out=out, err=err) == 0, err.getvalue()
    assert out.getvalue().split("\n")[:2] == [first, second]
    stats = [line for line in err.getvalue().splitlines() if line.startswith("[")]
    from tritonkv.model.tokenizer import TextTokenizer
    from tritonkv.openai_frontend.chat_template import ChatTemplate

    ckpt = ensure_demo_checkpoint()
    n_first = len(TextTokenizer(ckpt).encode(ChatTemplate.from_checkpoint(ckpt).render(messages[:2]), False))
    n_full = len(TextTokenizer(ckpt).encode(ChatTemplate.from_checkpoint(ckpt).render(messages), False))
    assert f"{n_first} new prompt tokens" in stats[0]  # the whole first rendering is sent
    sent, reused = map(int, re.search(r"(\d+) new prompt tokens, (\d+) context tokens reused", stats[1]).groups())
    assert reused == n_first + 6 - 1 and sent < n_full - n_first  # only what the template adds
    out, err = io.StringIO(), io.StringIO()
    assert chat_main(args[:-2] + ["-p", "Hello"], out=out, err=err) == 0
    assert out.getvalue() == openai_reply([{"role": "user", "content": "Hello"}]) + "\n"
    assert wait_for_baseline(server.metrics_url, 10).at_baseline


def test_n_choices_through_grpc_and_http_equal_requests_sent_alone(server, client):
    """``n`` passes through the client; ``GenerationResult.choices`` holds each choice, and
    choice i equals the request sent alone with seed s + i (engine/sample_group.py)."""
    args = dict(max_tokens=8, temperature=1.5)
    alone = [client.generate("Forks", seed=21 + i, **args) for i in range(2)]
    assert alone[0].token_ids != alone[1].token_ids
    both = client.generate("Forks", seed=21, n=2, **args)
    assert [(c.token_ids, c.text, c.finish_reason) for c in both.choices] == [
        (a.token_ids, a.text, "length") for a in alone]
    assert both.token_ids == alone[0].token_ids  # the result's own fields: choice 0's
    http = HttpClient(server.http_url, **GREEDY).generate("Forks", seed=21, n=2, **args)
    assert [c.token_ids for c in http.choices] == [a.token_ids for a in alone]
    assert [c.text for c in http.choices] == [a.text for a in alone]
    # best_of: the one reply of HTTP generate (the gRPC client streams, which best_of refuses)
    best = HttpClient(server.http_url, **GREEDY).generate("Forks", seed=21, n=2, best_of=3, **args)
    assert len(best.choices) == 2 and all(len(c.token_ids) == 8 for c in best.choices)
    with pytest.raises(ServerError, match="cannot be streamed"):
        client.generate("Forks", n=1, best_of=3, **args)
    assert wait_for_baseline(server.metrics_url, 10).at_baseline
