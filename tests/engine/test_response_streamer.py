"""The response sender thread: order, coalescing, stream_interval, errors (server/response_streamer.py)."""

import threading

from tritonkv.engine.requests import TurnOutput
from tritonkv.server.response_streamer import ResponseStreamer, merge_outputs


def test_merge_keeps_order_and_puts_errors_on_their_own():
    outs = [TurnOutput("a", [1]), TurnOutput("b", [2]), TurnOutput("", [], True, "error", error="bad"),
            TurnOutput("c", [3], True, "length", 4, 5)]
    merged = merge_outputs(outs)
    assert [(m.text, m.token_ids, m.finished, m.error) for m in merged] == [
        ("ab", [1, 2], False, None), ("", [], True, "bad"), ("c", [3], True, None)]
    assert (merged[2].finish_reason, merged[2].cached_tokens, merged[2].prompt_tokens) == ("length", 4, 5)


def test_a_blocked_sender_coalesces_and_loses_nothing():
    gate, got, done = threading.Event(), [], threading.Event()

    def send(out):
        gate.wait()
        got.append(out)
        if out.finished:
            done.set()

    streamer = ResponseStreamer()
    emit = streamer.channel(send)
    for t in range(10):
        emit(TurnOutput(str(t), [t]))
        streamer.flush()
    emit(TurnOutput("!", [10], True, "length"))
    streamer.flush()
    gate.set()
    assert done.wait(5)
    streamer.close()
    assert [t for o in got for t in o.token_ids] == list(range(11))
    assert "".join(o.text for o in got) == "0123456789!"
    assert len(got) < 11 and got[-1].finished and sum(o.finished for o in got) == 1


def test_stream_interval_sends_the_first_token_then_every_k():
    got, done = [], threading.Event()

    def send(out):
        got.append(list(out.token_ids))
        if out.finished:
            done.set()

    streamer = ResponseStreamer(stream_interval=4)
    emit = streamer.channel(send)
    for t in range(10):
        emit(TurnOutput("", [t]))
        streamer.flush()
        while streamer._ready or streamer._wake.is_set():  # let the sender take each flush
            pass
    emit(TurnOutput("", [10], True, "length"))
    streamer.flush()
    assert done.wait(5)
    streamer.close()
    assert [t for ids in got for t in ids] == list(range(11))
    assert got[0] == [0]  # the first token is never held back
    assert all(len(ids) <= 4 for ids in got[1:-1])
    assert len(got) <= 1 + 10 // 4 + 1


def test_nothing_is_sent_before_a_flush():
    got = []
    streamer = ResponseStreamer()
    emit = streamer.channel(got.append)
    emit(TurnOutput("a", [1]))
    emit(TurnOutput("b", [2], True, "length"))
    assert not streamer._wake.wait(0.05) and got == []
    streamer.flush()
    streamer.close()
    assert [o.token_ids for o in got] == [[1, 2]] and got[0].finished
