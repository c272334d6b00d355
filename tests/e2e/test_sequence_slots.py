"""Issue 13 item 4: Triton sequence slots of refused, closed and errored conversations.

What tritonserver 2.51's sequence batcher does (core r24.10, sequence_batch_scheduler.cc):
a correlation id holds a slot from its START until a request of it carrying END is
dispatched, a queued request of it is cancelled, or it has been idle for
max_sequence_idle_microseconds; an error answer frees nothing, and a START that finds no
free slot waits in the backlog. So:
- the model itself sends END (BLS, server/slot_release.py) for a START it refused, before
  the client sees the error, so refused STARTs hold no slot even from clients that never
  send END; and the shipped config has slots enough (65536 per instance);
- END is what frees a slot at once: shown here on a server whose llm has 4 slots, where 4
  open conversations hold every slot, a new conversation waits until one END arrives and is
  then served in well under 2 s.
"""

import os
import queue
import re
import shutil
import time

import pytest
import tritonclient.grpc as grpcclient

from polling import wait_until
from triton_calls import StreamClient, inputs_for, metric_values, wait_for_pool_baseline
from tritonkv.server.launcher import DEFAULT_REPOSITORY, start_server

POOL = f"slottest{os.getpid()}"
BAD_STARTS = 4096


@pytest.fixture(scope="module")
def server(e2e_server):
    return e2e_server  # the session's shared server (shared_server.py): the shipped config


class Stream:
    """One gRPC stream sending many requests without waiting; answers are counted."""

    def __init__(self, url):
        self.client = grpcclient.InferenceServerClient(url)
        self.answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def send(self, seq_id, start=False, end=False, ids=None):
        self.client.async_stream_infer("llm", inputs_for(ids=ids, max_tokens=1) if ids else [],
                                       sequence_id=seq_id, sequence_start=start, sequence_end=end,
                                       enable_empty_final_response=True)

    def collect(self, n, timeout=60):
        errors = []
        for _ in range(n):
            _, error = self.answers.get(timeout=timeout)
            errors.append(None if error is None else str(error))
        return errors

    def close(self):
        self.client.stop_stream()
        self.client.close()


def good_conversation(url, seq_id, timeout):
    """A new conversation's first turn; seconds until it was answered, or None."""
    client = StreamClient(url)
    t0 = time.monotonic()
    try:
        turn = client.turn(seq_id=seq_id, start=True, end=True, ids=[256, 65], max_tokens=2,
                           temperature=0.0, timeout=timeout)
    except queue.Empty:
        return None
    finally:
        client.close()
    assert turn.error is None and len(turn.ids) == 2, turn.error
    return time.monotonic() - t0


def test_refused_starts_do_not_block_a_new_conversation(server):
    bad = Stream(server.grpc_url)
    try:
        t0 = time.monotonic()
        for i in range(BAD_STARTS):  # out-of-vocabulary ids: the engine refuses each START
            bad.send(10_000 + i, start=True, ids=[10**9])
        errors = bad.collect(BAD_STARTS)
        sent_s = time.monotonic() - t0
        assert all(e and "outside the vocabulary" in e for e in errors), errors[:3]
        # the client sent no END; the server released each slot itself; a good client is served
        took = good_conversation(server.grpc_url, 7, timeout=10)
        assert took is not None and took < 2.0, f"good conversation after {BAD_STARTS} bad STARTs: {took}"
        # nothing stays live (the gauges are published every 0.5 s: one reading may predate
        # the good conversation's END)
        assert wait_for_pool_baseline(server.metrics_url, timeout=10)
        # a late END from the client is harmless: the id holds no slot and nothing is live
        for i in range(8):
            bad.send(10_000 + i, end=True)
        ended = bad.collect(8)
        assert all(e and ("is not live" in e or "START flag" in e) for e in ended), ended[:3]
        print(f"{BAD_STARTS} refused STARTs sent and answered in {sent_s:.2f}s; good turn in {took:.2f}s")
    finally:
        bad.close()


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """The same models, ``llm`` with 4 slots (a reload through model control would do it too,
    but tritonserver 2.51 once aborted with heap corruption reloading ``llm`` after thousands
    of sequences: not in this test)."""
    repo = tmp_path_factory.mktemp("slots") / "model_repository"
    shutil.copytree(DEFAULT_REPOSITORY, repo)
    cfg = repo / "llm" / "config.pbtxt"
    text, n = re.subn(r"max_candidate_sequences: \d+", "max_candidate_sequences: 4", cfg.read_text())
    assert n == 1
    cfg.write_text(text)
    with start_server(repository=str(repo), extra_params={"pool_name": POOL, "kv_cache_memory_mb": "32"}) as s:
        yield s


