"""SIGINT, SIGTERM and SIGHUP turn into one ``threading.Event`` without a lock in the handler.

Rules:
- a Python signal handler runs on the main thread between any two of its bytecodes, also
  while that thread holds a lock (inside ``Event.wait``, the event's own condition lock): a
  handler that calls ``Event.set`` can deadlock the process for good. So the handler does
  nothing; the C-level handler writes the signal's number to a pipe
  (``signal.set_wakeup_fd``), and a watcher thread reading that pipe sets the event;
- ``received`` names the first stop signal (``"SIGTERM"``), None before one came;
- install from the main thread (``signal.signal``'s rule), once per process.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    def __init__(self, event: threading.Event, signals: tuple[int, ...] = STOP_SIGNALS):
        self.event = event
        self.received: str | None = None
        self._numbers = {int(s) for s in signals}
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # set_wakeup_fd's rule: the handler never blocks
        threading.Thread(target=self._watch, args=(read_fd,), name="tritonkv-stop-signals", daemon=True).start()
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, _nothing)

    def _watch(self, read_fd: int) -> None:
        while True:
            for number in os.read(read_fd, 64):
                if number in self._numbers:
                    if self.received is None:
                        self.received = signal.Signals(number).name
                    self.event.set()


def _nothing(signum, frame) -> None:
    """The Python-level handler: it must exist (the default would end the process at once)
    and must take no lock; the wakeup pipe carries the signal."""
