"""One-shot generation over Triton's HTTP generate extension, on ``llm_stateless`` (httpx; the
event stream is read by httpx-sse).

``/generate`` answers one JSON object (the whole reply); ``/generate_stream`` answers
server-sent events, one per token when the body has ``"stream": true``. Errors come back as
``{"error": "..."}`` (an HTTP error status, or an event inside the stream) and are raised as
``ServerError`` with that message. ``/generate`` is only ever asked for one reply: Triton's
generate endpoint fixes the HTTP status at the model's first response, so a streamed request
there would answer 200 with an error body.
"""

from __future__ import annotations

import time

import httpx
from httpx_sse import EventSource

from tritonkv_client._common import Closing
from tritonkv_client._responses import error_from_response, parse_json_event, reply_result
from tritonkv_client.errors import ProtocolError, ServerError
from tritonkv_client.params import DEFAULT_TIMEOUT_S, GenerationParams, request_body
from tritonkv_client.result import DeltaStream, GenerationResult, ResultBuilder, TokenDelta

__all__ = ["HttpClient", "HttpStream", "DEFAULT_TIMEOUT_S", "error_from_response", "request_body"]

SSE_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-store"}


def base_url(url: str) -> str:
    """``host:port`` or ``http://host:port`` as a base URL."""
    return (url if "://" in url else f"http://{url}").rstrip("/")


class HttpStream(DeltaStream):
    """The events of one ``generate_stream`` request; iterate for ``TokenDelta``s, ``result()``
    for the whole ``GenerationResult``."""

    def __init__(self, response: httpx.Response, model: str, sent_at: float):
        self._response = response
        self._model = model
        self._builder = ResultBuilder(sent_at)
        self._events = EventSource(response).iter_sse()
        self.done = False

    def _read_one(self) -> TokenDelta:
        try:
            event = next(self._events)
        except StopIteration:
            self._close()
            raise ProtocolError(f"{self._model}: event stream ended without a final event "
                                "(no finish_reason)") from None
        at = time.perf_counter()
        try:
            parsed = parse_json_event(event.data, self._model)
        except ServerError:
            self._close()
            raise
        delta = self._builder.add_response(parsed, at)
        if parsed.final:
            self._close()
        return delta

    def _close(self) -> None:
        self.done = True
        self._response.close()


class HttpClient(Closing):
    """``HttpClient("127.0.0.1:8000")`` (or ``http://host:port``); settings given here are
    defaults of every request. Connections are kept and reused until ``close()``."""

    def __init__(self, url: str, *, model: str = "llm_stateless", timeout_s: float = DEFAULT_TIMEOUT_S,
                 **settings):
        self.base = base_url(url)
        self.model = model
        self.timeout_s = timeout_s
        self.params = GenerationParams().merged(**settings)
        self._http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _post(self, endpoint: str, body: dict, model: str, headers: dict | None = None):
        """Sends the request; returns (response with its body still unread, time sent)."""
        request = self._http.build_request("POST", f"{self.base}/v2/models/{model}/{endpoint}", json=body,
                                           headers=headers)
        sent_at = time.perf_counter()
        response = self._http.send(request, stream=True)
        if response.status_code != 200:
            try:
                response.read()
            finally:
                response.close()
            raise error_from_response(response, model)
        return response, sent_at

    def generate(self, prompt: str | None = None, *, input_ids=None, model: str | None = None,
                 **settings) -> GenerationResult:
        """``POST /generate``: exactly one response with the whole reply (TTFT = end-to-end)."""
        model = model or self.model
        body = request_body(prompt, input_ids, self.params.merged(**settings), stream=False)
        response, sent_at = self._post("generate", body, model)
        try:
            raw = response.read()
        finally:
            response.close()
        return reply_result(raw, model, response.status_code, sent_at, time.perf_counter())

    def generate_stream(self, prompt: str | None = None, *, input_ids=None, model: str | None = None,
                        **settings) -> HttpStream:
        """``POST /generate_stream`` with ``"stream": true``: one event per response (a token, or
        several when the server fell behind and merged them)."""
        model = model or self.model
        body = request_body(prompt, input_ids, self.params.merged(**settings), stream=True)
        response, sent_at = self._post("generate_stream", body, model, SSE_HEADERS)
        return HttpStream(response, model, sent_at)
