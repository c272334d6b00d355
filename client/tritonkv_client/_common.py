"""What the sync gRPC client (``grpc_client``) and the asyncio one (``aio``) share: the state of
one turn's responses, the state of a conversation, the client's settings and request
building. Nothing here reads or waits: each client adds its own I/O (a thread-fed queue, or
awaits) around these.

A stream object (``grpc_client._Stream``, ``aio._AsyncStream``) offers
``send(model, inputs, *, sequence_id, start, end, parameters) -> sent_at``,
``close(cancel=False)``, and the attributes ``busy`` and ``closed``.
"""

from __future__ import annotations

import random

from tritonkv_client._responses import parse_grpc_result
from tritonkv_client.errors import ServerError
from tritonkv_client.params import DEFAULT_TIMEOUT_S, GenerationParams, grpc_inputs, salt_parameters
from tritonkv_client.result import GenerationResult, ResultBuilder, TokenDelta


def new_sequence_id() -> int:
    """A random non-zero uint64 correlation id (0 means "no sequence" to Triton)."""
    return random.getrandbits(63) or 1


class TurnState:
    """The responses of one request read so far: the result being built, and how it ended
    (``done``; ``_error`` is None when it ended with its final response)."""

    def __init__(self, stream, model: str, sent_at: float, timeout_s: float, on_done=None):
        self._stream = stream
        self._model = model
        self._builder = ResultBuilder(sent_at)
        self._timeout_s = timeout_s
        self._on_done = on_done
        self._error: ServerError | None = None
        self.done = False

    def cancel(self) -> None:
        """Stop reading a reply before its end: the request is cancelled on the server (for a
        conversation this ends it: the server releases its KV) and its stream is closed."""
        if not self.done:
            self._stream.close(cancel=True)
            self._finish(ServerError("cancelled by the client", model=self._model, status="cancelled"))

    def _on_result(self, result, at: float) -> TokenDelta:
        """One gRPC response, received at ``at``; the final one ends the turn."""
        parsed = parse_grpc_result(result)
        delta = self._builder.add_response(parsed, at)
        if parsed.final:
            self._finish(None)
        return delta

    def _on_error(self, error) -> ServerError:
        """A gRPC error in place of a response: ends the turn; returns the error to raise."""
        return self._finish(ServerError(error.message() or str(error), model=self._model, status=error.status()))

    def _timed_out(self) -> ServerError:
        return self._finish(ServerError(f"no response from model {self._model!r} in {self._timeout_s}s",
                                        model=self._model, status="timeout"))

    def _finish(self, error):
        self.done = True
        self._error = error
        self._stream.busy = False
        if self._on_done is not None:
            self._on_done(self)
        return error


