"""The streaming of one response, alone: no server, no engine thread, no checkpoint.

A byte-level stand-in model (a token is one UTF-8 byte, so one character can span tokens) and a worker whose
tickets' events are queued up front; the stream, the worker's event wait and its result conversion are the real ones.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from s2d2.api import Model  # noqa: E402
from s2d2.config import DecodeConfig  # noqa: E402
from s2d2.core.stats import DecodeStats  # noqa: E402
from s2d2.engine.engine import Event  # noqa: E402
from s2d2.serve.protocol import BaseRequest, ServerConfig  # noqa: E402
from s2d2.serve.streaming import ResponseStream, TextStream  # noqa: E402
from s2d2.serve.worker import EngineWorker, Metrics, Ticket  # noqa: E402

ENDPOINT = "/v1/chat/completions"


class ByteModel:
    """Stands in for :class:`Model` where a stream needs it: token ids are UTF-8 bytes."""

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")  # an unfinished character reads as U+FFFD

    to_generation = Model.to_generation  # the real cut at the first stop string, over this decode


class QueuedWorker(EngineWorker):
    """An EngineWorker without its engine or thread: the test queues each ticket's events itself, and cancels are
    recorded instead of sent to the engine."""

    def __init__(self, cfg: ServerConfig) -> None:  # no super().__init__: that builds the engine
        self.model, self.cfg, self.metrics = ByteModel(), cfg, Metrics()  # type: ignore[assignment]
        self.cancelled: list[Ticket] = []

    def cancel(self, ticket: Ticket) -> None:
        self.cancelled.append(ticket)


class Connected:
    """The request as the stream sees it: a client that never goes away."""

    async def is_disconnected(self) -> bool:
        return False


def stream(events: list[Event | BaseException],
           stop: tuple[str, ...] | None) -> tuple[list[Any], QueuedWorker, Ticket]:
    """The parsed ``data:`` lines of a streamed chat response of one choice whose ticket delivers ``events``."""
    worker = QueuedWorker(ServerConfig(model_name="bytes"))
    decode_cfg = DecodeConfig(stop=stop)
    body = BaseRequest(stream=True, stream_options={"include_usage": True})
    request: Any = Connected()

    async def run() -> tuple[list[str], Ticket]:
        ticket = Ticket(asyncio.get_running_loop(), [1, 2], decode_cfg, 0, float("inf"))
        for event in events:
            ticket.events.put_nowait(event)
        response = ResponseStream(request, worker, ENDPOINT, body, [ticket], [[1, 2]], decode_cfg, rid="chatcmpl-x",
                                  created=0, start=0.0, chat=True)
        return [line async for line in response.events()], ticket

    lines, ticket = asyncio.run(run())
    assert all(line.startswith("data: ") and line.endswith("\n\n") for line in lines)
    return [line[6:-2] if line == "data: [DONE]\n\n" else json.loads(line[6:-2]) for line in lines], worker, ticket


def test_text_stream_holds_back_a_partial_stop_string_and_a_partial_character():
    model: Any = ByteModel()
    text = TextStream(model, ("##",))
    assert text.feed(list(b"ab#")) == "ab"  # "#" may open "##"
    assert text.feed(list("c\u00e9".encode())[:2]) == "#c"  # "#c" cannot; half of "é" is held
    assert text.feed(list("\u00e9".encode())[1:]) == "\u00e9" and not text.stopped
    assert text.feed(list(b"d##e")) == "d" and text.stopped  # cut at the stop string
    assert text.rest("ab#c\u00e9d") == ""


def test_stream_cuts_at_a_stop_string_cancels_the_row_and_reports_a_stop():
    ids = list(b"Hi #") + list(b"# there")
    events = [Event(0, ids[:4]), Event(0, ids[4:]),
              Event(0, [], finished=True, token_ids=ids, finish_reason="cancelled", stats=DecodeStats(prompt_tokens=2))]
    chunks, worker, ticket = stream(events, ("##",))
    role, text, finish, usage, done = chunks
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert text["choices"][0]["delta"] == {"content": "Hi "} and text["object"] == "chat.completion.chunk"
    assert finish["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}  # the stop, not the cancel
    assert finish["s2d2"]["num_tokens"] == 5  # the tokens up to the one completing "##"
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert done == "[DONE]"
    assert worker.cancelled == [ticket, ticket]  # as soon as the stop string showed, and when the stream ended
    sample = worker.metrics.registry.get_sample_value
    assert sample("s2d2_requests_total", {"endpoint": ENDPOINT, "status": "200"}) == 1
    assert sample("s2d2_time_to_first_token_seconds_count") == 1 and sample("s2d2_generated_tokens_total") == 5


def test_stream_reports_a_failed_decode_as_an_error_chunk_and_frees_the_slot():
    chunks, worker, ticket = stream([Event(0, list(b"ok")), RuntimeError("out of memory")], None)
    role, text, error = chunks
    assert text["choices"][0]["delta"] == {"content": "ok"}
    assert error == {"error": {"message": "decoding failed (RuntimeError: out of memory).", "type": "internal_error",
                               "code": None}}
    assert worker.cancelled == [ticket]
    assert worker.metrics.registry.get_sample_value("s2d2_requests_total", {"endpoint": ENDPOINT, "status": "500"}) == 1


def test_stops_of_several_characters_split_across_tokens_never_leak_into_the_stream():
    """Whatever the tokens, the streamed deltas so far are always a prefix of the final (cut) text, and add up to it:
    every possible start of every stop string is held back until the next token settles it."""
    import random

    from s2d2.api import find_stop

    rng = random.Random(0)
    model = ByteModel()
    for _ in range(300):
        text = "".join(rng.choice("ab=#é") for _ in range(rng.randrange(1, 14)))
        stops = tuple("".join(rng.choice("ab=#é") for _ in range(rng.randrange(2, 5))) for _ in range(2))
        cut = find_stop(text, stops)
        want = text if cut < 0 else text[:cut]
        stream, sent = TextStream(model, stops), ""  # type: ignore[arg-type]
        for byte in text.encode():
            sent += stream.feed([byte])
            assert want.startswith(sent), (text, stops, sent)
            if stream.stopped:
                break
        assert stream.stopped == (cut >= 0)
        assert sent + stream.rest(want) == want, (text, stops)
