"""Routes: /v1/models, /v1/completions, /v1/chat/completions, /health.

Rules:
- the model name in a request must be the served one (else 404); a body over 16 MiB is 413;
- a prompt's text is size-checked on its bytes before anything else reads it
  (``ServedModel.check_prompt_size``); a chat's template rendering and tokenising run on a
  worker thread, never on the event loop, so a large request cannot stall other streams;
- ``cache_salt`` (as vLLM) separates prefix-cache namespaces; with ``salt_per_api_key`` every
  API key (``Authorization: Bearer KEY``) gets a namespace of its own (the request's salt,
  if any, is kept inside it), so users cannot see each other's cached prefixes;
- a streamed answer starts (HTTP 200, SSE) only once the model accepted the request and sent
  its first response, so a refused request gets its status code (400 / 503) with or
  without ``stream``;
- a client that disconnects cancels its Triton request: a streamed answer when the next
  write fails, a whole answer as soon as the disconnect is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tritonkv.openai_frontend import schema
from tritonkv.openai_frontend.errors import OpenAIError, bad_request, internal
from tritonkv.openai_frontend.responses import Answer, sse_events
from tritonkv.openai_frontend.served_model import ServedModel
from tritonkv.openai_frontend.triton_bridge import TritonBridge


class EventStreamResponse(StreamingResponse):
    """SSE whose event generator is always closed when the response ends, however it ends
    (Starlette leaves it to the garbage collector when the client is gone): closing it
    cancels the Triton request."""

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


TEMPLATE_THREADS = 4  # chat prompts rendered and tokenised at once (off the event loop)


def api_key_salt(request: Request, cache_salt: str | None) -> str | None:
    """The cache namespace of the request's API key (a digest, never the key), with the
    request's own ``cache_salt`` inside it; no key: the request's salt alone."""
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("bearer ") or not auth[7:].strip():
        return cache_salt
    digest = hashlib.sha256(auth[7:].strip().encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"api-key-{digest}" + ("" if cache_salt is None else f"/{cache_salt}")


def create_app(model: ServedModel, bridge: TritonBridge, salt_per_api_key: bool = False) -> FastAPI:
    templating = ThreadPoolExecutor(TEMPLATE_THREADS, thread_name_prefix="tritonkv-chat-template")

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await bridge.close()
        templating.shutdown(wait=False, cancel_futures=True)

    def salted(request: Request, gen: schema.Generation) -> schema.Generation:
        if salt_per_api_key:
            gen.cache_salt = api_key_salt(request, gen.cache_salt)
        return gen

    app = FastAPI(title="tritonkv OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(OpenAIError)
    async def on_openai_error(_request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(OpenAIError(exc.status_code, str(exc.detail), None, kind))

    @app.get("/health")
    async def health():
        ready = await bridge.is_ready()
        return Response(status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model.card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        model.check_name(name)
        return model.card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = schema.parse_body(schema.CompletionBody, await _json(request))
        model.check_name(body.model)
        gen = schema.completion_generation(body)
        if gen.text is not None:
            model.check_prompt_size([gen.text], "prompt")
        elif model.max_model_len and len(gen.input_ids) > model.max_model_len:
            raise bad_request(f"'prompt' holds {len(gen.input_ids)} tokens; this model serves at most "
                              f"{model.max_model_len} (max_model_len)", "prompt", "context_length_exceeded")
        echo = _echo(model, gen) if gen.echo else None
        return await _answer(request, bridge, salted(request, gen), chat=False, prompt_param="prompt", echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = schema.parse_body(schema.ChatBody, await _json(request))
        model.check_name(body.model)
        messages = schema.chat_messages(body)
        model.check_prompt_size([m["content"] for m in messages if isinstance(m.get("content"), str)], "messages")
        gen = schema.chat_generation(body, [], model.tool_parser)  # every other field checked before the template runs
        gen.input_ids = await asyncio.get_running_loop().run_in_executor(templating, model.chat_prompt_ids, messages,
                                                                         body.tools)
        return await _answer(request, bridge, salted(request, gen), chat=True, prompt_param="messages")

    return app


MAX_BODY_BYTES = 16 << 20  # a request body larger than this is refused (413) before parsing


async def _json(request: Request):
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise OpenAIError(413, f"the request body is larger than {MAX_BODY_BYTES >> 20} MiB")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


CLIENT_CLOSED = 499  # the status of an answer nobody is left to read (as nginx logs it)


class _ClientGone(Exception):
    pass


def _echo(model, gen: schema.Generation) -> tuple[str, str]:
    """(prompt text, its first token's text) of an echoed completion (the model's tokenizer;
    a token-id prompt without one echoes no text)."""
    tok = model.tokenizer
    if gen.text is not None:
        ids = tok.encode(gen.text, add_special_tokens=True) if tok is not None else []
        return gen.text, tok.decode([ids[0]]) if ids else ""
    if tok is None:
        return "", ""
    return tok.decode(gen.input_ids), tok.decode(gen.input_ids[:1])


async def _answer(request: Request, bridge: TritonBridge, gen: schema.Generation, chat: bool, prompt_param: str,
                  echo: tuple[str, str] | None = None):
    answer = Answer(gen.model, chat, gen.sampling.get("logprobs"), echo, gen.sampling.get("n", 1), gen.tools)
    deltas = bridge.generate(gen, prompt_param)
    try:
        if gen.stream:
            first = await _unless_disconnected(request, deltas.__anext__(), deltas)
            return EventStreamResponse(sse_events(answer, first, deltas, gen.include_usage))

        async def collect():
            async for delta in deltas:
                answer.add(delta)

        await _unless_disconnected(request, collect(), deltas)
        return JSONResponse(answer.body())
    except _ClientGone:
        return Response(status_code=CLIENT_CLOSED)


async def _unless_disconnected(request: Request, work, deltas):
    """Await ``work``; if the client disconnects first (or this handler is cancelled), stop it
    and close ``deltas``, which cancels the Triton request."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await deltas.aclose()
            gone = True
        else:
            gone = False
    if gone:
        raise _ClientGone
    try:
        return task.result()
    except StopAsyncIteration:
        raise internal("the model ended the request without any response") from None


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
