"""One-shot generation over Triton's HTTP generate extension, on ``llm_stateless``.

``/generate`` answers one JSON object (the whole reply); ``/generate_stream`` answers
server-sent events, one per token when the body has ``"stream": true``. Errors come back as
``{"error": "..."}`` (an HTTP error status, or an event inside the stream) and are raised as
``ServerError`` with that message.
"""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlsplit

from tritonkv_client._responses import error_from_body, iter_sse_data, parse_json_event, reply_result
from tritonkv_client.errors import ProtocolError, ServerError
from tritonkv_client.params import DEFAULT_TIMEOUT_S, GenerationParams, request_body
from tritonkv_client.result import DeltaStream, GenerationResult, ResultBuilder, TokenDelta

__all__ = ["HttpClient", "HttpStream", "DEFAULT_TIMEOUT_S", "error_from_body", "iter_sse_data", "request_body"]


class HttpStream(DeltaStream):
    """The events of one ``generate_stream`` request; iterate for ``TokenDelta``s, ``result()``
    for the whole ``GenerationResult``."""

    def __init__(self, response, conn, model: str, sent_at: float):
        self._response = response
        self._conn = conn
        self._model = model
        self._builder = ResultBuilder(sent_at)
        self._events = iter_sse_data(self._lines())
        self.done = False

    def _lines(self):
        while True:
            line = self._response.readline()
            if not line:
                return
            yield line.decode("utf-8", errors="replace")

    def _read_one(self) -> TokenDelta:
        try:
            data = next(self._events)
        except StopIteration:
            self._close()
            raise ProtocolError(f"{self._model}: event stream ended without a final event "
                                "(no finish_reason)") from None
        at = time.perf_counter()
        try:
            parsed = parse_json_event(data, self._model)
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
        self._conn.close()


class HttpClient:
    """``HttpClient("127.0.0.1:8000")`` (or ``http://host:port``); settings given here are
    defaults of every request."""

    def __init__(self, url: str, *, model: str = "llm_stateless", timeout_s: float = DEFAULT_TIMEOUT_S,
                 **settings):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.model = model
        self.timeout_s = timeout_s
        self.params = GenerationParams().merged(**settings)

    def _post(self, endpoint: str, body: dict, model: str):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        sent_at = time.perf_counter()
        conn.request("POST", f"/v2/models/{model}/{endpoint}", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raw = response.read().decode("utf-8", errors="replace")
            conn.close()
            raise error_from_body(raw, model, response.status)
        return conn, response, sent_at

    def generate(self, prompt: str | None = None, *, input_ids=None, model: str | None = None,
                 **settings) -> GenerationResult:
        """``POST /generate``: exactly one response with the whole reply (TTFT = end-to-end)."""
        model = model or self.model
        body = request_body(prompt, input_ids, self.params.merged(**settings), stream=False)
        conn, response, sent_at = self._post("generate", body, model)
        try:
            raw = response.read()
        finally:
            conn.close()
        return reply_result(raw, model, response.status, sent_at, time.perf_counter())

    def generate_stream(self, prompt: str | None = None, *, input_ids=None, model: str | None = None,
                        **settings) -> HttpStream:
        """``POST /generate_stream`` with ``"stream": true``: one event per token."""
        model = model or self.model
        body = request_body(prompt, input_ids, self.params.merged(**settings), stream=True)
        conn, response, sent_at = self._post("generate_stream", body, model)
        return HttpStream(response, conn, model, sent_at)
