"""A frontend slower than its core: the engine steps that waited on the socket are read
together and each request's outputs in them become one (``coalesce``), so the frontend sends
fewer, larger responses; tokens, text, stop strings and the order of a request's last output
are those of one output per step."""

import threading
import time

from core_helpers import core_config, used_blocks
from polling import wait_until
from tiny_models import hf_greedy
from tritonkv.core.client import CoreClient
from tritonkv.engine.output import TextStream, coalesce
from tritonkv.engine.requests import SamplingParams, TurnOutput
from tritonkv.model.demo_checkpoint import byte_level_tokenizer, write_checkpoint
from tritonkv.model.tokenizer import TextTokenizer


def test_coalesce_merges_each_request_and_choice_and_keeps_the_last_output_last():
    steps = [
        [(1, TurnOutput("", [10], cached_tokens=4, prompt_tokens=9)), (2, TurnOutput("", [20])),
         (3, TurnOutput("", [30], index=0)), (3, TurnOutput("", [31], index=1))],
        [(1, TurnOutput("", [11], cached_tokens=4, prompt_tokens=9)), (2, TurnOutput("", [21], True, "length")),
         (3, TurnOutput("", [32], index=0)), (3, TurnOutput("", [33], finish_reason="length", index=1))],
        [(1, TurnOutput("", [12], cached_tokens=4, prompt_tokens=9)),
         (3, TurnOutput("", [34], True, "length", index=0)), (4, TurnOutput("", [], True, "error", error="bad"))],
    ]
    got = coalesce([item for step in steps for item in step])
    assert got == [
        (2, TurnOutput("", [20, 21], True, "length")),
        (3, TurnOutput("", [31, 33], finish_reason="length", index=1)),  # choice 1 ended before 0
        (1, TurnOutput("", [10, 11, 12], cached_tokens=4, prompt_tokens=9)),
        (3, TurnOutput("", [30, 32, 34], True, "length", index=0)),  # finished: the request's last
        (4, TurnOutput("", [], True, "error", error="bad")),
    ]


def test_a_stop_string_inside_a_merged_output_cuts_as_token_by_token(tmp_path):
    write_checkpoint(str(tmp_path), {"architectures": ["LlamaForCausalLM"]}, {}, byte_level_tokenizer())
    tokenizer = TextTokenizer(str(tmp_path))
    ids = list(b"abENcENDxyz")

    def run(outputs):
        sent, kept = [], []
        stream = TextStream(tokenizer, ("END",), sent.append, kept.append)
        for out in outputs:
            stream(out)
        return "".join(o.text for o in sent), [t for o in sent for t in o.token_ids], sent[-1], kept

    one_by_one = run([TurnOutput("", [t]) for t in ids])
    merged = run([TurnOutput("", ids[:3]), TurnOutput("", ids[3:])])
    for text, tokens, last, kept in (one_by_one, merged):
        assert text == "abENc" and tokens == list(b"abENcEND")
        assert (last.finished, last.finish_reason, kept) == (True, "stop", [8])


def test_a_slow_frontend_receives_fewer_larger_outputs_with_hf_greedy_tokens(tiny):
    client = CoreClient(core_config(tiny[0]))
    client.connect()
    try:
        assert wait_until(lambda: used_blocks(client) == 0, 10)
        before = client.generated_tokens
        prompts = {1: [1, 5, 9, 13, 17], 2: [1, 40, 41, 42]}
        outputs = {rid: [] for rid in prompts}
        held = []

        def emit_for(corr_id):
            def emit(out):
                if not held:  # the I/O thread stops a while: the core's steps wait on the socket
                    held.append(out)
                    time.sleep(1.0)
                outputs[corr_id].append(out)
            return emit

        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        for corr_id, prompt in prompts.items():
            client.submit(corr_id, prompt, params, emit_for(corr_id), start=True, end=True, stateless=True)
        assert wait_until(lambda: all(o and o[-1].finished for o in outputs.values()), 60)
        for corr_id, prompt in prompts.items():
            outs = outputs[corr_id]
            assert [t for o in outs for t in o.token_ids] == hf_greedy(tiny[1], prompt, 12)[0]
            assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        # 24 tokens arrived in fewer outputs than steps: what waited was merged
        assert sum(len(o) for o in outputs.values()) < 24, [len(o.token_ids) for o in outputs[1]]
        assert client.generated_tokens - before == 24
        assert wait_until(lambda: used_blocks(client) == 0, 10)
    finally:
        client.close()


