"""asyncio client: the same conversations and one-shot streams as ``grpc_client``, on
``tritonclient.grpc.aio``; plus HTTP ``generate`` / ``generate_stream`` on aiohttp.

Each conversation and each one-shot request runs its own gRPC stream (a call on one shared
channel), so an error always belongs to the request that is in flight on it. The aio stream
cannot ask for the flagged empty final response; a request's final response is the one that
carries ``finish_reason`` (the server always sends it last).
"""

from __future__ import annotations

import asyncio
import json
import time

import tritonclient.grpc.aio as grpcaio

from tritonkv_client._responses import parse_grpc_result, parse_json_response
from tritonkv_client.errors import ProtocolError, ServerError
from tritonkv_client.grpc_client import DEFAULT_TIMEOUT_S, _salt, new_sequence_id
from tritonkv_client.http_client import _error_of, error_from_body, iter_sse_data, request_body
from tritonkv_client.params import GenerationParams, grpc_inputs
from tritonkv_client.result import GenerationResult, ResultBuilder, TokenDelta

_CLOSE = object()


class _AsyncStream:
    def __init__(self, client: grpcaio.InferenceServerClient):
        self._requests: asyncio.Queue = asyncio.Queue()
        self._responses = client.stream_infer(self._request_iter())
        self.busy = False

    async def _request_iter(self):
        while True:
            request = await self._requests.get()
            if request is _CLOSE:
                return
            yield request

    def send(self, **request) -> float:
        self.busy = True
        sent_at = time.perf_counter()
        self._requests.put_nowait(request)
        return sent_at

    async def next_response(self, timeout_s: float):
        return await asyncio.wait_for(self._responses.__anext__(), timeout_s)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self._responses.cancel()
        self._requests.put_nowait(_CLOSE)


class AsyncTurnStream:
    """``async for delta in turn``; ``await turn.result()``. Server errors raise ``ServerError``."""

    def __init__(self, stream: _AsyncStream, model: str, sent_at: float, timeout_s: float, on_done=None):
        self._stream = stream
        self._model = model
        self._builder = ResultBuilder(sent_at)
        self._timeout_s = timeout_s
        self._on_done = on_done
        self._error: ServerError | None = None
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenDelta:
        while not self.done:
            delta = await self._read_one()
            if delta.token_ids or delta.text:
                return delta
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    async def result(self) -> GenerationResult:
        async for _ in self:
            pass
        return self._builder.result

    def cancel(self) -> None:
        if not self.done:
            self._stream.close(cancel=True)
            self._finish(ServerError("cancelled by the client", model=self._model, status="cancelled"))

    async def _read_one(self) -> TokenDelta:
        try:
            result, error = await self._stream.next_response(self._timeout_s)
        except asyncio.TimeoutError:
            self._finish(ServerError(f"no response from model {self._model!r} in {self._timeout_s}s",
                                     model=self._model, status="timeout"))
            raise self._error from None
        except StopAsyncIteration:
            self._finish(ProtocolError(f"{self._model}: stream closed before the final response"))
            raise self._error from None
        at = time.perf_counter()
        if error is not None:
            self._finish(ServerError(error.message() or str(error), model=self._model, status=error.status()))
            raise self._error
        parsed = parse_grpc_result(result)
        delta = self._builder.add_tokens(parsed.ids, parsed.text, at)
        if parsed.final:
            self._builder.finish(at, parsed.finish_reason, parsed.cached_tokens, parsed.prompt_tokens)
            self._finish(None)
        return delta

    def _finish(self, error) -> None:
        self.done = True
        self._error = error
        self._stream.busy = False
        if self._on_done is not None:
            self._on_done(self)


