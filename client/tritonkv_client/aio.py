"""asyncio client: the same conversations and one-shot streams as ``grpc_client``, on
``tritonclient.grpc.aio``; plus HTTP ``generate`` / ``generate_stream`` on httpx (events read by httpx-sse).

Each conversation and each one-shot request runs its own gRPC stream (a call on one shared
channel), so an error always belongs to the request that is in flight on it. The aio stream
cannot ask for the flagged empty final response; a request's final response is the one that
carries ``finish_reason`` (the server always sends it last).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import tritonclient.grpc.aio as grpcaio
from httpx_sse import aconnect_sse

from tritonkv_client._common import AsyncClosing, ClientSettings, ConversationState, TurnState
from tritonkv_client._responses import error_from_response, parse_json_event, reply_result
from tritonkv_client.errors import ProtocolError, ServerError
from tritonkv_client.http_client import base_url
from tritonkv_client.params import DEFAULT_TIMEOUT_S, GenerationParams, request_body
from tritonkv_client.result import GenerationResult, ResultBuilder, TokenDelta

_CLOSE = object()


class _AsyncStream:
    def __init__(self, client: grpcaio.InferenceServerClient):
        self._requests: asyncio.Queue = asyncio.Queue()
        self._responses = client.stream_infer(self._request_iter())
        self.busy = False
        self.closed = False

    async def _request_iter(self):
        while True:
            request = await self._requests.get()
            if request is _CLOSE:
                return
            yield request

    def send(self, model: str, inputs, *, sequence_id=0, start=False, end=False, parameters=None) -> float:
        self.busy = True
        sent_at = time.perf_counter()
        self._requests.put_nowait(dict(model_name=model, inputs=inputs, sequence_id=sequence_id,
                                       sequence_start=start, sequence_end=end, parameters=parameters))
        return sent_at

    async def next_response(self, timeout_s: float):
        return await asyncio.wait_for(self._responses.__anext__(), timeout_s)

    def close(self, cancel: bool = False) -> None:
        self.closed = True
        if cancel:
            self._responses.cancel()
        self._requests.put_nowait(_CLOSE)


class AsyncTurnStream(TurnState):
    """``async for delta in turn``; ``await turn.result()``. Server errors raise ``ServerError``."""

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenDelta:
        while not self.done:
            delta = await self._read_one()
            if not delta.empty:
                return delta
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    async def result(self) -> GenerationResult:
        async for _ in self:
            pass
        return self._builder.result

    async def _read_one(self) -> TokenDelta:
        try:
            result, error = await self._stream.next_response(self._timeout_s)
        except asyncio.TimeoutError:
            raise self._timed_out() from None
        except StopAsyncIteration:
            raise self._finish(ProtocolError(f"{self._model}: stream closed before the final response")) from None
        at = time.perf_counter()
        if error is not None:
            raise self._on_error(error)
        return self._on_result(result, at)


class AsyncConversation(ConversationState, AsyncClosing):
    """asyncio twin of ``grpc_client.Conversation``: ``async with client.conversation() as c:``;
    ``turn = await c.send("...")``; ``async for delta in turn``; END on ``await c.close()``."""

    _turn_type = AsyncTurnStream

    async def send(self, prompt: str | None = None, *, input_ids=None, end: bool = False,
                   **settings) -> AsyncTurnStream:
        self._check_turn(prompt, input_ids)
        await self._drain()
        self._open_stream()
        return self._send_turn(prompt, input_ids, end, settings)

    async def ask(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        return await (await self.send(prompt, **kwargs)).result()

    async def close(self) -> None:
        if self._closed():
            return
        best_effort = self.best_effort_end
        try:
            await self._drain()
            closing = self._send_end()
            if closing is not None:
                try:
                    await closing.result()
                except ServerError:
                    if not best_effort:  # after a cancel or a failed opening it may be gone already
                        raise
        finally:
            self._give_back()

    async def _drain(self) -> None:
        if self._current is not None and not self._current.done:
            try:
                await self._current.result()
            except ServerError:
                pass

    def _new_stream(self) -> _AsyncStream:
        return _AsyncStream(self.client._client)

    def _return_stream(self, stream: _AsyncStream) -> None:
        stream.close()


class AsyncClient(ClientSettings, AsyncClosing):
    """``async with AsyncClient("127.0.0.1:8001") as client:`` gRPC (asyncio)."""

    _conversation_type = AsyncConversation

    def _connect(self) -> None:
        self._client = grpcaio.InferenceServerClient(self.url)

    async def close(self) -> None:
        await self._client.close()

    def generate_stream(self, prompt: str | None = None, *, input_ids=None, cache_salt: str | None = None,
                        model: str | None = None, **settings) -> AsyncTurnStream:
        model, inputs, parameters = self._one_shot(prompt, input_ids, cache_salt, model, settings)
        stream = _AsyncStream(self._client)
        sent_at = stream.send(model, inputs, parameters=parameters)
        return AsyncTurnStream(stream, model, sent_at, self.timeout_s, on_done=lambda _t: stream.close())

    async def generate(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        turn = self.generate_stream(prompt, **kwargs)
        try:
            return await turn.result()
        finally:
            turn.cancel()


class AsyncHttpClient(AsyncClosing):
    """HTTP ``generate`` / ``generate_stream`` on ``llm_stateless`` over httpx."""

    def __init__(self, url: str, *, model: str = "llm_stateless", timeout_s: float = DEFAULT_TIMEOUT_S, **settings):
        self.base = base_url(url)
        self.model = model
        self.params = GenerationParams().merged(**settings)
        self._http = httpx.AsyncClient(timeout=timeout_s)

    async def close(self) -> None:
        await self._http.aclose()

    async def generate(self, prompt: str | None = None, *, input_ids=None, model: str | None = None,
                       **settings) -> GenerationResult:
        model = model or self.model
        body = request_body(prompt, input_ids, self.params.merged(**settings), stream=False)
        sent_at = time.perf_counter()
        r = await self._http.post(f"{self.base}/v2/models/{model}/generate", json=body)
        at = time.perf_counter()
        if r.status_code != 200:
            raise error_from_response(r, model)
        return reply_result(r.content, model, r.status_code, sent_at, at)

    async def generate_stream(self, prompt: str | None = None, *, input_ids=None, model: str | None = None,
                              **settings):
        """Async generator of ``TokenDelta``s; the last item it yields is the ``GenerationResult``."""
        model = model or self.model
        body = request_body(prompt, input_ids, self.params.merged(**settings), stream=True)
        sent_at = time.perf_counter()
        builder = ResultBuilder(sent_at)
        url = f"{self.base}/v2/models/{model}/generate_stream"
        async with aconnect_sse(self._http, "POST", url, json=body) as events:
            if events.response.status_code != 200:
                await events.response.aread()
                raise error_from_response(events.response, model)
            async for event in events.aiter_sse():
                parsed = parse_json_event(event.data, model)
                delta = builder.add_response(parsed, time.perf_counter())
                if not delta.empty:
                    yield delta
                if parsed.final:
                    yield builder.result
                    return
        raise ProtocolError(f"{model}: event stream ended without a final event")
