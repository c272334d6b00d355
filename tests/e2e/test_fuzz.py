"""Malformed requests against a real server while well-formed conversations run (issue 13,
items 1, 2, 6, 7).

Every bad request is answered with an error that names the problem; the conversations
running meanwhile finish with HF's greedy tokens and no stall; the pool returns to baseline.
The requests and how each answer is judged (ours or tritonserver's): malformed_requests.py.
The server is the session's shared one (shared_server.py): the fuzz needs no setting of its own.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time

import pytest
import torch
import tritonclient.grpc as grpcclient

from malformed_requests import (GRPC_CASES, HTTP_CASES, TRITON_MESSAGES, check_answer, grpc_call,
                                random_grpc_cases, random_http_cases)
from tiny_models import hf_greedy
from triton_calls import StreamClient, http_post, inputs_for, wait_for_pool_baseline

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server  # the session's shared server (shared_server.py)


# -- well-formed conversations --------------------------------------------------------------
MAX_TURNS = 40  # 40 x (3 + 6) tokens stay inside max_model_len


class Conversation(threading.Thread):
    """Turns on ``llm`` (one gRPC stream) until told to stop; records the largest wait for a
    response (first token or next token)."""

    def __init__(self, url: str, index: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.index, self.stop_event = url, index, stop
        self.seq_id = 880_000 + index
        self.turns: list[tuple[list[int], list[int] | None, str | None]] = []  # (prompt, output, error)
        self.max_gap = 0.0
        self.outlived_fuzz = False  # still running when the last malformed request was answered
        self.failure: BaseException | None = None

    def run(self):
        try:
            self._converse()
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def _converse(self):
        client = grpcclient.InferenceServerClient(self.url)
        results: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((time.monotonic(), result, error)))
        try:
            rng = random.Random(self.index)
            n = 0
            while True:
                prompt = ([256] if n == 0 else []) + [rng.randrange(32, 127) for _ in range(3)]
                if n == MAX_TURNS - 1:
                    # the context holds one more turn: the conversation stays open (idle, its KV
                    # kept) until the fuzz is over, so that it spans the whole fuzz on a fast machine
                    self.stop_event.wait(300)
                self.outlived_fuzz = n >= 1 and self.stop_event.is_set()
                last = n == MAX_TURNS - 1 or self.outlived_fuzz
                client.async_stream_infer(model_name="llm", inputs=inputs_for(ids=prompt, max_tokens=6, **GREEDY),
                                          sequence_id=self.seq_id, sequence_start=n == 0, sequence_end=last,
                                          enable_empty_final_response=True)
                ids, error, before = [], None, time.monotonic()
                while True:
                    at, result, err = results.get(timeout=60)
                    self.max_gap = max(self.max_gap, at - before)
                    before = at
                    if err is not None:
                        error = str(err)
                        break
                    out = result.as_numpy("output_ids")
                    if out is not None:
                        ids += out.tolist()
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        break
                self.turns.append((prompt, ids, error))
                n += 1
                if last or error:
                    return
        finally:
            client.stop_stream()
            client.close()


def hf_greedy_matches(model, turns) -> bool:
    """HF's greedy choice at every generated position of the whole conversation, in one
    forward pass over it (teacher forcing; the same answers as ``hf_greedy`` turn by turn,
    since each turn's context is exactly the tokens before it)."""
    history, generated = [], []
    for prompt, ids, _ in turns:
        history += prompt
        generated += [(len(history) + j, t) for j, t in enumerate(ids)]
        history += ids
    with torch.no_grad():
        logits = model(torch.tensor([history])).logits[0]
    choices = logits.argmax(-1).tolist()
    return all(choices[pos - 1] == token for pos, token in generated) and len(turns[-1][1]) == 6


def test_malformed_requests_while_conversations_run(server, hf_demo):
    started = time.monotonic()
    stop = threading.Event()
    conversations = [Conversation(server.grpc_url, i, stop) for i in range(3)]
    for c in conversations:
        c.start()
    answered, slow, problems = [], [], []
    rng = random.Random(13)
    grpc_clients = {m: StreamClient(server.grpc_url, m) for m in ("llm", "llm_stateless")}
    try:
        for name, model, data, stream, owner, status, expected in HTTP_CASES:
            t0 = time.monotonic()
            try:
                code, message, _ = http_post(server.http_url, model, data, stream=stream)
            except OSError as exc:
                problems.append(f"HTTP {name}: {exc!r}")
                continue
            check_answer(problems, f"HTTP {name}", owner, code == 200 and message is None, message, expected, code, status)
            answered.append(name)
            if time.monotonic() - t0 > 2.0:
                slow.append((name, time.monotonic() - t0))
        for i, (name, model, inputs, params, owner, expected) in enumerate(GRPC_CASES):
            t0 = time.monotonic()
            ok, message = grpc_call(grpc_clients[model], model, inputs, params, 770_000 + i)
            check_answer(problems, f"gRPC {name}", owner, ok, message, expected)
            answered.append(name)
            if time.monotonic() - t0 > 2.0:
                slow.append((name, time.monotonic() - t0))
        # random: an answer is either a success or an error that names a field we changed
        # (ours, 400) or is one of Triton's parse errors; never a traceback, never our 500
        for name, data, mutated in random_http_cases(rng, 14):
            code, message, events = http_post(server.http_url, "llm_stateless", data)
            answered.append(name)
            if code == 200:
                if message is not None or "output_ids" not in events[0]:
                    problems.append(f"{name}: 200 with {events!r:.200}")
            elif not message or "Traceback" in message or "internal error" in message:
                problems.append(f"{name}: HTTP {code} {message!r}")
            elif any(m in message for m in TRITON_MESSAGES):
                if code not in (400, 500):
                    problems.append(f"{name}: HTTP {code} {message!r}")
            elif code != 400 or not (any(k in message for k in mutated) or "prompt" in message
                                     or "context limit" in message):
                problems.append(f"{name}: HTTP {code} {message!r} names none of {mutated}")
        for i, (name, inputs, params, mutated) in enumerate(random_grpc_cases(rng, 12)):
            ok, message = grpc_call(grpc_clients["llm_stateless"], "llm_stateless", inputs, params, 0)
            answered.append(name)
            if ok:
                continue
            if "Traceback" in message or "internal error" in message or not (
                    any(m in message for m in TRITON_MESSAGES) or any(k in message for k in mutated)
                    or "prompt" in message or "context limit" in message):
                problems.append(f"{name}: {message!r} names none of {mutated}")
    finally:
        stop.set()
        for client in grpc_clients.values():
            client.close()
        for c in conversations:
            c.join(90)
    fuzz_s = time.monotonic() - started
    assert not problems, "\n".join(problems)
    assert len(answered) >= 40 + 10, len(answered)
    assert not slow, f"slow refusals: {slow}"

    # every conversation ran through the whole fuzz, finished with HF's greedy tokens, and no
    # stream stalled meanwhile
    for c in conversations:
        assert c.failure is None, repr(c.failure)
        assert c.outlived_fuzz, f"conversation {c.index} ended before the fuzz did ({len(c.turns)} turns)"
        assert all(error is None for _, _, error in c.turns), [e for _, _, e in c.turns if e]
        assert hf_greedy_matches(hf_demo, c.turns), f"conversation {c.index}"
        assert c.max_gap < 3.0, f"conversation {c.index}: a {c.max_gap:.1f} s gap between responses"

    # the instances still serve, and the pool is back to baseline
    code, message, events = http_post(server.http_url, "llm_stateless",
                                      json.dumps({"input_ids": [256, 72, 105], "max_tokens": 4, **GREEDY}).encode())
    assert code == 200 and events[0]["output_ids"] == hf_greedy(hf_demo, [256, 72, 105], 4)[0]
    assert server.is_ready()
    checked_s = time.monotonic() - started
    assert wait_for_pool_baseline(server.metrics_url, timeout=15)
    print(f"\n{len(answered)} malformed requests answered in {fuzz_s:.1f} s (checked at {checked_s:.1f} s, "
          f"baseline at {time.monotonic() - started:.1f} s); "
          f"largest response gap {max(c.max_gap for c in conversations):.2f} s; "
          f"turns {[len(c.turns) for c in conversations]}")
