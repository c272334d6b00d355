"""Which open requests their clients cancelled, asked off the frontend's I/O thread.

Triton's ``request.is_cancelled`` is one round trip to the tritonserver process
(python_backend pb_cancel.cc: the stub queues the question and waits for the answer; 64 us
median on a 2-core CPU, bench/results/is_cancelled_cost_cpu.md). Asked of every open request
every 50 ms on the I/O thread, 256 open requests cost it a third of its time, time it did not
spend sending tokens. Here a thread of its own asks, a bounded number of times per tick.

Rules:
- Each tick (``TICK_S``) asks at most ``POLLS_PER_TICK`` open requests, in submission order
  and round robin: with n open requests a cancellation is noticed within
  ceil(n / POLLS_PER_TICK) ticks (256 open: 0.4 s). Answered requests leave the rotation
  when it reaches them, without counting against the budget.
- A question that fails (the stub shutting down, an IPC fault) is logged and the request
  stays in the rotation; the thread outlives any error (one that ended anyway is started
  again by the next ``add``).
- A request is asked only under its ``lock`` and while it is not answered: Triton frees a
  request's response factory with its final response, and asking after that is a use after
  free in the backend. Whoever delivers the request's outputs holds the same lock.
- The question releases the GIL while it waits, so the I/O thread runs meanwhile.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

log = logging.getLogger("tritonkv.frontend")

TICK_S = 0.05
POLLS_PER_TICK = 32


class CancelWatch:
    def __init__(self, lookup: Callable[[int], object], abort: Callable[[int], None], stop: threading.Event):
        self._lookup = lookup  # rid -> the open request (lock, emit, is_cancelled, cancel_sent) or None
        self._abort = abort
        self._stop = stop
        self._order: collections.deque[int] = collections.deque()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def add(self, rid: int) -> None:
        """Watch a submitted request (any thread)."""
        self._order.append(rid)
        if self._thread is None or not self._thread.is_alive():
            with self._start_lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="tritonkv-cancel-watch", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the watch must go on
                log.exception("cancellation check failed")

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)

    def tick(self) -> None:
        """Ask up to ``POLLS_PER_TICK`` open requests, one pass at most; those still open go
        to the back."""
        asked = 0
        for _ in range(len(self._order)):
            if asked >= POLLS_PER_TICK:
                return
            rid = self._order.popleft()
            req = self._lookup(rid)
            if req is None or req.is_cancelled is None:
                continue  # answered (or not cancellable): not asked again
            with req.lock:
                if req.cancel_sent or req.emit.done:
                    continue
                asked += 1
                try:
                    cancelled = req.is_cancelled()
                except Exception:  # noqa: BLE001 - asked again next round
                    log.exception("is_cancelled failed")
                    cancelled = False
                if cancelled:
                    req.cancel_sent = True
            if cancelled:
                self._abort(rid)
            else:
                self._order.append(rid)
