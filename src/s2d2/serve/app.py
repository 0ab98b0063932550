"""``s2d2 serve``: an OpenAI-compatible HTTP server on the batched engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the checkpoint's chat template), ``GET
/v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Layout: the engine (:class:`s2d2.engine.engine.Engine`) runs on one worker thread (:class:`EngineWorker`), which owns it:
requests reach it through a queue, it admits them between steps (continuous batching: a request takes a slot as
soon as one frees, it never waits for the batch to drain), and it hands each request's progress back to the
asyncio handler that waits for it. A client that disconnects, or a request past the server's timeout, is cancelled
at the worker's next step and its slot freed.

Requests: the standard fields (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``n``, ``stream``)
map onto :class:`~s2d2.config.DecodeConfig`; any other DecodeConfig field (``method``, ``block_size``, ``policy``,
``threshold``, ``top_k``, ...) may be sent as an extra body field (the openai client's ``extra_body``); fields a
request leaves out take the server's defaults (the ``s2d2 serve`` flags). Responses carry ``usage`` and an ``s2d2``
object: the request's decode stats (NFE, tokens per forward, accepted tokens, verifications, ...).

Streaming (server-sent events): a chunk carries the text committed since the last chunk, and only text whose
every token to the left is committed (block diffusion commits out of order inside a block). Text that may be the
start of a stop string, or an incomplete UTF-8 character, is held back until it is settled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from s2d2.api import Generation, Model, find_stop
from s2d2.config import DecodeConfig
from s2d2.core.stats import DecodeStats
from s2d2.engine.engine import Engine, Event
from s2d2.errors import S2D2Error

log = logging.getLogger("s2d2.serve")

# DecodeConfig fields a request may set as extra body fields (the standard OpenAI names map onto the rest)
_EXTRA_FIELDS = frozenset(f.name for f in fields(DecodeConfig) if f.init) - {"max_new_tokens", "generation_config"}


@dataclass(frozen=True)
class ServerConfig:
    """How the server runs: its batch, queue and timeout limits, and the decoding defaults of its requests."""

    model_name: str  # the name clients send as ``model`` (and /v1/models lists)
    max_batch: int = 16  # requests decoded together (engine slots)
    max_queue: int = 64  # requests waiting for a slot beyond those; more are answered 429
    timeout_s: float = 600.0  # a request still unfinished after this long is cancelled (504)
    defaults: DecodeConfig = field(default_factory=DecodeConfig)
    max_n: int = 8  # choices per request

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_n"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise S2D2Error(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise S2D2Error(f"max_queue must be an integer >= 0, got {self.max_queue!r}.")
        if not self.timeout_s > 0:
            raise S2D2Error(f"timeout must be > 0 seconds, got {self.timeout_s!r}.")


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, error_type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------------------------ request bodies
class _Request(BaseModel):
    """Fields common to completions and chat. Unknown fields are kept (``model_extra``) and must be DecodeConfig
    fields; a wrong type or range is a 400."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # accepted for compatibility; only their neutral values are supported
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    # s2d2's own: return each choice's step trace (schema s2d2.trace/1) as choices[k].s2d2_trace; streamed, each
    # chunk carries the trace events recorded since the last one (s2d2_trace at the chunk's top level)
    trace: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------------ engine thread
