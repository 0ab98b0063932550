"""``s2d2 serve``: an OpenAI-compatible HTTP server on the batched engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the checkpoint's chat template), ``GET
/v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format), and the playground page at ``GET /``.

Layout: this module holds the routes; :mod:`s2d2.serve.protocol` the request bodies, errors and their translation
into decoding settings; :mod:`s2d2.serve.worker` the engine thread that decodes every request (continuous
batching) and the metrics; :mod:`s2d2.serve.streaming` the server-sent events of a streamed response. The routes
are module-level handlers over the app's :class:`AppState`, so one process may hold several apps.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from s2d2.api import Generation, Model
from s2d2.config import DecodeConfig
from s2d2.engine.engine import Event
from s2d2.errors import S2D2Error
from s2d2.serve.core import ModelSource
from s2d2.serve.protocol import (
    APIError,
    BaseRequest,
    ChatRequest,
    CompletionRequest,
    ServerConfig,
    chat_message,
    completion_prompts,
    decode_config,
    encode_prompt,
    total_stats,
    trace_with_texts,
    usage,
    validation_message,
)
from s2d2.serve.streaming import ResponseStream
from s2d2.serve.worker import EngineWorker, Metrics, Ticket

log = logging.getLogger("s2d2.serve")  # the server's one logger (not __name__: its name is what operators filter on)


@dataclass(frozen=True)
class AppState:
    """What the handlers serve with; one per app, in ``app.state.s2d2``."""

    model: Model
    cfg: ServerConfig
    worker: EngineWorker
    metrics: Metrics


def _state(request: Request) -> AppState:
    return request.app.state.s2d2


def create_app(model: Model, cfg: ServerConfig, source: ModelSource | None = None) -> FastAPI:
    """The FastAPI application serving ``model``. With ``source``, its engines are ``cfg.data_parallel_size``
    processes that each load the model from it (``model`` then only tokenizes and formats: it may be loaded on the
    meta device, without weights); without, one engine thread decodes with ``model`` itself. They start and stop
    with the app."""
    metrics = Metrics()
    app = FastAPI(title="s2d2", lifespan=_lifespan)
    app.state.s2d2 = AppState(model, cfg, EngineWorker(model, cfg, metrics, source), metrics)
    app.exception_handler(APIError)(_api_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(Exception)(_internal_error)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    # registered as the decorators would: same order, and operation ids (handler name + path) as before the split
    app.get("/", response_class=HTMLResponse)(playground)
    app.get("/health")(health)
    app.get("/metrics")(prometheus)
    keyed = [Depends(_authorize)]  # every /v1 route: the API key, when the server has one
    app.get("/v1/models", dependencies=keyed)(models)
    app.post("/v1/completions", dependencies=keyed)(completions)
    app.post("/v1/chat/completions", dependencies=keyed)(chat_completions)
    return app


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is a 413, told by its Content-Length before anything is
    read, or (a chunked body) as soon as the bytes received pass the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes."

    async def _too_large(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["app"].state.s2d2.metrics.requests.labels(_endpoint(scope), "413").inc()
        await APIError(413, self._message(), code="body_too_large").response()(scope, receive, send)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    worker = app.state.s2d2.worker
    worker.start()
    yield
    worker.stop()


# ------------------------------------------------------------------------------------------------ errors
def _endpoint(scope: dict[str, Any]) -> str:
    """The metrics label of a request: its path when that is one of the app's routes, else ``unmatched`` (so that
    unknown paths, which anyone may send, cannot grow the label set)."""
    path = scope.get("path", "")
    return path if any(getattr(r, "path", None) == path for r in scope["app"].routes) else "unmatched"


async def _authorize(request: Request) -> None:
    """A 401 unless the request carries the server's API key as a bearer token (no key set: anyone may call)."""
    key = _state(request).cfg.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "a valid API key is required (send it as 'Authorization: Bearer KEY').",
                       error_type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    _state(request).metrics.requests.labels(_endpoint(request.scope), str(exc.status)).inc()
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _api_error(request, validation_message(exc))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's body parsing, on bytes that are not UTF-8
        return await _api_error(request, APIError(400, "the request body is not valid UTF-8 JSON.",
                                                  code="invalid_json"))
    code = "body_too_large" if exc.status_code == 413 else None
    return await _api_error(request, APIError(exc.status_code, str(exc.detail), code=code))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error")
    return await _api_error(request, APIError(500, f"internal error ({type(exc).__name__}).",
                                              error_type="internal_error"))


# ------------------------------------------------------------------------------------------------ routes
async def playground() -> HTMLResponse:
    """The playground page: two methods side by side on one prompt, tokens coloured as they are committed."""
    return HTMLResponse((resources.files("s2d2.serve") / "playground" / "index.html").read_text(encoding="utf-8"))


async def health(request: Request) -> JSONResponse:
    """Every replica's state; 503 while none is ready (starting, restarting, or failed to load)."""
    body = _state(request).worker.health()
    return JSONResponse(body, status_code=200 if body["status"] in ("ok", "degraded") else 503)


async def prometheus(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"object": "list", "data": [{"id": state.cfg.model_name, "object": "model", "created": 0,
                                        "owned_by": "s2d2", "max_model_len": state.model.adapter.max_positions}]}


