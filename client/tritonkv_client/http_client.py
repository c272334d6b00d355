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

from tritonkv_client._responses import parse_json_response
from tritonkv_client.errors import ProtocolError, ServerError
from tritonkv_client.params import GenerationParams
from tritonkv_client.result import GenerationResult, ResultBuilder, TokenDelta

DEFAULT_TIMEOUT_S = 300.0


def request_body(prompt: str | None, input_ids, params: GenerationParams, stream: bool) -> dict:
    if (prompt is None) == (input_ids is None):
        raise ValueError("give the prompt as text or as input_ids (exactly one)")
    body = {"text_input": prompt} if prompt is not None else {"input_ids": list(map(int, input_ids))}
    body.update(params.as_json())
    body["stream"] = stream
    return body


def iter_sse_data(lines):
    """The ``data:`` payloads of a server-sent event stream given as an iterable of text lines;
    multi-line data fields are joined with newlines, as the SSE spec says."""
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
    if data:
        yield "\n".join(data)


def error_from_body(raw: str, model: str, status) -> ServerError:
    """The ``ServerError`` for a non-200 reply: a JSON ``{"error"}`` body, or the same inside an
    SSE ``data:`` line (generate_stream answers errors that way)."""
    for candidate in [raw, *iter_sse_data(raw.splitlines())]:
        try:
            err = _error_of(json.loads(candidate), model, status)
        except ValueError:
            continue
        if err is not None:
            return err
    return ServerError(f"HTTP {status} from model {model!r}: {raw[:500]}", model=model, status=status)


def _error_of(body, model: str, status) -> ServerError | None:
    if isinstance(body, dict) and "error" in body:
        return ServerError(str(body["error"]), model=model, status=status)
    return None


class HttpStream:
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

    def __iter__(self):
        return self

    def __next__(self) -> TokenDelta:
        while not self.done:
            try:
                data = next(self._events)
            except StopIteration:
                self._close()
                raise ProtocolError(f"{self._model}: event stream ended without a final event "
                                    "(no finish_reason)") from None
            at = time.perf_counter()
            body = json.loads(data)
            error = _error_of(body, self._model, 200)
            if error is not None:
                self._close()
                raise error
            parsed = parse_json_response(body)
            delta = self._builder.add_tokens(parsed.ids, parsed.text, at)
            if parsed.final:
                self._builder.finish(at, parsed.finish_reason, parsed.cached_tokens, parsed.prompt_tokens)
                self._close()
            if delta.token_ids or delta.text:
                return delta
        raise StopIteration

    def result(self) -> GenerationResult:
        for _ in self:
            pass
        return self._builder.result

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
        at = time.perf_counter()
        data = json.loads(raw)
        error = _error_of(data, model, response.status)
        if error is not None:
            raise error
        parsed = parse_json_response(data)
        builder = ResultBuilder(sent_at)
        builder.add_tokens(parsed.ids, parsed.text, at)
        return builder.finish(at, parsed.finish_reason, parsed.cached_tokens, parsed.prompt_tokens)

    def generate_stream(self, prompt: str | None = None, *, input_ids=None, model: str | None = None,
                        **settings) -> HttpStream:
        """``POST /generate_stream`` with ``"stream": true``: one event per token."""
        model = model or self.model
        body = request_body(prompt, input_ids, self.params.merged(**settings), stream=True)
        conn, response, sent_at = self._post("generate_stream", body, model)
        return HttpStream(response, conn, model, sent_at)