class ConversationState:
    """The state of one conversation (``grpc_client.Conversation`` says the rules): its
    correlation id, whether START was sent, whether it is over (a turn sent with ``end=True``,
    a cancelled turn, ``close()``), its finished turns and its stream. Subclasses set
    ``_turn_type`` and give ``_new_stream`` / ``_return_stream``."""

    _turn_type: type = TurnState

    def __init__(self, client, sequence_id: int | str | None = None, *, cache_salt: str | None = None,
                 params: GenerationParams | None = None):
        self.client = client
        self.sequence_id = new_sequence_id() if sequence_id is None else sequence_id
        self.cache_salt = cache_salt
        self.params = params or client.params
        self.turns: list[GenerationResult] = []
        self.started = False  # START was sent and accepted
        self.ended = False
        # close() sends a bare END and ignores its answer: after a cancel (the turn may have
        # finished on the server before the cancel arrived, leaving the conversation open) and
        # after a failed opening turn (Triton's sequence batcher holds a slot for the sequence
        # id until an END or its idle timeout, even when the model refused the START)
        self.best_effort_end = False
        self._stream = None
        self._current = None

    def _new_stream(self):
        raise NotImplementedError

    def _return_stream(self, stream) -> None:
        raise NotImplementedError

    def _check_turn(self, prompt, input_ids) -> None:
        if self.ended:
            raise RuntimeError(f"conversation {self.sequence_id} is over; start a new one")
        if prompt is None and input_ids is None:
            raise ValueError("a turn needs a prompt (text or input_ids); use close() to end the conversation")

    def _open_stream(self):
        if self._stream is None or self._stream.closed:  # the sequence id, not the stream, is the conversation
            self._stream = self._new_stream()
        return self._stream

    def _send_turn(self, prompt, input_ids, end: bool, settings: dict):
        """Send one turn on the open stream (the previous turn read to its end); its turn object."""
        params = self.params.merged(**settings)
        inputs = grpc_inputs(prompt, input_ids, params, stream=True)
        sent_at = self._stream.send(self.client.model, inputs, sequence_id=self.sequence_id,
                                    start=not self.started, end=end, parameters=salt_parameters(self.cache_salt, params))
        self.started = True
        self.ended = end
        self._current = self._turn_type(self._stream, self.client.model, sent_at, self.client.timeout_s,
                                        on_done=self._turn_done)
        return self._current

    def _closed(self) -> bool:
        """Over, and its stream given back: ``close()`` has nothing to do."""
        return self.ended and self._stream is None and not self.best_effort_end

    def _send_end(self):
        """The bare END of ``close()`` when the last turn did not carry it (None: nothing to send);
        its turn object, to be read to the end."""
        if self.best_effort_end:
            self.best_effort_end = False
        elif not self.started or self.ended:
            return None
        self.ended = True
        stream = self._open_stream()
        sent_at = stream.send(self.client.model, [], sequence_id=self.sequence_id, end=True)
        return self._turn_type(stream, self.client.model, sent_at, self.client.timeout_s)

    def _turn_done(self, turn: TurnState) -> None:
        if turn._error is None:
            self.turns.append(turn._builder.result)
            self.best_effort_end = False
        elif getattr(turn._error, "status", None) == "cancelled":
            self.ended = True  # a cancelled turn ends the conversation on the server ...
            self.best_effort_end = self.started  # ... unless it had finished there first
        elif not self.turns:
            self.started = False  # the opening turn failed: nothing is live on the server ...
            self.best_effort_end = True  # ... but Triton may hold a sequence slot for it
        if self.ended:
            self._give_back()

    def _give_back(self) -> None:
        """The conversation is over: its stream goes back (or is closed)."""
        self.ended = True
        stream, self._stream = self._stream, None
        if stream is not None:
            self._return_stream(stream)


class ClientSettings:
    """A gRPC client's address, models, timeout and default generation settings; every request
    may override the settings. Subclasses set ``_conversation_type`` and give ``_connect``."""

    _conversation_type: type = ConversationState

    def __init__(self, url: str, *, model: str = "llm", stateless_model: str = "llm_stateless",
                 timeout_s: float = DEFAULT_TIMEOUT_S, **settings):
        self.url = url
        self.model = model
        self.stateless_model = stateless_model
        self.timeout_s = timeout_s
        self.params = GenerationParams().merged(**settings)
        self._connect()

    def _connect(self) -> None:
        """Set up the transport (called at the end of ``__init__``)."""

    def conversation(self, sequence_id: int | str | None = None, *, cache_salt: str | None = None, **settings):
        """A new conversation on ``model``; ``settings`` are the defaults of its turns."""
        return self._conversation_type(self, sequence_id, cache_salt=cache_salt, params=self.params.merged(**settings))

    def _one_shot(self, prompt, input_ids, cache_salt, model, settings: dict) -> tuple[str, list, dict | None]:
        """(model, inputs, parameters) of one request on ``stateless_model`` (unless ``model``
        is given), built before a stream is taken."""
        model = model or self.stateless_model
        params = self.params.merged(**settings)
        inputs = grpc_inputs(prompt, input_ids, params, stream=True)
        return model, inputs, salt_parameters(cache_salt, params)


class Closing:
    """``with obj:`` calls ``obj.close()`` at the end."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClosing:
    """``async with obj:`` awaits ``obj.close()`` at the end."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
