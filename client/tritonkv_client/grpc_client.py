"""Synchronous gRPC client: streaming generation and conversations on the ``llm`` model.

Rules:
- one gRPC stream carries at most one request in flight: tritonclient's stream callback gets
  errors without a request id, so an error could not be attributed otherwise. A
  ``Conversation`` holds its own stream for its lifetime; one-shot requests borrow an idle one.
- a stream whose request was abandoned mid-reply is closed with cancellation, never reused.
"""

from __future__ import annotations

import queue
import threading
import time

import tritonclient.grpc as grpcclient

from tritonkv_client._common import ClientSettings, Closing, ConversationState, TurnState, new_sequence_id
from tritonkv_client.errors import ServerError
from tritonkv_client.params import DEFAULT_TIMEOUT_S
from tritonkv_client.result import DeltaStream, GenerationResult, TokenDelta

__all__ = ["Client", "Conversation", "TurnStream", "DEFAULT_TIMEOUT_S", "new_sequence_id"]


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


class TurnStream(TurnState, DeltaStream):
    """The responses of one request. Iterate for ``TokenDelta``s as they arrive; ``result()``
    reads to the end and returns the ``GenerationResult``. A server error is raised as
    ``ServerError`` from whichever of the two reads it. ``cancel()`` stops early."""

    def _read_one(self) -> TokenDelta:
        try:
            at, result, error = self._stream.responses.get(timeout=self._timeout_s)
        except queue.Empty:
            self._stream.close(cancel=True)  # a late reply must not reach the next request
            raise self._timed_out() from None
        if error is not None:
            if error.status() is not None:  # a gRPC status, not a model's error response: the stream is gone
                self._stream.close(cancel=True)
            raise self._on_error(error)
        return self._on_result(result, at)


class Conversation(ConversationState, Closing):
    """One conversation on ``llm``: owns a correlation id; the first turn sends START, ``close()``
    (or leaving the ``with`` block) sends END. Each ``send`` appends only the new text; the
    server keeps the KV of everything before it.

    Rules: turns are sequential (sending while the previous turn still streams first reads that
    turn to its end); after ``send(..., end=True)`` or ``close()`` the conversation is over."""

    _turn_type = TurnStream

    def send(self, prompt: str | None = None, *, input_ids=None, end: bool = False, **settings) -> TurnStream:
        """Send one turn; returns its ``TurnStream`` (iterate it for tokens, or call ``result()``)."""
        self._check_turn(prompt, input_ids)
        self._drain()
        self._open_stream()
        return self._send_turn(prompt, input_ids, end, settings)

    def ask(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        """``send`` and wait for the whole turn."""
        return self.send(prompt, **kwargs).result()

    def close(self) -> None:
        """Finish the current turn and send END (a bare END when the last turn did not carry it).
        Idempotent; a conversation that never started sends nothing."""
        if self._closed():
            return
        best_effort = self.best_effort_end
        try:
            self._drain()
            closing = self._send_end()
            if closing is not None:
                try:
                    closing.result()
                except ServerError:
                    if not best_effort:  # after a cancel or a failed opening it may be gone already
                        raise
        finally:
            self._give_back()

    def _drain(self) -> None:
        if self._current is not None and not self._current.done:
            try:
                self._current.result()
            except ServerError:
                pass  # it was the caller's to read; the conversation goes on

    def _new_stream(self) -> _Stream:
        return self.client._acquire()

    def _return_stream(self, stream: _Stream) -> None:
        self.client._release(stream)


class Client(ClientSettings, Closing):
    """``Client("127.0.0.1:8001")``: gRPC to a tritonkv server. Settings given here are the
    defaults of every request; each call may override them."""

    _conversation_type = Conversation

    def _connect(self) -> None:
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

    # -- requests --------------------------------------------------------------------------
    def generate_stream(self, prompt: str | None = None, *, input_ids=None, cache_salt: str | None = None,
                        model: str | None = None, **settings) -> TurnStream:
        """One independent request on ``llm_stateless`` streamed token by token."""
        model, inputs, parameters = self._one_shot(prompt, input_ids, cache_salt, model, settings)
        stream = self._acquire()
        try:
            sent_at = stream.send(model, inputs, parameters=parameters)
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