async def completions(body: CompletionRequest, request: Request) -> Any:
    state = _state(request)
    model = state.model
    if body.suffix:
        raise APIError(400, "suffix is not supported.", param="suffix", code="unsupported")
    prompts = completion_prompts(body.prompt)
    decode_cfg = decode_config(model, state.cfg, body, body.max_tokens, "max_tokens")
    ids = [encode_prompt(model, p, decode_cfg, i if len(prompts) > 1 else None) for i, p in enumerate(prompts)]
    echo = [model.decode(x) if not isinstance(p, str) else p for x, p in zip(ids, prompts)] if body.echo else None
    return await _respond(state, request, "/v1/completions", body, ids, decode_cfg, chat=False, echo=echo)


async def chat_completions(body: ChatRequest, request: Request) -> Any:
    state = _state(request)
    model = state.model
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise APIError(400, "give max_tokens or max_completion_tokens, not both.", param="max_completion_tokens",
                       code="invalid_value")
    if body.top_logprobs:
        raise APIError(400, "logprobs are not supported.", param="top_logprobs", code="unsupported")
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    decode_cfg = decode_config(model, state.cfg, body, limit, "max_tokens")
    messages = [chat_message(m, i) for i, m in enumerate(body.messages)]
    try:
        text = model.apply_chat_template(messages, **(body.chat_template_kwargs or {}))
    except S2D2Error as e:
        raise APIError(400, str(e), param="messages", code="invalid_prompt") from None
    ids = [encode_prompt(model, text, decode_cfg, None)]
    return await _respond(state, request, "/v1/chat/completions", body, ids, decode_cfg, chat=True)


# ------------------------------------------------------------------------------------------------ one response
async def _respond(state: AppState, request: Request, endpoint: str, body: BaseRequest, prompt_ids: list[list[int]],
                   decode_cfg: DecodeConfig, *, chat: bool, echo: list[str] | None = None) -> Any:
    """Submit a request's choices to the engine and answer them: streamed, or as one JSON body once all finish."""
    model, cfg, worker, metrics = state.model, state.cfg, state.worker, state.metrics
    start = time.monotonic()
    loop = asyncio.get_running_loop()
    rows = [x for x in prompt_ids for _ in range(body.n)]  # choice k of prompt i is row i * n + k
    tickets = [Ticket(loop, ids, decode_cfg, seed, start + cfg.timeout_s, body.trace, stream=body.stream)
               for ids, seed in zip(rows, model.row_seeds(decode_cfg, len(rows), body.n))]
    worker.submit(tickets)  # 429 when the queue is full
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if body.stream:  # (a streamed response notices a disconnect itself: its generator is closed)
        stream = ResponseStream(request, worker, endpoint, body, tickets, prompt_ids, decode_cfg, rid=rid,
                                created=created, start=start, chat=chat, echo=echo)
        return StreamingResponse(stream.events(), media_type="text/event-stream")
    watcher = asyncio.create_task(_cancel_on_disconnect(request, worker, tickets))
    try:
        results = await _collect(worker, tickets, decode_cfg)
    except asyncio.CancelledError:
        for t in tickets:
            worker.cancel(t)
        raise
    finally:
        watcher.cancel()
    if watcher.done() and not watcher.cancelled():  # the client went away (its tickets were cancelled)
        metrics.requests.labels(endpoint, "499").inc()
        return Response(status_code=499)
    generations = [g for g, _ in results]
    metrics.latency.observe(time.monotonic() - start)
    choices = []
    for k, (g, _) in enumerate(results):
        text = (echo[k // body.n] + g.text) if echo else g.text
        choice: dict[str, Any] = {"index": k, "finish_reason": g.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        if body.trace:
            choice["s2d2_trace"] = trace_with_texts(model, g.trace or [])
        choices.append(choice)
    metrics.requests.labels(endpoint, "200").inc()
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": cfg.model_name, "choices": choices, "usage": usage(prompt_ids, generations),
            "s2d2": total_stats(generations)}


async def _cancel_on_disconnect(request: Request, worker: EngineWorker, tickets: list[Ticket]) -> None:
    """Wait for the client of a non-streamed request to go away and cancel its tickets the moment it does (their
    slots free at the engine's next step); cancelled when the response is ready."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a broken connection is a client gone too
        pass
    for t in tickets:
        worker.cancel(t)


async def _collect(worker: EngineWorker, tickets: list[Ticket],
                   decode_cfg: DecodeConfig) -> list[tuple[Generation, Event]]:
    """Every ticket's finished result, in order (the client is watched by :func:`_cancel_on_disconnect`)."""
    results = []
    try:
        for ticket in tickets:
            while not (event := await worker.next_event(None, ticket)).finished:
                pass
            results.append((worker.generation(event, decode_cfg), event))
    except APIError:
        for t in tickets:
            worker.cancel(t)
        raise
    return results


def serve(model: Model, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", source: ModelSource | None = None) -> None:
    """Run the server until interrupted. On SIGTERM (or Ctrl-C) it stops accepting connections, lets in-flight
    requests finish for up to ``cfg.shutdown_timeout_s`` seconds, cuts the rest, and returns."""
    import uvicorn

    app = create_app(model, cfg, source)
    worker = app.state.s2d2.worker
    worker.start()  # the engines load before the port opens, so a model that cannot load is one clear error
    try:
        worker.wait_ready()
    except S2D2Error:
        worker.stop()
        raise
    # uvicorn drains, then raises the signal again for the handler it found: a no-op one lets serve() return, so
    # that a drained SIGTERM ends the process with status 0 (not killed by the signal)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level,
                    timeout_graceful_shutdown=cfg.shutdown_timeout_s)
    finally:
        signal.signal(signal.SIGTERM, previous)
