"""CancelWatch: Triton's ``is_cancelled`` (one round trip to the server each) is asked a bounded
number of times per tick, round robin, never of a request already answered (its response
factory is freed then), and never while its outputs are being delivered."""

import threading
import time
from types import SimpleNamespace

from polling import wait_until
from tritonkv.core.cancel_watch import POLLS_PER_TICK, CancelWatch


class Emit:
    def __init__(self):
        self.done = False


class Req:
    def __init__(self, rid, log, cancelled=False):
        self.rid, self.log, self.cancelled = rid, log, cancelled
        self.emit = Emit()
        self.cancel_sent = False
        self.lock = threading.Lock()
        self.fails = 0  # the next calls that raise
        self.late = []  # questions asked after the request was answered (a use after free in Triton)

    def is_cancelled(self):
        if self.emit.done:
            self.late.append(self.rid)
        if self.fails:
            self.fails -= 1
            raise RuntimeError("stub is shutting down")
        self.log.append(self.rid)
        return self.cancelled


def watch_of(reqs):
    aborted = []
    watch = CancelWatch(reqs.get, aborted.append, threading.Event())
    watch._thread = SimpleNamespace(is_alive=lambda: True)  # ticks are driven by the test: no thread
    for rid in reqs:
        watch.add(rid)
    return watch, aborted


def test_each_tick_asks_at_most_its_share_round_robin_and_aborts_a_cancelled_request_once():
    asked = []
    reqs = {rid: Req(rid, asked) for rid in range(1, 41)}
    reqs[5].cancelled = True
    watch, aborted = watch_of(reqs)
    watch.tick()
    assert asked == list(range(1, POLLS_PER_TICK + 1)) and aborted == [5]
    asked.clear()
    watch.tick()
    # the 8 not asked yet, then the front again; request 5 is not asked again
    assert asked == list(range(33, 41)) + [r for r in range(1, 26) if r != 5][:POLLS_PER_TICK - 8]
    assert aborted == [5] and reqs[5].cancel_sent


def test_answered_or_finished_requests_are_not_asked_and_cost_no_budget():
    asked = []
    reqs = {rid: Req(rid, asked) for rid in range(1, 101)}
    watch, aborted = watch_of(reqs)
    for rid in range(1, 91):  # 90 answered (final response sent) or forgotten
        if rid % 2:
            reqs[rid].emit.done = True
        else:
            del reqs[rid]
    watch.tick()
    assert asked == list(range(91, 101)) and aborted == []  # the 10 open ones, in one tick
    assert list(watch._order) == list(range(91, 101))  # the answered left the rotation
    assert all(not r.late for r in reqs.values())


def test_a_failing_question_is_logged_and_asked_again_next_round():
    asked = []
    reqs = {1: Req(1, asked), 2: Req(2, asked)}
    reqs[1].fails = 1
    watch, aborted = watch_of(reqs)
    watch.tick()
    assert asked == [2]
    reqs[1].cancelled = True
    watch.tick()
    assert asked == [2, 1, 2] and aborted == [1]


def test_the_thread_outlives_a_failing_tick_and_aborts_later_cancels():
    asked = []
    reqs = {1: Req(1, asked)}
    stop = threading.Event()
    aborted = []
    watch = CancelWatch(reqs.get, aborted.append, stop)
    real_tick = watch.tick
    calls = []

    def tick():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        real_tick()

    watch.tick = tick
    watch.add(1)
    reqs[1].cancelled = True
    try:
        assert wait_until(lambda: aborted == [1], 5)
    finally:
        stop.set()
        watch.join(5)


def test_a_request_is_not_asked_while_its_final_response_is_being_delivered():
    asked = []
    reqs = {1: Req(1, asked)}
    watch, _ = watch_of(reqs)
    reqs[1].lock.acquire()  # the I/O thread delivering request 1's outputs
    ticked = threading.Thread(target=watch.tick)
    ticked.start()
    time.sleep(0.2)
    assert asked == []  # the watch waits for the delivery
    reqs[1].emit.done = True  # the delivery was the final response
    reqs[1].lock.release()
    ticked.join(5)
    assert not ticked.is_alive() and asked == [] and reqs[1].late == []