def test_end_frees_slots_of_refused_and_closed_conversations(small_server):
    server, slots = small_server, 4
    stream = Stream(server.grpc_url)
    try:
        # refused STARTs, no END from the client: the server frees their slots itself
        for i in range(3 * slots):
            stream.send(20_000 + i, start=True, ids=[10**9])
        assert all(stream.collect(3 * slots))
        took = good_conversation(server.grpc_url, 8, timeout=5)
        assert took is not None and took < 2.0, took
        # closed conversations (START ... END)
        for i in range(3 * slots):
            stream.send(30_000 + i, start=True, end=True, ids=[256])
        assert not any(stream.collect(3 * slots))
        took = good_conversation(server.grpc_url, 9, timeout=5)
        assert took is not None and took < 2.0, took
        # open conversations hold every slot: a new conversation waits ...
        for i in range(slots):
            stream.send(40_000 + i, start=True, ids=[256])
        assert not any(stream.collect(slots))
        waiting = StreamClient(server.grpc_url)
        try:
            waiting.client.async_stream_infer("llm", inputs_for(ids=[256, 65], max_tokens=2, temperature=0.0),
                                              sequence_id=10, sequence_start=True, sequence_end=True,
                                              enable_empty_final_response=True)
            try:
                early = waiting.results.get(timeout=1.5)
            except queue.Empty:
                early = None
            assert early is None, f"served while every slot was held: {early[1] or early[0].get_response()}"
            # ... until one END frees a slot; then it is served at once
            t0 = time.monotonic()
            stream.send(40_000, end=True)
            result, error = waiting.results.get(timeout=5)
            assert error is None and result.as_numpy("output_ids") is not None
            assert time.monotonic() - t0 < 2.0
        finally:
            waiting.close()
        for i in range(1, slots):
            stream.send(40_000 + i, end=True)
        stream.collect(slots)  # the four ENDs
    finally:
        stream.close()


def test_start_twice_on_one_id_never_ends_the_first_conversation(server):
    """Issue 21 item 5: a second START on an id is refused by the engine in submission order
    ("already live"), and that refusal frees no slot: the release END would end the first
    conversation. 50 ids, each START then START again at once, under one stream's load."""
    n = 50
    stream = Stream(server.grpc_url)
    try:
        for i in range(n):
            stream.send(50_000 + i, start=True, ids=[256, 65, 66])
            stream.send(50_000 + i, start=True, ids=[256, 67])
        errors = stream.collect(2 * n)
        refused = [e for e in errors if e is not None]
        assert len(refused) == n and all("already live" in e for e in refused), refused[:3]
        for i in range(n):  # every first conversation is still live: its next turn is served
            stream.send(50_000 + i, ids=[68])
        assert stream.collect(n) == [None] * n
        for i in range(n):
            stream.send(50_000 + i, end=True)
        stream.collect(n)
        # (the gauge follows the core's stats, published every 0.5 s)
        assert wait_until(lambda: not any(metric_values(server.metrics_url, "tritonkv_live_sequences")), 5)
    finally:
        stream.close()
