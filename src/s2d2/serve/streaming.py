"""Streaming (server-sent events) of one response.

A chunk carries the text committed since the last chunk, and only text whose every token to the left is committed
(block diffusion commits out of order inside a block). Text that may be the start of a stop string, or an
incomplete UTF-8 character, is held back until it is settled.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from s2d2.api import Generation, Model, find_stop
from s2d2.config import DecodeConfig
from s2d2.serve.protocol import APIError, BaseRequest, total_stats, trace_with_texts, usage
from s2d2.serve.worker import EngineWorker, Ticket


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


class ResponseStream:
    """The server-sent events of one streamed response: each choice in turn (its text as it settles, its trace
    events when traced, its finish chunk with its stats), then the usage chunk when asked for and ``[DONE]``.

    Its tickets are already submitted; whatever ends the stream (the last choice, an error, the client going away)
    cancels those still running, so their slots free at once."""

    def __init__(self, request: Request, worker: EngineWorker, endpoint: str, body: BaseRequest, tickets: list[Ticket],
                 prompt_ids: list[list[int]], decode_cfg: DecodeConfig, *, rid: str, created: int, start: float,
                 chat: bool, echo: list[str] | None = None) -> None:
        self.request, self.worker, self.endpoint, self.body = request, worker, endpoint, body
        self.tickets, self.prompt_ids, self.decode_cfg = tickets, prompt_ids, decode_cfg
        self.rid, self.created, self.start, self.chat, self.echo = rid, created, start, chat, echo
        self.kind = "chat.completion.chunk" if chat else "text_completion"
        self._first = True  # no text sent yet: the next text chunk marks the time to first token

    async def events(self) -> AsyncIterator[str]:
        """The response's ``data:`` lines, for a :class:`~fastapi.responses.StreamingResponse`."""
        model, metrics, body = self.worker.model, self.worker.metrics, self.body
        finished: list[Generation] = []
        try:
            for k, ticket in enumerate(self.tickets):
                text_stream = TextStream(model, self.decode_cfg.stop)
                traced = 0  # trace events of this choice already sent
                if self.chat:
                    yield self._chunk(k, "")
                elif self.echo:
                    yield self._chunk(k, self.echo[k // body.n])
                while True:
                    try:
                        event = await self.worker.next_event(self.request, ticket)
                    except APIError as e:
                        yield f"data: {_json({'error': {'message': e.message, 'type': e.type, 'code': e.code}})}\n\n"
                        metrics.requests.labels(self.endpoint, str(e.status)).inc()
                        return
                    if event is None:
                        return
                    delta = text_stream.feed(event.new_token_ids)
                    if text_stream.stopped and not event.finished:
                        self.worker.cancel(ticket)  # the text holds a stop string: nothing after it is wanted
                    if not event.finished:
                        if delta:
                            yield self._text_chunk(k, delta)
                        if event.trace_events:  # a traced request: the steps as they happen
                            yield self._chunk(k, None, s2d2_trace=trace_with_texts(model, event.trace_events))
                            traced += len(event.trace_events)
                        continue
                    g = self.worker.generation(event, self.decode_cfg, stopped=text_stream.stopped)
                    finished.append(g)
                    delta += text_stream.rest(g.text)
                    if delta:
                        yield self._text_chunk(k, delta)
                    rest = {"s2d2_trace": trace_with_texts(model, g.trace[traced:])} if g.trace is not None else {}
                    yield self._chunk(k, None, g.finish_reason, s2d2=g.stats.to_dict(), **rest)
                    break
            if (body.stream_options or {}).get("include_usage"):
                payload = {"id": self.rid, "object": self.kind, "created": self.created,
                           "model": self.worker.cfg.model_name, "choices": [],
                           "usage": usage(self.prompt_ids, finished), "s2d2": total_stats(finished)}
                yield f"data: {_json(payload)}\n\n"
            yield "data: [DONE]\n\n"
            metrics.latency.observe(time.monotonic() - self.start)
            metrics.requests.labels(self.endpoint, "200").inc()
        finally:
            for t in self.tickets:  # the client went away mid-stream (or an error): free every slot now
                self.worker.cancel(t)

    def _chunk(self, index: int, text: str | None, finish: str | None = None, **extra: Any) -> str:
        """One choice's chunk: ``text`` (None: no text), the finish reason on its last, and any top-level extras."""
        if self.chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if text == "" and finish is None:  # a chat choice opens with its role
                delta = {"role": "assistant", "content": ""}
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        payload = {"id": self.rid, "object": self.kind, "created": self.created, "model": self.worker.cfg.model_name,
                   "choices": [choice], **extra}
        return f"data: {_json(payload)}\n\n"

    def _text_chunk(self, index: int, text: str) -> str:
        if self._first:
            self.worker.metrics.ttft.observe(time.monotonic() - self.start)
            self._first = False
        return self._chunk(index, text)


def _json(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