class Ticket:
    """One generation (one choice of one request) on its way through the engine; the handler awaits its events."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], cfg: DecodeConfig,
                 generator: torch.Generator, stop_check: Callable[[list[int]], bool] | None, deadline: float,
                 trace: bool = False) -> None:
        self.loop, self.prompt_ids, self.cfg, self.generator = loop, prompt_ids, cfg, generator
        self.stop_check, self.deadline, self.trace = stop_check, deadline, trace
        self.events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.request_id: int | None = None  # the engine's id, set by the worker
        self.done = False  # set by the worker when the final event is sent

    def deliver(self, item: Event | BaseException) -> None:
        """Hand an event (or a failure) to the waiting handler; called on the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class EngineWorker:
    """Owns the engine and runs it on its own thread: admits submitted tickets between steps, steps while any is
    running, cancels what clients gave up or what ran past its deadline, and delivers every event."""

    def __init__(self, model: Model, cfg: ServerConfig, metrics: _Metrics) -> None:
        self.model, self.cfg, self.metrics = model, cfg, metrics
        self._inbox: queue.SimpleQueue[tuple[str, Ticket | None]] = queue.SimpleQueue()
        self._tickets: dict[int, Ticket] = {}
        self._outstanding = 0  # tickets submitted and not yet finished (running or waiting)
        self._lock = threading.Lock()
        self._engine = self._new_engine()
        self._thread = threading.Thread(target=self._run, name="s2d2-engine", daemon=True)
        self._stopping = False

    def _new_engine(self) -> Engine:
        return Engine(self.model.adapter, self.cfg.max_batch, capacity=256, stream=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def submit(self, tickets: list[Ticket]) -> None:
        """Queue tickets for the engine, all or none: a 429 when they would overflow the queue."""
        with self._lock:
            limit = self.cfg.max_batch + self.cfg.max_queue
            if self._outstanding + len(tickets) > limit:
                raise APIError(429, f"the server is busy: {self._outstanding} requests are running or queued (limit "
                               f"{limit}); retry shortly.", error_type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": "1"})
            self._outstanding += len(tickets)
        for t in tickets:
            self._inbox.put(("add", t))

    def cancel(self, ticket: Ticket) -> None:
        """Ask the worker to stop a ticket (a client went away); its slot is freed at the next step."""
        if not ticket.done:
            self._inbox.put(("cancel", ticket))

    # -- worker thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            self._drain_inbox(block=self._engine.idle)
            self._expire()
            if self._engine.idle:
                continue
            try:
                events = self._engine.step()
            except Exception as e:  # a bug, or memory: fail the batch's requests, keep serving the next ones
                log.exception("engine step failed; failing its %d requests", len(self._tickets))
                for ticket in list(self._tickets.values()):
                    self._finish(ticket, e)
                self._engine = self._new_engine()
                continue
            self.metrics.steps.inc()
            for event in events:
                ticket = self._tickets.get(event.request_id)
                if ticket is None:
                    continue
                if event.finished:
                    self._finish(ticket, event)
                else:
                    ticket.deliver(event)
            self._update_gauges()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, ticket = item
            if kind == "add" and ticket is not None:
                # may grow the batch cache: the longest request so far sets the slots' capacity
                ticket.request_id = self._engine.add(ticket.prompt_ids, ticket.cfg, ticket.generator, ticket.stop_check,
                                                     ticket.trace)
                self._tickets[ticket.request_id] = ticket
            elif kind == "cancel" and ticket is not None:
                self._cancel(ticket, "cancelled")
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._update_gauges()

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in self._tickets.values() if t.deadline < now]:
            self._cancel(ticket, "timeout")

    def _cancel(self, ticket: Ticket, reason: str) -> None:
        if ticket.request_id is None or ticket.request_id not in self._tickets:
            return
        event = self._engine.cancel(ticket.request_id)
        if event is not None:
            self.metrics.cancelled.labels(reason).inc()
            event.finish_reason = reason
            self._finish(ticket, event)

    def _finish(self, ticket: Ticket, item: Event | BaseException) -> None:
        self._tickets.pop(ticket.request_id, None)  # type: ignore[arg-type]
        ticket.done = True
        with self._lock:
            self._outstanding -= 1
        ticket.deliver(item)

    def _update_gauges(self) -> None:
        running, waiting = self._engine.num_running, self._engine.num_waiting
        self.metrics.running.set(running)
        self.metrics.waiting.set(waiting)
        self.metrics.occupancy.set(running / self.cfg.max_batch)


class _Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("s2d2_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("s2d2_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("s2d2_generated_tokens", "tokens generated", registry=r)
        self.forwards = Counter("s2d2_forwards", "forwards the generations took part in (summed NFE)", registry=r)
        self.steps = Counter("s2d2_engine_steps", "batched forwards run by the engine", registry=r)
        self.cancelled = Counter("s2d2_generations_cancelled", "generations stopped before their end: the client "
                                 "went away (cancelled), or the server's timeout passed (timeout)", ["reason"],
                                 registry=r)
        self.running = Gauge("s2d2_requests_running", "generations holding a batch slot", registry=r)
        self.waiting = Gauge("s2d2_requests_waiting", "generations queued for a slot (queue depth)", registry=r)
        self.occupancy = Gauge("s2d2_batch_occupancy", "share of the batch's slots in use", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.latency = Histogram("s2d2_request_latency_seconds", "time from request to its last token",
                                 buckets=buckets, registry=r)
        self.ttft = Histogram("s2d2_time_to_first_token_seconds", "time from request to its first streamed text",
                              buckets=buckets, registry=r)


# ------------------------------------------------------------------------------------------------ text streaming
class TextStream:
    """Turns a row's committed tokens into text deltas: never past a possible stop-string start or an incomplete
    UTF-8 character, and cut at the first stop string (after which the row is done)."""

    def __init__(self, model: Model, stops: tuple[str, ...] | None) -> None:
        self.model, self.stops = model, stops or ()
        self.token_ids: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.stopped = False

    def feed(self, new_ids: list[int]) -> str:
        """The text newly settled by ``new_ids``; sets :attr:`stopped` once a stop string appears."""
        self.token_ids += new_ids
        text = self.model.decode(self.token_ids)
        cut = find_stop(text, self.stops)
        if cut >= 0:
            self.stopped = True
            return self._take(text, cut)
        safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes as U+FFFD until it completes
        hold = max((k for s in self.stops for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        return self._take(text, safe - hold)

    def rest(self, final_text: str) -> str:
        """What is left of the generation's final text."""
        return self._take(final_text, len(final_text))

    def _take(self, text: str, end: int) -> str:
        delta = text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta


# ------------------------------------------------------------------------------------------------ the app
def create_app(model: Model, cfg: ServerConfig) -> FastAPI:
    """The FastAPI application serving ``model``; its engine thread starts and stops with the app."""
    metrics = _Metrics()
    worker = EngineWorker(model, cfg, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="s2d2", lifespan=lifespan)
    app.state.worker = worker
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _api_error(request, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await _api_error(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return await _api_error(request, APIError(500, f"internal error ({type(exc).__name__}).",
                                                  error_type="internal_error"))

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        """The playground page: two methods side by side on one prompt, tokens coloured as they are committed."""
        return HTMLResponse((resources.files("s2d2.serve") / "playground" / "index.html").read_text(encoding="utf-8"))

    def with_texts(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Trace events with each commit's token text (for the playground and any client that shows them)."""
        return [{**e, "commits": [{**c, "text": model.decode([c["token"]])} for c in e["commits"]]}
                if e.get("commits") else e for e in events]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": worker.outstanding}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "s2d2", "max_model_len": model.adapter.max_positions}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        if body.suffix:
            raise APIError(400, "suffix is not supported.", param="suffix")
        prompts = _completion_prompts(body.prompt)
        decode_cfg = _decode_config(model, cfg, body, body.max_tokens, "max_tokens")
        ids = [_encode(model, p, decode_cfg, i if len(prompts) > 1 else None) for i, p in enumerate(prompts)]
        echo = [model.decode(x) if not isinstance(p, str) else p for x, p in zip(ids, prompts)] if body.echo else None
        return await _respond(request, "/v1/completions", body, ids, decode_cfg, chat=False, echo=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both.", param="max_completion_tokens")
        if body.top_logprobs:
            raise APIError(400, "logprobs are not supported.", param="top_logprobs")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        decode_cfg = _decode_config(model, cfg, body, limit, "max_tokens")
        messages = [_chat_message(m, i) for i, m in enumerate(body.messages)]
        try:
            text = model.apply_chat_template(messages, **(body.chat_template_kwargs or {}))
        except S2D2Error as e:
            raise APIError(400, str(e), param="messages") from None
        ids = [_encode(model, text, decode_cfg, None)]
        return await _respond(request, "/v1/chat/completions", body, ids, decode_cfg, chat=True)

    async def _respond(request: Request, endpoint: str, body: _Request, prompt_ids: list[list[int]],
                       decode_cfg: DecodeConfig, *, chat: bool, echo: list[str] | None = None) -> Any:
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        stop_check = model.stop_check(decode_cfg)
        rows = [x for x in prompt_ids for _ in range(body.n)]  # choice k of prompt i is row i * n + k
        tickets = [Ticket(loop, ids, decode_cfg, generator, stop_check, start + cfg.timeout_s, body.trace)
                   for ids, generator in zip(rows, model.row_generators(decode_cfg, len(rows)))]
        worker.submit(tickets)  # 429 when the queue is full
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        if body.stream:
            stream = _stream(request, endpoint, tickets, prompt_ids, decode_cfg, rid, created, chat, body, start, echo)
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            results = await _collect(request, tickets, decode_cfg)
        except asyncio.CancelledError:
            for t in tickets:
                worker.cancel(t)
            raise
        if results is None:  # the client went away
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
                choice["s2d2_trace"] = with_texts(g.trace or [])
            choices.append(choice)
        metrics.requests.labels(endpoint, "200").inc()
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": cfg.model_name, "choices": choices, "usage": _usage(prompt_ids, generations),
                "s2d2": _stats(generations)}

    async def _next(request: Request, ticket: Ticket) -> Event | None:
        """The ticket's next event, or None once the client has disconnected (the ticket is then cancelled)."""
        while True:
            try:
                item = await asyncio.wait_for(ticket.events.get(), timeout=0.25)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                if await request.is_disconnected():
                    worker.cancel(ticket)
                    return None
                continue
            if isinstance(item, BaseException):
                raise APIError(500, f"decoding failed ({type(item).__name__}: {item}).", error_type="internal_error")
            if item.finished and item.finish_reason == "timeout":
                raise APIError(504, f"the request did not finish within the server's timeout of {cfg.timeout_s:g} s.",
                               error_type="timeout_error", code="timeout")
            return item

    async def _collect(request: Request, tickets: list[Ticket],
                       decode_cfg: DecodeConfig) -> list[tuple[Generation, Event]] | None:
        results = []
        try:
            for ticket in tickets:
                while True:
                    event = await _next(request, ticket)
                    if event is None:
                        for t in tickets:
                            worker.cancel(t)
                        return None
                    if event.finished:
                        results.append((_generation(model, event, decode_cfg), event))
                        break
        except APIError:
            for t in tickets:
                worker.cancel(t)
            raise
        return results

    async def _stream(request: Request, endpoint: str, tickets: list[Ticket], prompt_ids: list[list[int]],
                      decode_cfg: DecodeConfig, rid: str, created: int, chat: bool, body: _Request, start: float,
                      echo: list[str] | None) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None = None, **extra: Any) -> str:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if text == "" and finish is None:
                    delta = {"role": "assistant", "content": ""}
                choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": kind, "created": created, "model": cfg.model_name, "choices": [choice],
                       **extra}
            return f"data: {_json(payload)}\n\n"

        finished: list[Generation] = []
        first = [True]

        def text_chunk(index: int, text: str) -> str:
            if first[0]:
                metrics.ttft.observe(time.monotonic() - start)
                first[0] = False
            return chunk(index, text)

        try:
            for k, ticket in enumerate(tickets):
                text_stream = TextStream(model, decode_cfg.stop)
                traced = 0  # trace events of this choice already sent
                if chat:
                    yield chunk(k, "")
                elif echo:
                    yield chunk(k, echo[k // body.n])
                while True:
                    try:
                        event = await _next(request, ticket)
                    except APIError as e:
                        yield f"data: {_json({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"
                        metrics.requests.labels(endpoint, str(e.status)).inc()
                        return
                    if event is None:
                        return
                    delta = text_stream.feed(event.new_token_ids)
                    if text_stream.stopped and not event.finished:
                        worker.cancel(ticket)  # the text holds a stop string: nothing after it is wanted
                    if not event.finished:
                        if delta:
                            yield text_chunk(k, delta)
                        if event.trace_events:  # a traced request: the steps as they happen
                            yield chunk(k, None, s2d2_trace=with_texts(event.trace_events))
                            traced += len(event.trace_events)
                        continue
                    g = _generation(model, event, decode_cfg, stopped=text_stream.stopped)
                    finished.append(g)
                    delta += text_stream.rest(g.text)
                    if delta:
                        yield text_chunk(k, delta)
                    rest = {"s2d2_trace": with_texts(g.trace[traced:])} if g.trace is not None else {}
                    yield chunk(k, None, g.finish_reason, s2d2=g.stats.to_dict(), **rest)
                    break
            if (body.stream_options or {}).get("include_usage"):
                payload = {"id": rid, "object": kind, "created": created, "model": cfg.model_name, "choices": [],
                           "usage": _usage(prompt_ids, finished), "s2d2": _stats(finished)}
                yield f"data: {_json(payload)}\n\n"
            yield "data: [DONE]\n\n"
            metrics.latency.observe(time.monotonic() - start)
            metrics.requests.labels(endpoint, "200").inc()
        finally:
            for t in tickets:  # the client went away mid-stream (or an error): free every slot now
                worker.cancel(t)

    def _generation(model: Model, event: Event, decode_cfg: DecodeConfig, stopped: bool = False) -> Generation:
        stats = event.stats or DecodeStats()
        reason = "stop" if stopped else event.finish_reason or "length"
        g = model.to_generation(event.token_ids or [], reason, stats, decode_cfg, event.trace)
        metrics.prompt_tokens.inc(stats.prompt_tokens)
        metrics.generated_tokens.inc(len(g.token_ids))
        metrics.forwards.inc(stats.nfe)
        return g

    return app


def _json(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _validation_message(exc: RequestValidationError) -> APIError:
    """The first validation error as one sentence, naming the field."""
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON.", code="invalid_json")
    if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
        return APIError(400, "the request body must be a JSON object (sent with Content-Type: application/json).",
                        code="invalid_body")
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).rstrip(".")
    if err.get("type") == "missing":
        return APIError(400, f"field {param!r} is required.", param=param, code="missing_field")
    return APIError(400, f"field {param!r}: {msg[0].lower() + msg[1:] if msg else msg}.", param=param,
                    code="invalid_value")


def _completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completions request: a string, a list of strings, a list of ids, or a list of id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty.", param="prompt")
    if all(isinstance(x, int) for x in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _decode_config(model: Model, cfg: ServerConfig, body: _Request, max_tokens: int | None,
                   max_param: str) -> DecodeConfig:
    """The request's DecodeConfig: the server's defaults, the standard fields, then s2d2's extra fields."""
    if body.model is not None and body.model != cfg.model_name:
        raise APIError(400, f"model {body.model!r} is not served here; this server serves {cfg.model_name!r}.",
                       param="model", code="model_not_found")
    if not 1 <= body.n <= cfg.max_n:
        raise APIError(400, f"n must be between 1 and {cfg.max_n}, got {body.n}.", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise APIError(400, f"{name} is not supported (only 0).", param=name)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported.", param="logit_bias")
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported.", param="logprobs")
    extra = dict(body.model_extra or {})
    unknown = sorted(set(extra) - _EXTRA_FIELDS)
    if unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}; s2d2's own fields are: {', '.join(sorted(_EXTRA_FIELDS))}.",
                       param=unknown[0], code="unknown_field")
    changes: dict[str, Any] = dict(extra)
    if max_tokens is not None:
        changes["max_new_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed"):
        if getattr(body, name) is not None:
            changes[name] = getattr(body, name)
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        changes["stop"] = tuple(s for s in stops if s) or None
    for name in ("stop_token_ids",):
        if isinstance(changes.get(name), list):
            changes[name] = tuple(changes[name])
    try:
        return model.resolve_config(cfg.defaults, **changes)
    except S2D2Error as e:
        param = next((k for k in sorted(changes, key=len, reverse=True) if k in str(e)), None)
        if param == "max_new_tokens":
            raise APIError(400, str(e).replace("max_new_tokens", max_param), param=max_param) from None
        raise APIError(400, str(e), param=param) from None


def _encode(model: Model, prompt: str | list[int], cfg: DecodeConfig, index: int | None) -> list[int]:
    try:
        return model.encode_prompt(prompt, cfg)
    except S2D2Error as e:
        where = f"prompt {index}: " if index is not None else ""
        message = where + str(e).replace("max_new_tokens", "max_tokens")  # the request's name for it
        raise APIError(400, message, param="prompt" if index is None else f"prompt.{index}") from None


def _chat_message(m: ChatMessage, index: int) -> dict[str, str]:
    """A chat message as the template takes it: text parts joined; ``developer`` is OpenAI's newer ``system``."""
    if isinstance(m.content, list):
        parts = []
        for part in m.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"message {index}: only text content parts are supported.",
                               param=f"messages.{index}.content")
            parts.append(part["text"])
        content = "".join(parts)
    else:
        content = m.content or ""
    return {"role": "system" if m.role == "developer" else m.role, "content": content}


def _usage(prompt_ids: list[list[int]], generations: list[Generation]) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once (whatever ``n``), every choice's generated tokens."""
    prompt = sum(len(ids) for ids in prompt_ids)
    completion = sum(len(g.token_ids) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _stats(generations: list[Generation]) -> dict[str, Any]:
    return DecodeStats.total([g.stats for g in generations]).to_dict() if generations else DecodeStats().to_dict()


def serve(model: Model, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, cfg), host=host, port=port, log_level=log_level)