class AsyncClient:
    """``async with AsyncClient("127.0.0.1:8001") as client:`` gRPC (asyncio)."""

    def __init__(self, url: str, *, model: str = "llm", stateless_model: str = "llm_stateless",
                 timeout_s: float = DEFAULT_TIMEOUT_S, **settings):
        self.url = url
        self.model = model
        self.stateless_model = stateless_model
        self.timeout_s = timeout_s
        self.params = GenerationParams().merged(**settings)
        self._client = grpcaio.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def generate_stream(self, prompt: str | None = None, *, input_ids=None, cache_salt: str | None = None,
                        model: str | None = None, **settings) -> AsyncTurnStream:
        model = model or self.stateless_model
        stream = _AsyncStream(self._client)
        sent_at = stream.send(model_name=model, inputs=grpc_inputs(prompt, input_ids, self.params.merged(**settings),
                                                                     stream=True),
                              parameters=_salt(cache_salt))
        return AsyncTurnStream(stream, model, sent_at, self.timeout_s, on_done=lambda _t: stream.close())

    async def generate(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        turn = self.generate_stream(prompt, **kwargs)
        try:
            return await turn.result()
        finally:
            turn.cancel()

    def conversation(self, sequence_id: int | str | None = None, *, cache_salt: str | None = None,
                     **settings) -> "AsyncConversation":
        return AsyncConversation(self, sequence_id, cache_salt=cache_salt, params=self.params.merged(**settings))


class AsyncConversation:
    """asyncio twin of ``grpc_client.Conversation``: ``async with client.conversation() as c:``;
    ``turn = c.send("...")``; ``async for delta in turn``; END on ``await c.close()``."""

    def __init__(self, client: AsyncClient, sequence_id=None, *, cache_salt=None, params=None):
        self.client = client
        self.sequence_id = new_sequence_id() if sequence_id is None else sequence_id
        self.cache_salt = cache_salt
        self.params = params or client.params
        self.turns: list[GenerationResult] = []
        self.started = False
        self.ended = False
        self._stream: _AsyncStream | None = None
        self._current: AsyncTurnStream | None = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def send(self, prompt: str | None = None, *, input_ids=None, end: bool = False,
                   **settings) -> AsyncTurnStream:
        if self.ended:
            raise RuntimeError(f"conversation {self.sequence_id} is over; start a new one")
        if prompt is None and input_ids is None:
            raise ValueError("a turn needs a prompt (text or input_ids); use close() to end the conversation")
        await self._drain()
        if self._stream is None:
            self._stream = _AsyncStream(self.client._client)
        inputs = grpc_inputs(prompt, input_ids, self.params.merged(**settings), stream=True)
        sent_at = self._stream.send(model_name=self.client.model, inputs=inputs, sequence_id=self.sequence_id,
                                    sequence_start=not self.started, sequence_end=end,
                                    parameters=_salt(self.cache_salt))
        self.started = True
        self.ended = end
        self._current = AsyncTurnStream(self._stream, self.client.model, sent_at, self.client.timeout_s,
                                        on_done=self._turn_done)
        return self._current

    async def ask(self, prompt: str | None = None, **kwargs) -> GenerationResult:
        return await (await self.send(prompt, **kwargs)).result()

    def _turn_done(self, turn: AsyncTurnStream) -> None:
        if turn._error is None:
            self.turns.append(turn._builder.result)
        elif getattr(turn._error, "status", None) == "cancelled":
            self.ended = True
        elif not self.turns:
            self.started = False
        if self.ended:
            self._give_back()

    async def _drain(self) -> None:
        if self._current is not None and not self._current.done:
            try:
                await self._current.result()
            except ServerError:
                pass

    async def close(self) -> None:
        if self.ended and self._stream is None:
            return
        try:
            await self._drain()
            if self.started and not self.ended:
                self.ended = True
                sent_at = self._stream.send(model_name=self.client.model, inputs=[], sequence_id=self.sequence_id,
                                            sequence_end=True)
                await AsyncTurnStream(self._stream, self.client.model, sent_at, self.client.timeout_s).result()
        finally:
            self.ended = True
            self._give_back()

    def _give_back(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


class AsyncHttpClient:
    """HTTP ``generate`` / ``generate_stream`` on ``llm_stateless`` over aiohttp."""

    def __init__(self, url: str, *, model: str = "llm_stateless", timeout_s: float = DEFAULT_TIMEOUT_S, **settings):
        import aiohttp

        self.base = (url if "://" in url else f"http://{url}").rstrip("/")
        self.model = model
        self.params = GenerationParams().merged(**settings)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def generate(self, prompt: str | None = None, *, input_ids=None, model: str | None = None,
                       **settings) -> GenerationResult:
        model = model or self.model
        body = request_body(prompt, input_ids, self.params.merged(**settings), stream=False)
        sent_at = time.perf_counter()
        async with self._session.post(f"{self.base}/v2/models/{model}/generate", json=body) as r:
            raw = await r.text()
        at = time.perf_counter()
        if r.status != 200:
            raise error_from_body(raw, model, r.status)
        data = json.loads(raw)
        parsed = parse_json_response(data)
        builder = ResultBuilder(sent_at)
        builder.add_tokens(parsed.ids, parsed.text, at)
        return builder.finish(at, parsed.finish_reason, parsed.cached_tokens, parsed.prompt_tokens)

    async def generate_stream(self, prompt: str | None = None, *, input_ids=None, model: str | None = None,
                              **settings):
        """Async generator of ``TokenDelta``s; the last item it yields is the ``GenerationResult``."""
        model = model or self.model
        body = request_body(prompt, input_ids, self.params.merged(**settings), stream=True)
        sent_at = time.perf_counter()
        builder = ResultBuilder(sent_at)
        async with self._session.post(f"{self.base}/v2/models/{model}/generate_stream", json=body) as r:
            if r.status != 200:
                raise error_from_body(await r.text(), model, r.status)
            lines = []
            async for raw_line in r.content:
                lines.append(raw_line.decode("utf-8", errors="replace"))
                if raw_line.strip():
                    continue
                for data in iter_sse_data(lines):
                    at = time.perf_counter()
                    body = json.loads(data)
                    error = _error_of(body, model, 200)
                    if error is not None:
                        raise error
                    parsed = parse_json_response(body)
                    delta = builder.add_tokens(parsed.ids, parsed.text, at)
                    if delta.token_ids or delta.text:
                        yield delta
                    if parsed.final:
                        yield builder.finish(at, parsed.finish_reason, parsed.cached_tokens, parsed.prompt_tokens)
                        return
                lines = []
        raise ProtocolError(f"{model}: event stream ended without a final event")
