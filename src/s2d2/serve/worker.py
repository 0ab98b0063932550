"""The server's engine thread and its metrics.

The engine (:class:`s2d2.engine.engine.Engine`) runs on one worker thread (:class:`EngineWorker`), which owns it:
requests reach it through a queue, it admits them between steps (continuous batching: a request takes a slot as
soon as one frees, it never waits for the batch to drain), and it hands each request's progress back to the
asyncio handler that waits for it. A client that disconnects, or a request past the server's timeout, is cancelled
at the worker's next step and its slot freed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from s2d2.api import Generation, Model
from s2d2.config import DecodeConfig
from s2d2.core.stats import DecodeStats
from s2d2.engine.engine import Engine, Event
from s2d2.serve.protocol import APIError, ServerConfig

log = logging.getLogger("s2d2.serve")  # the server's one logger (not __name__: its name is what operators filter on)


class Metrics:
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

    def __init__(self, model: Model, cfg: ServerConfig, metrics: Metrics) -> None:
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

    # -- the handlers' side (event loop)
    async def next_event(self, request: Request, ticket: Ticket) -> Event | None:
        """The ticket's next event, or None once the client has disconnected (the ticket is then cancelled)."""
        while True:
            try:
                item = await asyncio.wait_for(ticket.events.get(), timeout=0.25)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                if await request.is_disconnected():
                    self.cancel(ticket)
                    return None
                continue
            if isinstance(item, BaseException):
                raise APIError(500, f"decoding failed ({type(item).__name__}: {item}).", error_type="internal_error")
            if item.finished and item.finish_reason == "timeout":
                raise APIError(504, f"the request did not finish within the server's timeout of "
                               f"{self.cfg.timeout_s:g} s.", error_type="timeout_error", code="timeout")
            return item

    def generation(self, event: Event, decode_cfg: DecodeConfig, stopped: bool = False) -> Generation:
        """A finished ticket's result, counted in the token metrics. ``stopped``: its streamed text met a stop string
        and the ticket was cancelled for it, so it finished for a stop (not ``cancelled``)."""
        stats = event.stats or DecodeStats()
        reason = "stop" if stopped else event.finish_reason or "length"
        g = self.model.to_generation(event.token_ids or [], reason, stats, decode_cfg, event.trace)
        self.metrics.prompt_tokens.inc(stats.prompt_tokens)
        self.metrics.generated_tokens.inc(len(g.token_ids))
        self.metrics.forwards.inc(stats.nfe)
        return g

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
