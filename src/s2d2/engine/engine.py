"""The batched engine: many requests decoded together, one forward per engine step, each row at its own pace.

Each request is a row running the per-row algorithm (:func:`s2d2.core.loop.decode_steps`) in its own slot of a
:class:`~s2d2.models.cache.BatchKVCache`. A step collects the forward every active row needs next, whatever its
kind (a draft, a 2L verification, a verification that also drafts the next block, a commit), runs them as one
packed forward (:mod:`s2d2.models.batching`, :func:`s2d2.engine.runner.forward_packed`) and hands each row its
:class:`~s2d2.core.requests.Scored` logits in one numerical stage (:meth:`Engine._score`): the greedy rows' choices
of the whole batch and the sampled rows' draws (made on the device) reach the host in one transfer per step.
A step with a single active row runs that row's own forward unpacked (:func:`s2d2.engine.runner.run` on its cache
slot), so batch 1 costs what the plain loop costs.
The engine only schedules: it never decides what a row does, so a row's tokens and forward counts are those of
batch-1 decoding, whatever shares its batch (design invariant 7); sampled rows draw from their own generator.

Continuous batching: requests wait in a queue; a finished or cancelled row frees its slot and the next waiting
request takes it at the following step, while the others go on.
"""

from __future__ import annotations

import collections
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from s2d2.config import DecodeConfig, check_batch_size
from s2d2.core.loop import decode_steps
from s2d2.core.requests import (
    CommitRequest,
    ForwardRequest,
    HostRead,
    KeepRows,
    RowInput,
    RowState,
    RowSteps,
    Scored,
    pad_rows,
)
from s2d2.core.routing import reads_features
from s2d2.core.sampler import sample
from s2d2.core.sampling import Sampling, filtered_probs, greedy_table, read_choices
from s2d2.core.state import sequence_length
from s2d2.core.stats import DecodeStats
from s2d2.core.trace import Tracer
from s2d2.engine.memory import MARGIN, format_bytes, free_memory, request_rows, row_bytes
from s2d2.engine.runner import (
    ForwardTimer,
    forward_packed,
    packed_bounds,
    read_together,
    request_spec,
    run,
    split_packed,
)
from s2d2.errors import ConfigError
from s2d2.families.base import FamilyAdapter
from s2d2.models.batching import ForwardSpec, pack
from s2d2.models.cache import SlotCache


@dataclass
class Event:
    """What one step did for one request: tokens newly committed at the left edge (every token before them is
    committed, so they can be streamed), and, when ``finished``, the request's result."""

    request_id: int
    new_token_ids: list[int]
    finished: bool = False
    token_ids: list[int] | None = None  # the whole generation (stop token excluded), when finished
    finish_reason: str | None = None  # "stop", "length", "cancelled", or "refused" (no memory for it: ``error``)
    stats: DecodeStats | None = None
    trace: list[dict] | None = None  # the request's step trace (s2d2.core.trace), when finished and traced
    trace_events: list[dict] | None = None  # streaming a traced request: the trace events recorded since the last
    error: str | None = None  # why a refused request was refused, in one sentence
    stop_token_id: int | None = None  # the stop token that ended the request, when one did (not in token_ids)


@dataclass
class BatchStats:
    """Engine-level counters: the batch's forwards, and how full they were."""

    steps: int = 0  # engine steps, i.e. batched forwards
    row_forwards: int = 0  # (row, forward) pairs: the sum of the rows' NFE
    rows_computed: int = 0  # query rows the token-wise layers computed (valid rows only: rows are packed)
    padded_rows: int = 0  # padding in the attention layout (rows x longest row)
    forward_time_s: float = 0.0
    # the rows' own algorithm between forwards and the numerical stage that feeds it (what batch-1 decoding also
    # spends; the stage was counted as the engine's before the sampled rows joined it)
    row_time_s: float = 0.0
    time_s: float = 0.0  # wall time inside step()
    num_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(
            rows_per_forward=self.rows_computed / self.steps if self.steps else 0.0,
            mean_batch=self.row_forwards / self.steps if self.steps else 0.0,
            padding_share=self.padded_rows / (self.rows_computed + self.padded_rows) if self.rows_computed else 0.0,
            host_share=1.0 - self.forward_time_s / self.time_s if self.time_s > 0 else 0.0,
            # host time that is the engine's own: admitting, building and packing the forwards, bookkeeping
            engine_share=((self.time_s - self.forward_time_s - self.row_time_s) / self.time_s
                          if self.time_s > 0 else 0.0),
            tokens_per_s=self.num_tokens / self.time_s if self.time_s > 0 else 0.0,
        )
        return d


