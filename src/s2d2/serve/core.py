"""The engine core: the batched engine of one replica, driven by messages.

A core owns a model and its :class:`~s2d2.engine.engine.Engine` and talks to the API side only through two one-way
pipes: commands in (add a request, cancel one, stop), events out (each step's events, the engine's load). It runs
as the main thread of a process of its own (:func:`process_main`, what ``s2d2 serve`` starts, one per replica: the
decoding never shares a GIL with request handling, and torch's thread pool runs from a main thread, measured faster
than from a worker thread) or, for an app made around a :class:`~s2d2.api.Model` object, as a thread of the server's
process (:func:`run_core`, the same loop).

Messages (tuples, pickled by :mod:`multiprocessing`):

- in: ``("add", key, prompt_ids, config, seed, trace, stream)``, ``("cancel", key, reason)``, ``("stop",)``
  (``stream`` False: only the request's final event is sent, not one per step)
- out: ``("ready", info)`` once the model is loaded (a process core; ``info["slots"]``: the engine's slots, what
  ``max_batch="auto"`` chose), ``("load_failed", message)``,
  ``("events", [(key, Event), ...], steps, running, waiting)`` after each step or command batch, and
  ``("failed", keys, message)`` when a step raised (those requests fail; the core goes on with a fresh engine).

A request is drawn with ``torch.Generator().manual_seed(seed)`` here, the generator the API side would have made:
sampled output does not depend on where the core runs.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from s2d2.engine.engine import Engine, Event
from s2d2.engine.memory import AUTO_LIMIT, AUTO_LIMIT_OTHER, plan_batch

log = logging.getLogger("s2d2.serve")

# token slots per row in the shared cache; a longer request gets buffers of its own while it runs (or waits for
# memory, or is refused: BatchKVCache.give_own, Engine._admit)
CACHE_CAPACITY = 256


@dataclass(frozen=True)
class ModelSource:
    """How an engine process loads its model (the arguments of :func:`s2d2.load`), and its CPU threads."""

    name_or_path: str
    device: str = "cpu"
    dtype: str = "auto"
    adapter: str | None = None
    compile: bool = False
    threads: int | None = None  # torch's intra-op threads in the engine process (None: torch's default)

    def for_replica(self, replica: int) -> ModelSource:
        """The source of replica ``replica``: on CUDA, each replica takes a GPU of its own (``cuda:replica``)."""
        if self.device.split(":")[0] == "cuda" and ":" not in self.device:
            return ModelSource(self.name_or_path, f"cuda:{replica}", self.dtype, self.adapter, self.compile,
                               self.threads)
        return self


def engine_slots(model: Any, max_batch: int | str) -> int:
    """The engine's slots: ``max_batch``, or with ``"auto"`` as many as fit in the free memory (each slot's shared
    cache of :data:`CACHE_CAPACITY` tokens and a forward over all of them), up to the device's limit; an explicit
    number that cannot fit is a ConfigError sentence."""
    limit = AUTO_LIMIT.get(model.device.type, AUTO_LIMIT_OTHER) if max_batch == "auto" else max_batch
    # the most logit rows a request's forward asks for: a verification that drafts the next block, at block 32
    plan = plan_batch(model.adapter.model.config, model.dtype, model.device, max_batch, limit, CACHE_CAPACITY,
                      logit_rows=96, query_rows=CACHE_CAPACITY)
    log.info("engine slots: %s", plan.describe())
    return plan.rows


def process_main(source: ModelSource, max_batch: int | str, commands: Connection, events: Connection,
                 stream_interval: float = 0.0) -> None:
    """An engine process: load the model, say so, and run the core until told to stop (or the API side is gone)."""
    from s2d2.api import load  # here, in the child: the parent's import does not travel with a spawned process

    # Signals are the API process's to act on: a SIGTERM to the whole process group (systemd's default) or a Ctrl-C
    # must let the server drain, not kill its engines mid-request. The engine stops when told, or when the API
    # process is gone (its pipe closes).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if source.threads is not None:
        torch.set_num_threads(source.threads)
    try:
        model = load(source.name_or_path, device=source.device, dtype=source.dtype, adapter=source.adapter,
                     compile=source.compile)
        if source.compile:
            model.warm_up()
        slots = engine_slots(model, max_batch)
    except Exception as e:  # noqa: BLE001 - any load failure: the API side reports it
        _tell(events, ("load_failed", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from None
    if _tell(events, ("ready", {"pid": os.getpid(), "device": str(model.device),
                                "threads": torch.get_num_threads(), "slots": slots})):
        run_core(model, slots, commands, events, stream_interval)


def _tell(events: Connection, message: tuple) -> bool:
    """Send ``message``; False when the API side has gone meanwhile (it stopped while this engine loaded)."""
    try:
        events.send(message)
        return True
    except OSError:
        return False


def run_core(model: Any, max_batch: int, commands: Connection, events: Connection,
             stream_interval: float = 0.0) -> None:
    """Serve commands until ``("stop",)`` or until the command pipe closes: between steps, admit and cancel what
    the commands say; step while any request runs; send the steps' events. Streamed progress is held for up to
    ``stream_interval`` seconds and sent as one event per request (:class:`_Outbox`); final events go at once."""
    torch.set_grad_enabled(False)
    core = _Core(model, max_batch)
    outbox = _Outbox(events, stream_interval)
    try:
        while True:
            # idle: wait for a command; busy: take what has arrived and go on stepping
            if core.engine.idle and not commands.poll(0.5):
                continue
            while commands.poll(0):
                message = commands.recv()
                if message[0] == "stop":
                    return
                try:
                    core.handle(message)
                except Exception as e:  # noqa: BLE001 - a request the engine refuses fails alone
                    log.exception("engine refused a request")
                    events.send(("failed", [message[1]], f"{type(e).__name__}: {e}"))
            out, steps = core.take(), 0
            if not core.engine.idle:
                try:
                    out += core.step()
                    steps = 1
                except Exception as e:  # a bug, or memory: fail this batch's requests, keep serving the next ones
                    log.exception("engine step failed; failing its %d requests", len(core.keys))
                    events.send(("failed", list(core.keys.values()), f"{type(e).__name__}: {e}"))
                    core = _Core(model, max_batch)
                    continue
            if out or steps:
                outbox.add(out, steps, core.engine.num_running, core.engine.num_waiting)
    except (EOFError, OSError):  # the API side is gone: nothing is left to serve
        return
    finally:
        events.close()


class _Outbox:
    """The events going up to the API side. Every step's events would be a message each: the API process then wakes,
    detokenizes and writes a chunk per step per request, on the cores the engine decodes on. With an ``interval``,
    progress events wait up to that long and a request's waiting ones become one (its new tokens joined), so a
    stream carries fewer, larger chunks; anything final (a finished request, a cancellation) sends everything at
    once, as does an engine with nothing left running."""

    def __init__(self, events: Connection, interval: float) -> None:
        self.events, self.interval = events, interval
        self.held: dict[int, Event] = {}  # ticket key -> its progress since the last message
        self.steps, self.sent_at = 0, time.monotonic()

    def add(self, out: list[tuple[int, Event]], steps: int, running: int, waiting: int) -> None:
        self.steps += steps
        final = [(key, event) for key, event in out if event.finished]
        for key, event in out:
            if not event.finished:
                self.held[key] = _joined(self.held[key], event) if key in self.held else event
        now = time.monotonic()
        if final or not running or now - self.sent_at >= self.interval:
            message = [*self.held.items(), *final]  # a request's progress before its end
            self.events.send(("events", message, self.steps, running, waiting))
            self.held, self.steps, self.sent_at = {}, 0, now


def _joined(first: Event, then: Event) -> Event:
    """Two progress events of one request as one: the tokens (and trace events) of both, in order."""
    trace = None if first.trace_events is None and then.trace_events is None else [
        *(first.trace_events or []), *(then.trace_events or [])]
    return Event(first.request_id, first.new_token_ids + then.new_token_ids, trace_events=trace)


class _Core:
    """One engine and the mapping between its request ids and the API side's ticket keys."""

    def __init__(self, model: Any, max_batch: int) -> None:
        self.model = model
        self.engine = Engine(model.adapter, max_batch, capacity=CACHE_CAPACITY, stream=True)
        self.keys: dict[int, int] = {}  # engine request id -> ticket key
        self.ids: dict[int, int] = {}  # ticket key -> engine request id
        self.quiet: set[int] = set()  # engine request ids whose progress events nobody reads (not streamed)
        self._pending: list[tuple[int, Event]] = []  # cancellations' final events, sent with the next message

    def handle(self, message: tuple) -> None:
        if message[0] == "add":
            _, key, prompt_ids, cfg, seed, trace, stream = message
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
            rid = self.engine.add(prompt_ids, cfg, generator, self.model.stop_check(cfg), trace)
            self.keys[rid], self.ids[key] = key, rid
            if not stream:
                self.quiet.add(rid)
        elif message[0] == "cancel":
            _, key, reason = message
            rid = self.ids.pop(key, None)
            event = self.engine.cancel(rid) if rid is not None else None
            if event is not None:
                self.keys.pop(rid, None)
                self.quiet.discard(rid)
                event.finish_reason = reason
                self._pending.append((key, event))

    def take(self) -> list[tuple[int, Event]]:
        out, self._pending = self._pending, []
        return out

    def step(self) -> list[tuple[int, Event]]:
        out = []
        for event in self.engine.step():
            key = self.keys.get(event.request_id)
            if key is None or (not event.finished and event.request_id in self.quiet):
                continue
            if event.finished:
                del self.keys[event.request_id]
                self.ids.pop(key, None)
                self.quiet.discard(event.request_id)
            out.append((key, event))
        return out
