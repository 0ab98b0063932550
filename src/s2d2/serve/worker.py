"""The API side of the server's engines, and its metrics.

The engines run in engine cores (:mod:`s2d2.serve.core`): by default one process per replica
(``--data-parallel-size``), each loading the model itself; an app made around a :class:`~s2d2.api.Model` object runs
one core on a thread of its own process instead. :class:`EngineWorker` is what the request handlers see: it sends
each request's generations (:class:`Ticket`) to the least-loaded ready replica, and hands each replica's events back
to the asyncio handler that waits for them.

Per replica (:class:`Replica`), one thread sends commands down its pipe (a full pipe never blocks the event loop)
and one reads events from it, cancels what ran past its deadline, and notices when the core is gone: a core process
that dies fails its in-flight requests with a 503 at once (none waits for a timeout) and is started again (after a
growing pause when it keeps dying soon after starting, and not after :data:`MAX_QUICK_RESTARTS` such deaths in a
row); until it says it is ready, ``/health`` reports it and requests go to the other replicas (a 503 when none is
ready).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from s2d2.api import Generation, Model
from s2d2.config import DecodeConfig
from s2d2.core.stats import DecodeStats
from s2d2.engine.engine import Event
from s2d2.errors import S2D2Error
from s2d2.serve.core import ModelSource, engine_slots, process_main, run_core
from s2d2.serve.protocol import APIError, ServerConfig

log = logging.getLogger("s2d2.serve")  # the server's one logger (not __name__: its name is what operators filter on)

# An engine process that dies is started again at once. One that keeps dying soon after it starts (out of memory
# at every start, a bad device) is started again after a pause that doubles each time, and given up after a few
# tries (the replica is then "failed" in /health, with the reason), instead of restarting in a loop.
STABLE_S = 60.0  # an engine that ran this long before it died is restarted at once, and its count starts over
RESTART_BACKOFF_S = 1.0  # the pause before the second quick restart in a row; doubled for each one after it
MAX_QUICK_RESTARTS = 5  # quick restarts in a row before giving up


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("s2d2_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("s2d2_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("s2d2_generated_tokens", "tokens generated", registry=r)
        self.forwards = Counter("s2d2_forwards", "forwards the generations took part in (summed NFE)", registry=r)
        self.steps = Counter("s2d2_engine_steps", "batched forwards run by the engine", ["replica"], registry=r)
        self.cancelled = Counter("s2d2_generations_cancelled", "generations stopped before their end: the client "
                                 "went away (cancelled), or the server's timeout passed (timeout)", ["reason"],
                                 registry=r)
        self.restarts = Counter("s2d2_engine_restarts", "engine processes started again after they stopped",
                                ["replica"], registry=r)
        self.running = Gauge("s2d2_requests_running", "generations holding a batch slot", ["replica"], registry=r)
        self.waiting = Gauge("s2d2_requests_waiting", "generations queued for a slot (queue depth)", ["replica"],
                             registry=r)
        self.occupancy = Gauge("s2d2_batch_occupancy", "share of the batch's slots in use", ["replica"], registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
        self.latency = Histogram("s2d2_request_latency_seconds", "time from request to its last token",
                                 buckets=buckets, registry=r)
        self.ttft = Histogram("s2d2_time_to_first_token_seconds", "time from request to its first streamed text",
                              buckets=buckets, registry=r)


class EngineGone(Exception):
    """A ticket's engine process stopped before the ticket finished."""


class Ticket:
    """One generation (one choice of one request) on its way through an engine; the handler awaits its events."""

    _keys = itertools.count()

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_ids: list[int], cfg: DecodeConfig, seed: int,
                 deadline: float, trace: bool = False, stream: bool = True) -> None:
        self.loop, self.prompt_ids, self.cfg, self.seed = loop, prompt_ids, cfg, seed
        self.deadline, self.trace = deadline, trace
        self.stream = stream  # False: only the final event is wanted (the engine sends no other)
        self.key = next(Ticket._keys)  # the ticket's name in its replica's messages
        self.events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.replica: Replica | None = None  # set when submitted
        self.done = False  # set when the final event (or a failure) is delivered

    def deliver(self, item: Event | BaseException) -> None:
        """Hand an event (or a failure) to the waiting handler; called from a replica's reader thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class _Load:
    """A replica's last reported load."""

    running: int = 0
    waiting: int = 0


