"""Synchronous gRPC client: streaming generation and conversations on the ``llm`` model.

Rules:
- one gRPC stream carries at most one request in flight: tritonclient's stream callback gets
  errors without a request id, so an error could not be attributed otherwise. A
  ``Conversation`` holds its own stream for its lifetime; one-shot requests borrow an idle one.
- a stream whose request was abandoned mid-reply is closed with cancellation, never reused.
"""

from __future__ import annotations

import queue
import random
import threading
import time

import tritonclient.grpc as grpcclient

from tritonkv_client._responses import parse_grpc_result
from tritonkv_client.errors import ServerError
from tritonkv_client.params import GenerationParams, grpc_inputs
from tritonkv_client.result import GenerationResult, ResultBuilder, TokenDelta

DEFAULT_TIMEOUT_S = 300.0


def new_sequence_id() -> int:
    """A random non-zero uint64 correlation id (0 means "no sequence" to Triton)."""
    return random.getrandbits(63) or 1


class _Stream:
    """One ``InferenceServerClient`` with its bidirectional stream and response queue."""

    def __init__(self, url: str, **client_kwargs):
        self.client = grpcclient.InferenceServerClient(url, **client_kwargs)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=self._on_response)
        self.busy = False  # a request's final response has not been read yet
        self.closed = False

    def _on_response(self, result, error):
        self.responses.put((time.perf_counter(), result, error))

    def send(self, model: str, inputs, *, sequence_id=0, start=False, end=False, parameters=None) -> float:
        self.busy = True
        sent_at = time.perf_counter()
        self.client.async_stream_infer(model_name=model, inputs=inputs, sequence_id=sequence_id,
                                       sequence_start=start, sequence_end=end, parameters=parameters or None,
                                       enable_empty_final_response=True)
        return sent_at

    def close(self, cancel: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.client.stop_stream(cancel_requests=cancel)
        finally:
            self.client.close()


class TurnStream:
    """The responses of one request. Iterate for ``TokenDelta``s as they arrive; ``result()``
    reads to the end and returns the ``GenerationResult``. A server error is raised as
    ``ServerError`` from whichever of the two reads it."""

    def __init__(self, stream: _Stream, model: str, sent_at: float, timeout_s: float, on_done=None):
        self._stream = stream
        self._model = model
        self._builder = ResultBuilder(sent_at)
        self._timeout_s = timeout_s
        self._on_done = on_done
        self._error: ServerError | None = None
        self.done = False

    def __iter__(self):
        return self

    def __next__(self) -> TokenDelta:
        while not self.done:
            delta = self._read_one()
            if delta is not None and (delta.token_ids or delta.text):
                return delta
        if self._error is not None:
            raise self._error
        raise StopIteration

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        return self._builder.result

    def cancel(self) -> None:
        """Stop reading a reply before its end: the request is cancelled on the server (for a
        conversation this ends it: the server releases its KV) and its stream is closed."""
        if not self.done:
            self._stream.close(cancel=True)
            self._finish(ServerError("cancelled by the client", model=self._model, status="cancelled"))

    def _read_one(self) -> TokenDelta | None:
        try:
            at, result, error = self._stream.responses.get(timeout=self._timeout_s)
        except queue.Empty:
            self._stream.close(cancel=True)  # a late reply must not reach the next request
            self._finish(ServerError(f"no response from model {self._model!r} in {self._timeout_s}s",
                                     model=self._model, status="timeout"))
            raise self._error from None
        if error is not None:
            if error.status() is not None:  # a gRPC status, not a model's error response: the stream is gone
                self._stream.close(cancel=True)
            self._finish(ServerError(error.message() or str(error), model=self._model, status=error.status()))
            raise self._error
        parsed = parse_grpc_result(result)
        delta = self._builder.add_tokens(parsed.ids, parsed.text, at)
        if parsed.final:
            self._builder.finish(at, parsed.finish_reason, parsed.cached_tokens, parsed.prompt_tokens)
            self._finish(None)
        return delta

    def _finish(self, error: ServerError | None) -> None:
        self.done = True
        self._error = error
        self._stream.busy = False
        if self._on_done is not None:
            self._on_done(self)


class Client:
    """``Client("127.0.0.1:8001")``: gRPC to a tritonkv server. Settings given here are the
    defaults of every request; each call may override them."""

    def __init__(self, url: str, *, model: str = "llm", stateless_model: str = "llm_stateless",
                 timeout_s: float = DEFAULT_TIMEOUT_S, **settings):
        self.url = url
        self.model = model
        self.stateless_model = stateless_model
        self.timeout_s = timeout_s
        self.params = GenerationParams().merged(**settings)
        self._idle: list[_Stream] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- streams ---------------------------------------------------------------------------
    def _acquire(self) -> _Stream:
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            if self._idle:
                return self._idle.pop()
        return _Stream(self.url)

    def _release(self, stream: _Stream) -> None:
        if stream.busy or stream.closed:  # abandoned mid-reply: cancelled, never reused
            if not stream.closed:
                stream.close(cancel=True)
            return
        with self._lock:
            if not self._closed:
                self._idle.append(stream)
                return
        stream.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for stream in idle:
            stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- requests --------------------------------------------------------------------------
    def generate_stream(self, prompt: str | None = None, *, input_ids=None, cache_salt: str | None = None,
                        model: str | None = None, **settings) -> TurnStream:
        """One independent request on ``llm_stateless`` streamed token by token."""
        model = model or self.stateless_model
        params = self.params.merged(**settings)
        stream = self._acquire()
        try:
            sent_at = stream.send(model, grpc_inputs(prompt, input_ids, params, stream=True),
                                  parameters=_salt(cache_salt))
        except Exception:
            stream.close(cancel=True)
            raise
        return TurnStream(stream, model, sent_at, self.timeout_s, on_done=lambda _t: self._release(stream))

    def generate(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        """One independent request, streamed and collected (so TTFT and inter-token times are real)."""
        turn = self.generate_stream(prompt, **kwargs)
        try:
            return turn.result()
        finally:
            turn.cancel()  # no-op once read to the end

    def conversation(self, sequence_id: int | str | None = None, *, cache_salt: str | None = None,
                     **settings) -> "Conversation":
        return Conversation(self, sequence_id, cache_salt=cache_salt, params=self.params.merged(**settings))


class Conversation:
    """One conversation on ``llm``: owns a correlation id; the first turn sends START, ``close()``
    (or leaving the ``with`` block) sends END. Each ``send`` appends only the new text; the
    server keeps the KV of everything before it.

    Rules: turns are sequential (sending while the previous turn still streams first reads that
    turn to its end); after ``send(..., end=True)`` or ``close()`` the conversation is over."""

    def __init__(self, client: Client, sequence_id: int | str | None = None, *, cache_salt: str | None = None,
                 params: GenerationParams | None = None):
        self.client = client
        self.sequence_id = new_sequence_id() if sequence_id is None else sequence_id
        self.cache_salt = cache_salt
        self.params = params or client.params
        self.turns: list[GenerationResult] = []
        self.started = False  # START was sent and accepted
        self.ended = False
        self._stream: _Stream | None = None
        self._current: TurnStream | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, prompt: str | None = None, *, input_ids=None, end: bool = False, **settings) -> TurnStream:
        """Send one turn; returns its ``TurnStream`` (iterate it for tokens, or call ``result()``)."""
        if self.ended:
            raise RuntimeError(f"conversation {self.sequence_id} is over; start a new one")
        if prompt is None and input_ids is None:
            raise ValueError("a turn needs a prompt (text or input_ids); use close() to end the conversation")
        self._drain()
        if self._stream is None or self._stream.closed:  # the sequence id, not the stream, is the conversation
            self._stream = self.client._acquire()
        params = self.params.merged(**settings)
        start = not self.started
        sent_at = self._stream.send(self.client.model, grpc_inputs(prompt, input_ids, params, stream=True),
                                    sequence_id=self.sequence_id, start=start, end=end,
                                    parameters=_salt(self.cache_salt))
        self.started = True
        self.ended = end
        self._current = TurnStream(self._stream, self.client.model, sent_at, self.client.timeout_s,
                                   on_done=self._turn_done)
        return self._current

    def ask(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        """``send`` and wait for the whole turn."""
        return self.send(prompt, **kwargs).result()

    def _turn_done(self, turn: TurnStream) -> None:
        if turn._error is None:
            self.turns.append(turn._builder.result)
        elif turn._error.status == "cancelled":
            self.ended = True  # a cancelled turn ends the conversation on the server
        elif not self.turns:
            self.started = False  # the opening turn failed: nothing is live on the server
        if self.ended:
            self._give_back()

    def _drain(self) -> None:
        if self._current is not None and not self._current.done:
            try:
                self._current.result()
            except ServerError:
                pass  # it was the caller's to read; the conversation goes on

    def close(self) -> None:
        """Finish the current turn and send END (a bare END when the last turn did not carry it).
        Idempotent; a conversation that never started sends nothing."""
        if self.ended and self._stream is None:
            return
        try:
            self._drain()
            if self.started and not self.ended:
                self.ended = True
                if self._stream is None or self._stream.closed:
                    self._stream = self.client._acquire()
                sent_at = self._stream.send(self.client.model, [], sequence_id=self.sequence_id, end=True)
                closing = TurnStream(self._stream, self.client.model, sent_at, self.client.timeout_s)
                closing.result()
        finally:
            self.ended = True
            self._give_back()

    def _give_back(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            self.client._release(stream)


def _salt(cache_salt: str | None) -> dict | None:
    return None if cache_salt is None else {"cache_salt": cache_salt}
