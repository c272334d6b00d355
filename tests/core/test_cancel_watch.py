"""CancelWatch: Triton's ``is_cancelled`` (one round trip to the server each) is asked a bounded
number of times per tick, round robin, never of a request already answered (its response
factory is freed then), and never while its outputs are being delivered."""

import threading
import time

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

    def is_cancelled(self):
        assert not self.emit.done, f"request {self.rid} asked after it was answered"
        self.log.append(self.rid)
        return self.cancelled


def watch_of(reqs):
    aborted = []
    watch = CancelWatch(reqs.get, aborted.append, threading.Event())
    watch._thread = object()  # ticks are driven by the test, no thread of its own
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


def test_answered_or_finished_requests_are_not_asked_and_leave_the_rotation():
    asked = []
    reqs = {1: Req(1, asked), 2: Req(2, asked), 3: Req(3, asked)}
    watch, aborted = watch_of(reqs)
    reqs[2].emit.done = True  # its final response went out (Req.is_cancelled asserts it is not asked)
    del reqs[3]  # the core finished it: the client forgot it
    watch.tick()
    watch.tick()
    assert asked == [1, 1] and aborted == []


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
    assert not ticked.is_alive() and asked == []