@dataclass
class _Row:
    request_id: int
    slot: int
    cache: SlotCache
    steps: RowSteps
    state: RowState
    features: frozenset[str]  # the drafts' distribution features its routing reads (core.routing.reads_features)
    sampling: Sampling | None  # None: reads its greedy choices; else gets its distributions, draws with HostRead
    pending: ForwardRequest | None = None
    read: HostRead | None = None  # values the row asked to read, waiting for the step's one transfer
    reported: int = 0  # generated tokens already sent in events (streaming)
    trace_reported: int = 0  # trace events already sent in events (streaming a traced request)


@dataclass
class _Waiting:
    request_id: int
    prompt_ids: list[int]
    config: DecodeConfig
    generator: torch.Generator | None
    stop_check: Callable[[list[int]], bool] | None
    capacity: int  # token slots the request needs in its cache slot
    trace: bool = False


class Engine:
    """Continuous batching over one model: ``add`` requests, call ``step`` until ``idle``, ``cancel`` any time.

    ``max_batch_size`` rows decode at once. Prompts must already be checked (``Model.generate`` does it). With
    ``stream``, every step also reports each row's newly committed left-edge tokens (not only finished requests).
    """

    def __init__(self, adapter: FamilyAdapter, max_batch_size: int, capacity: int = 256, stream: bool = False) -> None:
        if check_batch_size(max_batch_size) == "auto":
            raise ConfigError("the engine takes a number of slots; s2d2.engine.memory.plan_batch chooses one.")
        self.adapter = adapter
        self.cache = adapter.new_batch_cache(max_batch_size, capacity)
        self.stats = BatchStats()
        self.stream = stream
        self._free = list(range(max_batch_size))  # a heap: the lowest free slot first, so busy slots stay 0..n-1
        self._rows: dict[int, _Row] = {}
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._next_id = 0
        self._timer = ForwardTimer(adapter.device)

    @property
    def idle(self) -> bool:
        """No request is running or waiting."""
        return not self._rows and not self._waiting

    def add(self, prompt_ids: list[int], config: DecodeConfig, generator: torch.Generator | None = None,
            stop_check: Callable[[list[int]], bool] | None = None, trace: bool = False) -> int:
        """Queue a request; returns its id. It starts at the next step with a free slot. ``generator`` draws its
        samples; ``stop_check(generated_ids)`` ends it after a block (stop strings), as in ``decode_steps``;
        ``trace`` records its step trace (:mod:`s2d2.core.trace`), returned with its final event."""
        rid = self._next_id
        self._next_id += 1
        capacity = row_capacity(self.adapter, len(prompt_ids), config)
        self._waiting.append(_Waiting(rid, list(prompt_ids), config, generator, stop_check, capacity, trace))
        return rid

    @property
    def num_running(self) -> int:
        """Requests holding a slot."""
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    def cancel(self, request_id: int) -> Event | None:
        """Stop a request now (running or waiting) and free its slot. Returns its final event (finish reason
        ``"cancelled"``, the tokens committed left of the first mask so far, its stats), or None if the request is
        unknown or already finished."""
        for w in self._waiting:
            if w.request_id == request_id:
                self._waiting.remove(w)
                return Event(request_id, [], True, [], "cancelled", DecodeStats(prompt_tokens=len(w.prompt_ids)))
        row = self._rows.pop(request_id, None)
        if row is None:
            return None
        row.steps.close()
        self.cache.release(row.slot)
        heapq.heappush(self._free, row.slot)
        generated = row.state.seq.generated() if row.state.seq is not None else []
        row.state.stats.num_tokens = len(generated)
        return Event(request_id, generated[row.reported:], True, generated, "cancelled", row.state.stats)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting requests into free slots, run one batched forward for every active row, and return what
        happened: newly committed tokens per row, and finished requests."""
        t0 = time.perf_counter()
        events: list[Event] = []
        self._admit(events)
        rows = sorted((r for r in self._rows.values() if r.pending is not None), key=lambda r: r.slot)
        if rows:
            specs = [self._spec(r) for r in rows]
            if len(rows) == 1:  # one row: its own forward, unpacked, so batch 1 costs what the plain loop costs
                with self._timer:
                    logits = run(self.adapter, specs[0], rows[0].cache)
                parts, bounds = [logits], [(0, len(logits), 0)]
                num_rows, num_padded = specs[0].num_rows, 0
            else:
                slots = [r.slot for r in rows]
                batch = pack(specs, slots, [self.cache.lengths[s] for s in slots], self.adapter.device, self.cache.own)
                with self._timer:
                    logits = forward_packed(self.adapter, batch, specs, self.cache, slots)
                parts, bounds = split_packed(batch, specs, logits), packed_bounds(batch, specs)
                num_rows, num_padded = batch.num_rows, batch.num_padded
            elapsed = self._timer.elapsed
            self.stats.steps += 1
            self.stats.row_forwards += len(rows)
            self.stats.rows_computed += num_rows
            self.stats.padded_rows += num_padded
            self.stats.forward_time_s += elapsed
            t1 = time.perf_counter()
            for row, spec in zip(rows, specs):
                row.state.stats.forward_time_s += elapsed
                row.state.stats.query_rows += spec.num_rows
                if row.state.trace is not None:
                    row.state.trace.forward_done(spec.num_rows, elapsed)
            self._score(rows, parts, logits, bounds, events)
            self.stats.row_time_s += time.perf_counter() - t1
        self.stats.time_s += time.perf_counter() - t0
        return events

    def _score(self, rows: list[_Row], parts: list[torch.Tensor], logits: torch.Tensor,
               bounds: list[tuple[int, int, int]], events: list[Event]) -> None:
        """The step's numerical stage: hands every row its forward's logits and what it reads of them, in one
        transfer to the host (issue 28). Sampled rows get their filtered distributions, computed for all of them at
        once, and ask for their draws (:class:`HostRead`), which the step's sampler makes for all of them at once;
        then the greedy rows' choices of the whole ``logits`` (the step's logit rows; row ``k``'s are
        ``bounds[k]``: start, stop, front padding) and those draws cross together."""
        commits = {k for k, row in enumerate(rows) if isinstance(row.pending, CommitRequest)}  # no logits to read
        greedy = [k for k, row in enumerate(rows) if row.sampling is None and k not in commits]
        sampled = [k for k, row in enumerate(rows) if row.sampling is not None and k not in commits]
        probs = _sampled_probs(rows, sampled, logits, bounds)
        for k, row in enumerate(rows):
            if k in commits:
                self._advance(row, None, events)
            elif k in probs:
                self._advance(row, Scored(parts[k], None, probs[k], pad=bounds[k][2]), events)
        features = frozenset().union(*(rows[k].features for k in greedy))
        tables = [greedy_table(logits, features)] if greedy else []
        reading = [row for row in rows if row.read is not None]
        while tables or reading:  # (a row reads once per forward; one that read again would wait for a second read)
            drawn, results = sample([row.read.items for row in reading])
            values = read_together(tables + drawn)
            if tables:
                choices = read_choices(values[0], features)
                for k in greedy:
                    start, stop, pad = bounds[k]
                    self._advance(rows[k], Scored(parts[k], choices.rows(start, stop).pad_front(pad), pad=pad), events)
            for row, result in zip(reading, results(values[len(tables):])):
                row.read = None
                self._advance(row, result, events)
            tables, reading = [], [row for row in reading if row.read is not None]

    def _admit(self, events: list[Event]) -> None:
        deferred: list[_Waiting] = []  # long requests waiting for memory that running ones will give back
        while self._waiting and self._free:
            w = self._waiting.popleft()
            own = w.capacity > self.cache.capacity  # longer than the shared slots: buffers of its own, while it runs
            if own and not self._own_memory(w, events, deferred):
                continue
            slot = heapq.heappop(self._free)
            if own:
                self.cache.give_own(slot, w.capacity)
            state, cache = RowState(trace=Tracer() if w.trace else None), self.cache.slot(slot)
            cache.reset()  # the slot's last request is gone: this row starts from an empty cache
            steps = decode_steps(w.prompt_ids, w.config, cache, self.adapter.traits, w.generator, w.stop_check, state)
            row = _Row(w.request_id, slot, cache, steps, state, reads_features(w.config, w.trace),
                       Sampling.of(w.config))
            self._rows[w.request_id] = row
            self._advance(row, None, events, first=True)
        self._waiting.extendleft(reversed(deferred))  # first in the queue again, in their order

    def _own_memory(self, w: _Waiting, events: list[Event], deferred: list[_Waiting]) -> bool:
        """Whether a request longer than the shared slots can have buffers of its own now. If not, it waits for
        the memory of running long requests (``deferred``), or, when even all of that would not be enough, it is
        refused (a final event with the reason)."""
        model = self.adapter.model
        need = row_bytes(model.config, model.embed.weight.dtype, w.capacity,
                         *request_rows(len(w.prompt_ids), w.config.block_size))
        free = int(free_memory(self.adapter.device) * (1 - MARGIN))
        if need <= free:
            return True
        held = self.cache.own_bytes
        if need <= free + held:
            deferred.append(w)
            return False
        reason = (f"the request needs {format_bytes(need)} for its {w.capacity}-token cache and activations, but "
                  f"{format_bytes(free + held)} can be had on {self.adapter.device.type}; shorten the prompt or "
                  f"max_tokens.")
        events.append(Event(w.request_id, [], True, [], "refused", DecodeStats(prompt_tokens=len(w.prompt_ids)),
                            error=reason))
        return False

    def _advance(self, row: _Row, sent: RowInput, events: list[Event], first: bool = False) -> None:
        """Send a row its forward's scored logits (or the values it asked to read) and take its next forward (keeping
        the rows it asks to keep) or read; report its progress or its end."""
        try:
            request = next(row.steps) if first else row.steps.send(sent)
            while isinstance(request, KeepRows):  # not a forward: the row's slot keeps rows its last forward wrote
                row.cache.commit(request.count)
                request = row.steps.send(None)
            if isinstance(request, HostRead):  # read with the step's other rows (_score), then sent back
                row.pending, row.read = None, request
                return
            row.pending = request
        except StopIteration as done:
            token_ids, finish_reason, stats = done.value
            del self._rows[row.request_id]
            self.cache.release(row.slot)
            heapq.heappush(self._free, row.slot)
            self.stats.num_tokens += len(token_ids)
            trace = row.state.trace.events if row.state.trace is not None else None
            events.append(Event(row.request_id, token_ids[row.reported:], True, token_ids, finish_reason, stats, trace,
                                stop_token_id=_stop_token(row.state)))
            return
        if not self.stream:
            return
        generated = row.state.seq.generated()
        trace = row.state.trace.events if row.state.trace is not None else []
        if len(generated) > row.reported or len(trace) > row.trace_reported:
            events.append(Event(row.request_id, generated[row.reported:],
                                trace_events=trace[row.trace_reported:] if row.state.trace is not None else None))
            row.reported, row.trace_reported = len(generated), len(trace)

    def _spec(self, row: _Row) -> ForwardSpec:
        return request_spec(self.adapter, row.pending, self.cache.lengths[row.slot])


def row_capacity(adapter: FamilyAdapter, prompt_len: int, config: DecodeConfig) -> int:
    """The cache slots a request needs: its prompt and ``max_new_tokens`` in whole blocks, and the scratch rows a
    forward writes after them."""
    return (sequence_length(prompt_len, config.block_size, config.max_new_tokens, adapter.blocks_from_prompt_end)
            + 3 * config.block_size)


def _sampled_probs(rows: list[_Row], sampled: list[int], logits: torch.Tensor,
                   bounds: list[tuple[int, int, int]]) -> dict[int, torch.Tensor]:
    """The distributions of the sampled rows (``rows[k]`` for ``k`` in ``sampled``), each under its own sampling,
    computed in one set of operations over their rows of the step's ``logits`` (row ``k``'s are ``bounds[k]``),
    padded at the front as their logits are."""
    if not sampled:
        return {}
    runs = sorted((bounds[k][0], bounds[k][1], k) for k in sampled)
    every = runs[0][0] == 0 and runs[-1][1] == len(logits) and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    source = logits if every else torch.cat([logits[a:b] for a, b, _ in runs])
    probs = filtered_probs(source, [(rows[k].sampling, b - a) for a, b, k in runs])
    out, at = {}, 0
    for a, b, k in runs:
        out[k] = pad_rows(probs[at:at + b - a], bounds[k][2])
        at += b - a
    return out


def _stop_token(state: RowState) -> int | None:
    """The stop token a finished row committed at its end (None: it ended at its length, or at a stop string)."""
    seq = state.seq
    if seq is None or not seq.stopped or seq.limit >= len(seq.tokens):
        return None
    token = seq.tokens[seq.limit]
    return token if token in seq.stop_ids else None