@dataclass
class Replica:
    """One engine core (a process, or a thread around a given model) and the two threads that talk to it."""

    index: int
    model: Model
    cfg: ServerConfig
    metrics: Metrics
    source: ModelSource | None  # None: a core thread over ``model``
    ready: bool = False
    restarts: int = 0
    pid: int | None = None
    error: str | None = None  # why the last start failed, if it did
    load: _Load = field(default_factory=_Load)
    slots: int = 0  # the engine's slots (what max_batch "auto" chose), known once it is ready

    def __post_init__(self) -> None:
        self._tickets: dict[int, Ticket] = {}
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._stopping = False
        self._core: Any = None  # the Process or Thread
        self._threads: list[threading.Thread] = []
        self._started_at = 0.0
        self._quick_deaths = 0  # deaths within STABLE_S of their start, in a row
        self._next_start = 0.0  # when a paused restart will start (time.monotonic), while it waits
        self._stop_event = threading.Event()  # cuts a restart's pause short when the server stops

    # -- life
    def start(self) -> None:
        """Start the core and the threads that talk to it."""
        commands_out, commands_in = _pipe()
        events_out, events_in = _pipe()
        label = f"s2d2-engine-{self.index}"
        self._started_at = time.monotonic()
        if self.source is None:
            self.slots = engine_slots(self.model, self.cfg.max_batch)
            self._core = threading.Thread(target=run_core, name=label, daemon=True,
                                          args=(self.model, self.slots, commands_out, events_in,
                                                self.cfg.stream_interval_s))
            self.ready = True
        else:
            context = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited threads or CUDA state
            self._core = context.Process(target=process_main, name=label, daemon=True,
                                         args=(self.source.for_replica(self.index), self.cfg.max_batch,
                                               commands_out, events_in, self.cfg.stream_interval_s))
        self._core.start()
        if self.source is not None:  # the child holds its ends now; closing ours makes its death read as EOF
            commands_out.close()
            events_in.close()
        self._outbox = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._send, args=(commands_in, self._outbox), daemon=True,
                                          name=f"{label}-send"),
                         threading.Thread(target=self._receive, args=(events_out,), daemon=True,
                                          name=f"{label}-receive")]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the core to stop and wait for it (a process that does not stop in time is terminated)."""
        self._stopping = True
        self._stop_event.set()
        self._outbox.put(("stop",))
        self._outbox.put(None)
        self._core.join(timeout=timeout)
        if isinstance(self._core, multiprocessing.process.BaseProcess) and self._core.is_alive():
            self._core.terminate()
            self._core.join(timeout=5)
        for t in self._threads:
            t.join(timeout=timeout)

    # -- the handlers' side
    @property
    def outstanding(self) -> int:
        """Tickets submitted and not yet finished (running or waiting)."""
        return len(self._tickets)

    def submit(self, tickets: list[Ticket]) -> None:
        """Send the tickets to the core (an :class:`EngineGone` if it stopped meanwhile)."""
        with self._lock:  # not while the core is being replaced: a ticket is failed or sent to the new one
            if not self.ready:
                raise EngineGone("not ready")
            for t in tickets:
                t.replica = self
                self._tickets[t.key] = t
                self._outbox.put(("add", t.key, t.prompt_ids, t.cfg, t.seed, t.trace, t.stream))

    def cancel(self, ticket: Ticket, reason: str = "cancelled") -> None:
        if not ticket.done:
            self._outbox.put(("cancel", ticket.key, reason))

    # -- threads
    @staticmethod
    def _send(conn: Any, outbox: queue.SimpleQueue) -> None:
        try:
            while (message := outbox.get()) is not None:
                conn.send(message)
        except (OSError, EOFError):  # the core is gone; the reader reports it
            pass
        finally:
            conn.close()

    def _receive(self, conn: Any) -> None:
        try:
            while not self._stopping:
                if conn.poll(0.1):
                    self._handle(conn.recv())
                self._expire()
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
        if not self._stopping:
            self._core_gone()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            self.ready, self.pid, self.error, self.slots = True, message[1]["pid"], None, message[1]["slots"]
            log.info("engine %d ready (pid %d, %s, %d threads, %d slots)", self.index, self.pid, message[1]["device"],
                     message[1]["threads"], self.slots)
        elif kind == "load_failed":
            self.error = message[1]
            log.error("engine %d could not load the model: %s", self.index, message[1])
        elif kind == "failed":  # a step raised in the core: its requests fail, the core goes on
            log.error("engine %d: a step failed (%s); failing its %d requests", self.index, message[2],
                      len(message[1]))
            for key in message[1]:
                self._finish(key, RuntimeError(message[2]))
        elif kind == "events":
            _, events, steps, running, waiting = message
            for key, event in events:
                if event.finished:
                    if event.finish_reason in ("cancelled", "timeout"):
                        self.metrics.cancelled.labels(event.finish_reason).inc()
                    self._finish(key, event)
                elif (ticket := self._tickets.get(key)) is not None:
                    ticket.deliver(event)
            if steps:
                self.metrics.steps.labels(str(self.index)).inc(steps)
            self.load = _Load(running, waiting)
            self._update_gauges()

    def _finish(self, key: int, item: Event | BaseException) -> None:
        with self._lock:
            ticket = self._tickets.pop(key, None)
        if ticket is not None:
            ticket.done = True
            ticket.deliver(item)

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in list(self._tickets.values()) if t.deadline < now and not t.done]:
            ticket.deadline = float("inf")  # asked once
            self.cancel(ticket, "timeout")

    def _core_gone(self) -> None:
        """The core process died: fail its requests now (503), then start it again."""
        self._core.join(timeout=1)
        code = getattr(self._core, "exitcode", None)
        with self._lock:
            self.ready = False
            self._outbox.put(None)  # its sender thread ends
            lost = list(self._tickets)
        log.error("engine %d stopped (exit code %s); failing its %d requests and starting it again", self.index,
                  code, len(lost))
        for key in lost:
            self._finish(key, EngineGone(f"exit code {code}"))
        self.load = _Load()
        self._update_gauges()
        if self.source is None or self.error is not None:  # a model that cannot load is not restarted in a loop
            return
        quick = time.monotonic() - self._started_at < STABLE_S
        self._quick_deaths = self._quick_deaths + 1 if quick else 0
        if self._quick_deaths > MAX_QUICK_RESTARTS:
            self.error = (f"the engine stopped {self._quick_deaths} times in a row within {STABLE_S:g} s of starting "
                          f"(last exit code {code}); it is not started again")
            log.error("engine %d: %s", self.index, self.error)
            return
        pause = RESTART_BACKOFF_S * 2 ** (self._quick_deaths - 2) if self._quick_deaths > 1 else 0.0
        if pause:
            log.warning("engine %d stopped %d times in a row soon after starting; starting it again in %g s",
                        self.index, self._quick_deaths, pause)
            self._next_start = time.monotonic() + pause
            stopped = self._stop_event.wait(pause)
            self._next_start = 0.0
            if stopped:
                return
        self.restarts += 1
        self.metrics.restarts.labels(str(self.index)).inc()
        self.start()

    def _update_gauges(self) -> None:
        label = str(self.index)
        self.metrics.running.labels(label).set(self.load.running)
        self.metrics.waiting.labels(label).set(self.load.waiting)
        self.metrics.occupancy.labels(label).set(self.load.running / self.slots if self.slots else 0.0)

    def health(self) -> dict[str, Any]:
        status = "ok" if self.ready else ("failed" if self.error else "starting")
        out: dict[str, Any] = {"replica": self.index, "status": status, "running": self.outstanding,
                               "slots": self.slots, "restarts": self.restarts, "pid": self.pid}
        if self.error:
            out["error"] = self.error
        if self._next_start:  # a restart pausing after repeated quick deaths
            out["next_start_in_s"] = round(max(0.0, self._next_start - time.monotonic()), 1)
        return out


def _pipe() -> tuple[Any, Any]:
    """A one-way pipe, as (reading end, writing end)."""
    return multiprocessing.Pipe(duplex=False)


class EngineWorker:
    """The server's engines as the request handlers see them: submit, cancel, await events, convert results."""

    def __init__(self, model: Model, cfg: ServerConfig, metrics: Metrics, source: ModelSource | None = None) -> None:
        self.model, self.cfg, self.metrics = model, cfg, metrics
        if source is None and cfg.data_parallel_size > 1:
            raise S2D2Error("data_parallel_size > 1 needs engine processes: pass the model's source (ModelSource).")
        count = cfg.data_parallel_size
        self.replicas = [Replica(i, model, cfg, metrics, source) for i in range(count)]
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        """Start every replica (once: a later call does nothing)."""
        if not self._started:
            self._started = True
            for r in self.replicas:
                r.start()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every replica has loaded its model; an :class:`S2D2Error` naming the cause if one could not
        (or ``timeout`` seconds passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not all(r.ready for r in self.replicas):
            failed = next((r for r in self.replicas if r.error), None)
            if failed is not None:
                raise S2D2Error(f"engine {failed.index} could not load the model ({failed.error}).")
            if deadline is not None and time.monotonic() > deadline:
                raise S2D2Error(f"the engines were not ready within {timeout:g} s.")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._started:
            for r in self.replicas:
                r.stop()

    @property
    def outstanding(self) -> int:
        return sum(r.outstanding for r in self.replicas)

    def health(self) -> dict[str, Any]:
        """``/health``: ok when every replica is ready, degraded when some are, starting (or failed) when none."""
        replicas = [r.health() for r in self.replicas]
        ready = sum(r.ready for r in self.replicas)
        status = "ok" if ready == len(replicas) else "degraded" if ready else (
            "failed" if all(r.error for r in self.replicas) else "starting")
        return {"status": status, "running": self.outstanding, "replicas": replicas}

    def submit(self, tickets: list[Ticket]) -> None:
        """Send a request's tickets to the least-loaded ready replica, all or none: a 429 when they would overflow
        its queue, a 503 when no replica is ready."""
        with self._lock:
            ready = [r for r in self.replicas if r.ready]
            if not ready and all(r.error for r in self.replicas):
                raise APIError(503, f"no engine can serve: {self.replicas[0].error}.", error_type="server_error",
                               code="engine_failed")
            if not ready:
                raise APIError(503, "no engine is ready yet (starting, or restarting after a failure); retry shortly.",
                               error_type="server_error", code="engine_unavailable", headers={"Retry-After": "1"})
            replica = min(ready, key=lambda r: (r.outstanding, r.index))
            limit = replica.slots + self.cfg.max_queue
            if replica.outstanding + len(tickets) > limit:
                raise APIError(429, f"the server is busy: {replica.outstanding} requests are running or queued (limit "
                               f"{limit}); retry shortly.", error_type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": "1"})
            try:
                replica.submit(tickets)
            except EngineGone:  # it stopped between the choice and the submission
                raise APIError(503, "the engine stopped; it is being restarted, retry shortly.",
                               error_type="server_error", code="engine_restarting",
                               headers={"Retry-After": "1"}) from None

    def cancel(self, ticket: Ticket) -> None:
        """Ask the ticket's engine to stop it (a client went away); its slot is freed at the next step."""
        if ticket.replica is not None:
            ticket.replica.cancel(ticket)

    async def next_event(self, request: Request | None, ticket: Ticket) -> Event | None:
        """The ticket's next event, or None once the client of ``request`` has disconnected (the ticket is then
        cancelled; polled while no event comes for 0.25 s). ``request`` None: the caller watches the client."""
        while True:
            if request is None:
                item = await ticket.events.get()
            else:
                try:
                    item = await asyncio.wait_for(ticket.events.get(), timeout=0.25)
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    if await request.is_disconnected():
                        self.cancel(ticket)
                        return None
                    continue
            if isinstance(item, EngineGone):
                raise APIError(503, f"the engine decoding this request stopped ({item}); it is being restarted, "
                               "retry shortly.", error_type="server_error", code="engine_restarting",
                               headers={"Retry-After": "1"})
            if isinstance(item, BaseException):
                raise APIError(500, f"decoding failed ({type(item).__name__}: {item}).", error_type="internal_error")
            if item.finished and item.finish_reason == "refused":
                raise APIError(503, item.error or "there is no memory for this request.", error_type="server_error",
                               code="insufficient_memory")
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
