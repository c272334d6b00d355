"""Sends a model instance's responses on a thread of their own, off the engine's step loop.

Rules:
- The engine thread only queues a turn's outputs (``push``); the sender thread turns them
  into Triton responses.
- Wake-ups are batched: ``emit`` only marks a stream ready; ``flush`` (the engine calls it
  once per loop iteration, after a step's outputs) wakes the sender once for all of them, so
  the two threads trade the GIL once per step, not once per token.
- Coalescing: when the sender finds several outputs of one request waiting, it sends them as
  one response (text and ids concatenated, the last one's finish facts). A stream that keeps
  up gets one response per token; one that falls behind catches up in fewer, larger
  responses. Nothing waits on purpose: the first token goes out as soon as the sender is free.
- ``stream_interval`` k (as vLLM's): after a request's first response, its tokens are
  handed to the sender once k of them are waiting (or the turn ends); 1 sends every token.
- An error output is never merged: the tokens queued before it go first, then the error.
- Order per request is the order of ``push``; a request's final response is its last.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from tritonkv.engine.requests import TurnOutput

log = logging.getLogger("tritonkv.server")


def merge_outputs(outs: list[TurnOutput]) -> list[TurnOutput]:
    """Coalesce consecutive token outputs; an error output stays on its own."""
    merged: list[TurnOutput] = []
    run: list[TurnOutput] = []

    def flush():
        if not run:
            return
        last = run[-1]
        logprobs = None if all(o.logprobs is None for o in run) else [e for o in run for e in o.logprobs or []]
        merged.append(TurnOutput("".join(o.text for o in run), [t for o in run for t in o.token_ids],
                                 last.finished, last.finish_reason, last.cached_tokens, last.prompt_tokens,
                                 logprobs=logprobs))
        run.clear()

    for out in outs:
        if out.error is not None:
            flush()
            merged.append(out)
        else:
            run.append(out)
    flush()
    return merged


class _Stream:
    __slots__ = ("send", "pending", "queued", "started", "waiting_tokens")

    def __init__(self, send: Callable[[TurnOutput], None]):
        self.send = send
        self.pending: list[TurnOutput] = []
        self.queued = False
        self.started = False  # its first output was handed to the sender
        self.waiting_tokens = 0


class ResponseStreamer:
    def __init__(self, stream_interval: int = 1):
        self.stream_interval = stream_interval
        self._lock = threading.Lock()
        self._ready: list[_Stream] = []  # marked by emit, taken by the sender after a flush
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tritonkv-responses", daemon=True)
        self.responses_sent = 0
        self.outputs_pushed = 0
        self._thread.start()

    def channel(self, send: Callable[[TurnOutput], None]) -> Callable[[TurnOutput], None]:
        """An ``emit`` for one request: queues outputs for ``send`` on the sender thread (sent
        after the next ``flush``)."""
        stream = _Stream(send)

        def emit(out: TurnOutput) -> None:
            with self._lock:
                stream.pending.append(out)
                self.outputs_pushed += 1
                stream.waiting_tokens += len(out.token_ids)
                if stream.queued:
                    return
                if (stream.started and not out.finished and out.error is None
                        and stream.waiting_tokens < self.stream_interval):
                    return
                stream.queued = stream.started = True
                stream.waiting_tokens = 0
                self._ready.append(stream)

        return emit

    def flush(self) -> None:
        """Wake the sender if anything is ready (cheap when nothing is)."""
        if self._ready:
            self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                ready, self._ready = self._ready, []
                batches = []
                for stream in ready:
                    batches.append((stream, stream.pending))
                    stream.pending = []
                    stream.queued = False
            for stream, outs in batches:
                for out in merge_outputs(outs):
                    try:
                        stream.send(out)
                        self.responses_sent += 1
                    except Exception:  # a vanished client must not stop the sender
                        log.exception("could not deliver a response")
            if self._closed and not self._ready:
                return