def test_a_request_submitted_while_a_backlog_is_delivered_reaches_the_core_after_one_delivery(tiny):
    client = CoreClient(core_config(tiny[0]))
    client.connect()
    try:
        assert wait_until(lambda: used_blocks(client) == 0, 10)
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        delivering = threading.Event()
        outs = {}

        def slow(corr_id):
            def emit(out):
                outs.setdefault(corr_id, []).append(out)
                delivering.set()
                time.sleep(0.3)  # each delivery holds the I/O thread (a slow Triton send)
            return emit

        for corr_id in range(1, 6):
            client.submit(corr_id, [1, 5 + corr_id, 9], params, slow(corr_id), start=True, end=True, stateless=True)
        assert delivering.wait(30)
        queued_at = time.monotonic()  # the I/O thread is inside the first of five deliveries
        late = []
        client.submit(9, [1, 30, 31], params, late.append, start=True, end=True, stateless=True)
        assert wait_until(lambda: late and late[-1].finished, 60)
        arrival = late[0].first_token_times[0]  # when the core accepted it
        # it went out after the delivery under way, not after the other four (1.2 s more)
        assert arrival - queued_at < 0.75, arrival - queued_at
        assert wait_until(lambda: len(outs) == 5 and all(o[-1].finished for o in outs.values()), 60)
        assert wait_until(lambda: used_blocks(client) == 0, 10)
    finally:
        client.close()


def test_first_outputs_are_delivered_before_the_backlog_of_requests_already_streaming(tiny):
    from tritonkv.config import EngineConfig
    from tritonkv.core import messages as m
    from tritonkv.core.client import _Request

    client = CoreClient(EngineConfig(checkpoint=tiny[0], device="cpu"))  # not connected: _receive alone
    delivered = []

    class Emit:
        done = False

        def __init__(self, rid):
            self.rid = rid

        def __call__(self, out):
            delivered.append((self.rid, out.token_ids))

    client._requests = {rid: _Request(Emit(rid), None) for rid in (1, 2, 3)}
    client._requests[1].answered = client._requests[3].answered = True  # streaming already
    step = m.Outputs([(1, TurnOutput("", [10])), (3, TurnOutput("", [30])), (2, TurnOutput("", [20]))])
    client._receive([step])
    assert delivered == [(2, [20]), (1, [10]), (3, [30])]
    delivered.clear()
    client._receive([m.Outputs([(2, TurnOutput("", [21])), (1, TurnOutput("", [11]))]),
                     m.Outputs([(1, TurnOutput("", [12], True, "length")), (2, TurnOutput("", [22]))])])
    assert delivered == [(1, [11, 12]), (2, [21, 22])]  # both streaming now: the backlog's order
    # a conversation's next turn (5) waits for the end of its turn under way (4); a stateless
    # request (6) still goes first
    delivered.clear()
    client._requests.update({rid: _Request(Emit(rid), None, conversation=conv) for rid, conv in ((4, "c"), (5, "c"))})
    client._requests[6] = _Request(Emit(6), None)
    client._requests[4].answered = True
    client._receive([m.Outputs([(4, TurnOutput("", [40], True, "length")), (5, TurnOutput("", [50])),
                                (6, TurnOutput("", [60]))])])
    assert delivered == [(6, [60]), (4, [40]), (5, [50])]
