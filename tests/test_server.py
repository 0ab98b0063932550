"""`s2d2 serve`: the real server on loopback, driven by the unchanged openai client (and raw HTTP for bad input).

Greedy answers must equal `Model.generate` of the same prompts (what `s2d2 generate` prints); streaming must
deliver the same text in pieces; bad input must be a 400 in OpenAI's error format and leave the server serving;
a client that disconnects mid-stream must free its slot; a full queue answers 429.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import s2d2  # noqa: E402
from s2d2 import DecodeConfig  # noqa: E402
from s2d2.evaluation.tasks import arith  # noqa: E402
from s2d2.serve.app import create_app  # noqa: E402
from s2d2.serve.protocol import ServerConfig  # noqa: E402
from s2d2.serve.streaming import TextStream  # noqa: E402

PROBLEMS = arith.generate("test", 8, seed=0)
MAX_NEW = 40


@pytest.fixture(scope="module")
def bundled() -> s2d2.Model:
    return s2d2.load("bundled")


def start_server(model: s2d2.Model, source: Any = None, **overrides) -> SimpleNamespace:
    """The app over ``model`` (engine processes loading ``source``, when given) served on a free loopback port."""
    cfg = ServerConfig(**{"model_name": "bundled", "max_batch": 4, "max_queue": 2, "timeout_s": 60.0,
                          "defaults": DecodeConfig(max_new_tokens=MAX_NEW), "stream_interval_s": 0.0, **overrides})
    server = uvicorn.Server(uvicorn.Config(create_app(model, cfg, source), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return SimpleNamespace(url=url, port=port, server=server, thread=thread, client=client, cfg=cfg)


def stop_server(s: SimpleNamespace) -> None:
    s.server.should_exit = True
    s.thread.join(timeout=15)


@pytest.fixture(scope="module")
def server(bundled):
    s = start_server(bundled)
    yield s
    stop_server(s)


def post(url: str, body: bytes | str | dict, path: str = "/v1/completions") -> tuple[int, dict, Any]:
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def get(url: str, path: str) -> str:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return r.read().decode()


def expected(model: s2d2.Model, prompts: list[str], **cfg) -> list[s2d2.Generation]:
    return model.generate(prompts, DecodeConfig(max_new_tokens=MAX_NEW, **cfg), batch_size=1)


def running(url: str) -> int:
    return json.loads(get(url, "/health"))["running"]


def cancelled(url: str, reason: str = "cancelled") -> float:
    line = f's2d2_generations_cancelled_total{{reason="{reason}"}} '
    return next((float(x[len(line):]) for x in get(url, "/metrics").splitlines() if x.startswith(line)), 0.0)


def wait_idle(url: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while running(url):
        assert time.monotonic() < deadline, "a slot was never freed"
        time.sleep(0.05)


def test_completion_equals_generate_with_usage_and_stats(server, bundled):
    want = expected(bundled, [PROBLEMS[0].prompt])[0]
    out = server.client.completions.create(model="bundled", prompt=PROBLEMS[0].prompt)
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == want.finish_reason
    assert out.usage.prompt_tokens == len(bundled.encode(PROBLEMS[0].prompt))
    assert out.usage.completion_tokens == len(want.token_ids)
    stats = out.model_extra["s2d2"]
    assert stats["nfe"] == want.stats.nfe and stats["accepted_tokens"] == want.stats.accepted_tokens
    assert stats["tokens_per_forward"] == pytest.approx(want.stats.num_tokens / want.stats.nfe)


def test_s2d2_fields_as_extra_body_and_several_prompts(server, bundled):
    prompts = [p.prompt for p in PROBLEMS[:3]]
    want = expected(bundled, prompts, method="ar")
    out = server.client.completions.create(model="bundled", prompt=prompts, extra_body={"method": "ar"})
    assert [c.text for c in out.choices] == [w.text for w in want]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.model_extra["s2d2"]["nfe"] == sum(w.stats.nfe for w in want)
    assert out.model_extra["s2d2"]["verify_forwards"] == 0


def test_a_request_may_ask_for_step_traces(server, bundled):
    """"trace": true returns each choice's step trace, the same events as Model.generate(trace=True) records (times
    aside); streamed, the events come with the chunks as the steps happen."""
    prompts = [p.prompt for p in PROBLEMS[:2]]
    want = bundled.generate(prompts, DecodeConfig(max_new_tokens=MAX_NEW), batch_size=1, trace=True)
    out = server.client.completions.create(model="bundled", prompt=prompts, extra_body={"trace": True})
    for choice, w in zip(out.choices, want):
        trace = choice.model_extra["s2d2_trace"]
        assert trace[0]["schema"] == "s2d2.trace/1" and trace[-1]["token_ids"] == w.token_ids
        assert [[(c["pos"], c["token"], c["how"]) for c in e.get("commits", [])] for e in trace] == \
            [[(c["pos"], c["token"], c["how"]) for c in e.get("commits", [])] for e in w.trace]
        assert all(c["text"] == bundled.decode([c["token"]]) for e in trace for c in e.get("commits", []))
    plain = server.client.completions.create(model="bundled", prompt=prompts[0])
    assert "s2d2_trace" not in plain.choices[0].model_extra
    # streamed: the trace arrives step by step, in order, and adds up to the whole one
    chunks = list(server.client.completions.create(model="bundled", prompt=prompts[0], stream=True,
                                                   extra_body={"trace": True}))
    parts = [c.model_extra["s2d2_trace"] for c in chunks if c.model_extra.get("s2d2_trace")]
    streamed = [event for part in parts for event in part]
    assert len(parts) >= 3 and streamed[0]["type"] == "header" and streamed[-1]["type"] == "done"
    assert [[(c["pos"], c["token"], c["how"]) for c in e.get("commits", [])] for e in streamed] == \
        [[(c["pos"], c["token"], c["how"]) for c in e.get("commits", [])] for e in want[0].trace]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want[0].text


def test_chat_uses_the_chat_template(server, bundled):
    want = expected(bundled, [PROBLEMS[1].prompt])[0]  # the bundled template renders a question as "Q: ...\nA:"
    out = server.client.chat.completions.create(
        model="bundled", messages=[{"role": "user", "content": PROBLEMS[1].question}])
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == want.text
    assert out.usage.completion_tokens == len(want.token_ids)


def test_a_stream_interval_sends_fewer_larger_chunks_of_the_same_text(bundled):
    """--stream-interval: progress waits in the engine and goes up as one event per request; the text is the same,
    in fewer chunks (one step per token with AR: 48 new tokens would be up to 48 chunks), and the end is not held."""
    from s2d2.engine.engine import Event
    from s2d2.serve.core import _joined

    joined = _joined(Event(3, [1, 2], trace_events=[{"a": 1}]), Event(3, [4], trace_events=None))
    assert joined.new_token_ids == [1, 2, 4] and joined.trace_events == [{"a": 1}] and not joined.finished
    body = dict(model="bundled", prompt=PROBLEMS[5].prompt, max_tokens=48,
                extra_body={"method": "ar", "stop_token_ids": []})
    counts = {}
    for interval in (0.0, 0.2):
        s = start_server(bundled, stream_interval_s=interval)
        try:
            want = s.client.completions.create(**body).choices[0].text
            t0 = time.monotonic()
            chunks = list(s.client.completions.create(**body, stream=True))
            took = time.monotonic() - t0
            texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
            assert "".join(texts) == want
            counts[interval] = len(texts)
        finally:
            stop_server(s)
    assert counts[0.0] > 10  # every step's token
    assert counts[0.2] <= took / 0.2 + 2 and counts[0.2] < counts[0.0], counts


def test_streamed_text_equals_the_plain_answer(server, bundled):
    want = expected(bundled, [PROBLEMS[2].prompt])[0]
    chunks = list(server.client.completions.create(model="bundled", prompt=PROBLEMS[2].prompt, stream=True,
                                                   stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want.text
    assert len([t for t in texts if t]) > 1  # really streamed, in pieces
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [want.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)

    chat = list(server.client.chat.completions.create(
        model="bundled", messages=[{"role": "user", "content": PROBLEMS[2].question}], stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat) == want.text
    assert chat[-1].choices[0].finish_reason == want.finish_reason


def test_stop_strings_streamed_and_plain(server, bundled):
    want = expected(bundled, [PROBLEMS[3].prompt], stop=("#",))[0]
    assert "#" not in want.text and want.finish_reason == "stop"
    plain = server.client.completions.create(model="bundled", prompt=PROBLEMS[3].prompt, stop="#")
    assert plain.choices[0].text == want.text and plain.choices[0].finish_reason == "stop"
    streamed = list(server.client.completions.create(model="bundled", prompt=PROBLEMS[3].prompt, stop=["#"],
                                                     stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want.text


def test_stops_of_several_characters_across_tokens_streamed_and_plain(server, bundled):
    """A stop string that starts in one token and ends in the next: the stream holds its first characters back until
    the next token settles them, so streamed text == plain text == Model.generate's."""
    prompt = PROBLEMS[3].prompt
    free = expected(bundled, [prompt])[0]
    ends = [len(bundled.decode(free.token_ids[:k])) for k in range(1, len(free.token_ids))]  # token boundaries
    stop = next(free.text[b - 2:b + 1] for b in ends if b >= 2 and free.text.find(free.text[b - 2:b + 1]) == b - 2
                and free.text[b - 2:b + 1].strip() == free.text[b - 2:b + 1])
    want = expected(bundled, [prompt], stop=(stop,))[0]
    assert want.finish_reason == "stop" and stop not in want.text and len(want.text) < len(free.text)
    plain = server.client.completions.create(model="bundled", prompt=prompt, stop=[stop, "@@@"])
    assert plain.choices[0].text == want.text
    streamed = list(server.client.completions.create(model="bundled", prompt=prompt, stop=[stop, "@@@"],
                                                     stream=True))
    assert "".join(c.choices[0].text for c in streamed) == want.text


def test_concurrent_requests_equal_generate(server, bundled):
    """More requests than slots at once: they batch, queue, and each gets exactly its batch-1 answer."""
    prompts = [p.prompt for p in PROBLEMS[:6]]
    want = [g.text for g in expected(bundled, prompts)]

    def ask(prompt: str) -> str:
        return server.client.completions.create(model="bundled", prompt=prompt).choices[0].text

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, prompts))
    assert got == want
    metrics = get(server.url, "/metrics")
    assert "s2d2_engine_steps_total" in metrics and "s2d2_request_latency_seconds_bucket" in metrics
    assert "s2d2_requests_waiting" in metrics and "s2d2_batch_occupancy" in metrics


def test_sampled_choices_are_reproducible_by_seed(server):
    kw = dict(model="bundled", prompt=PROBLEMS[4].prompt, temperature=1.0, seed=7, n=3)
    a = [c.text for c in server.client.completions.create(**kw).choices]
    b = [c.text for c in server.client.completions.create(**kw).choices]
    assert a == b and len(a) == 3
    assert server.client.completions.create(**{**kw, "n": 1}).choices[0].text == a[0]  # choice 0 is the n = 1 answer


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"model": "bundled"}, "prompt"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "max_tokens": "many"}, "max_tokens"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "max_tokens": 0}, "max_tokens"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "max_tokens": 10**6}, "max_tokens"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "max_tokens": 508}, "prompt"),  # 508 fit, not with this prompt
    ({"model": "bundled", "prompt": "Q: 1\nA:", "max_tokens": True}, "max_tokens"),  # JSON true is not 1
    ({"model": "bundled", "prompt": "Q: 1\nA:", "max_tokens": 4.0}, "max_tokens"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "temperature": "0.5"}, "temperature"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "stream": "yes"}, "stream"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "seed": 2**63}, "seed"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "seed": 2**63 - 1, "n": 2}, "seed"),  # choice 1 would pass 2**63
    ({"model": "bundled", "prompt": "Q: 1\nA:", "seed": -1}, "seed"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "block_size": 10000}, "block_size"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "block_size": True}, "block_size"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "max_new_tokens": 8}, "max_new_tokens"),
    ({"model": "bundled", "prompt": 123}, "prompt"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "stop": 5}, "stop"),
    (b'{"model": "bundled", "prompt": "Q: \xff\xfe1"}', None),  # bytes that are not UTF-8
    ({"model": "bundled", "prompt": "Q: 1\nA:", "temperature": -1}, "temperature"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "top_p": 2}, "top_p"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "seed": 2**64}, "seed"),
    ({"model": "other", "prompt": "Q: 1\nA:"}, "model"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "block_sise": 8}, "block_sise"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "method": "fast"}, "method"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "n": 0}, "n"),
    ({"model": "bundled", "prompt": ""}, "prompt"),
    ({"model": "bundled", "prompt": "Q " * 3000}, "prompt"),
    ({"model": "bundled", "prompt": ["Q: 1\nA:", "<|mask|>"]}, "prompt.1"),
    ({"model": "bundled", "prompt": "Q: 1\nA:", "logprobs": 2}, "logprobs"),
])
def test_bad_input_is_a_400_in_openai_format(server, body, param):
    status, payload, _ = post(server.url, body)
    assert status == 400, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"].endswith(".") and "\n" not in error["message"] and "Traceback" not in error["message"]
    assert error["code"] is not None, error  # a client can tell the kinds apart without parsing the sentence
    if param is not None:
        assert error["param"] == param, error
        assert not re.search(r"\.(str|list\[)", error["message"]), error  # no pydantic union tags in the sentence


def test_bad_chat_input_is_a_400(server):
    for messages in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": "a <|mask|> b"}],
                     [{"role": "user"}], [{"role": "user", "content": None}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        status, payload, _ = post(server.url, {"model": "bundled", "messages": messages}, "/v1/chat/completions")
        assert status == 400, (messages, payload)
        assert payload["error"]["message"]
    # and the server still serves
    assert server.client.completions.create(model="bundled", prompt=PROBLEMS[0].prompt, max_tokens=4).choices


def test_a_full_queue_answers_429_with_retry_after(server):
    limit = server.cfg.max_batch + server.cfg.max_queue
    status, payload, headers = post(server.url, {"model": "bundled", "prompt": "Q: 1\nA:", "n": limit + 1})
    assert status == 429 and payload["error"]["code"] == "queue_full"
    assert int(headers["Retry-After"]) >= 1
    wait_idle(server.url)  # nothing was queued
    assert server.client.completions.create(model="bundled", prompt=PROBLEMS[0].prompt, max_tokens=4).choices


def test_a_client_disconnecting_mid_stream_frees_its_slot(server, bundled):
    body = json.dumps({"model": "bundled", "prompt": PROBLEMS[5].prompt, "stream": True, "max_tokens": 400,
                       "method": "ar", "stop_token_ids": []})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(6) == b"data: "  # decoding has started
    assert running(server.url) == 1
    before = cancelled(server.url)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_idle(server.url)
    assert cancelled(server.url) == before + 1  # stopped, not run to its 400 tokens
    want = expected(bundled, [PROBLEMS[6].prompt])[0]
    assert server.client.completions.create(model="bundled", prompt=PROBLEMS[6].prompt).choices[0].text == want.text


def test_models_health_and_timeout(bundled):
    s = start_server(bundled, timeout_s=0.05)
    try:
        models = json.loads(get(s.url, "/v1/models"))
        assert [m["id"] for m in models["data"]] == ["bundled"]
        status, payload, _ = post(s.url, {"model": "bundled", "prompt": PROBLEMS[0].prompt, "max_tokens": 400,
                                          "method": "ar", "stop_token_ids": []})
        assert status == 504 and payload["error"]["type"] == "timeout_error"
        wait_idle(s.url)
        assert cancelled(s.url, "timeout") == 1
    finally:
        stop_server(s)


def test_text_stream_holds_back_stop_prefixes_and_partial_characters(bundled):
    ids = bundled.encode(" 12+3=15. #### 15")
    stream = TextStream(bundled, ("####",))
    out = "".join(stream.feed([t]) for t in ids)
    assert out == " 12+3=15. " and stream.stopped
    stream = TextStream(bundled, ("=1x",))  # "=1" could start the stop string until the next character settles it
    pieces = [stream.feed([t]) for t in bundled.encode("3=15")]
    assert "".join(pieces) + stream.rest("3=15") == "3=15" and not stream.stopped


@pytest.mark.parametrize("argv, word", [
    (["--max-batch", "0"], "max_batch"),
    (["--max-queue", "-1"], "max_queue"),
    (["--timeout", "0"], "timeout"),
    (["--port", "70000"], "--port"),
    (["--block-size", "0"], "block_size"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_serve_refuses_bad_flags_in_one_sentence(argv, word, capsys):
    from s2d2.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("s2d2: error:") and word in err[0]


def test_a_client_disconnecting_from_a_non_streamed_request_frees_its_slot(server, bundled):
    """Without streaming the server writes nothing until the answer is ready, so only the connection tells that the
    client left: its request is cancelled at once (its slot freed at the engine's next step), not decoded on."""
    body = json.dumps({"model": "bundled", "prompt": PROBLEMS[5].prompt, "max_tokens": 400, "method": "ar",
                       "stop_token_ids": []}).encode()
    before = cancelled(server.url)
    socks = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        socks.append(sock)
    deadline = time.monotonic() + 20
    while running(server.url) < 4:
        assert time.monotonic() < deadline, "the requests never started"
        time.sleep(0.02)
    for sock in socks:
        sock.close()
    closed = time.monotonic()
    wait_idle(server.url)
    # 400 AR tokens take several seconds on this CPU; cancelled, the slots free within a few engine steps
    assert time.monotonic() - closed < 2.0
    assert cancelled(server.url) == before + 4
    assert 's2d2_requests_total{endpoint="/v1/completions",status="499"}' in get(server.url, "/metrics")
    want = expected(bundled, [PROBLEMS[6].prompt])[0]
    assert server.client.completions.create(model="bundled", prompt=PROBLEMS[6].prompt).choices[0].text == want.text


def test_unknown_paths_share_one_metrics_label(server):
    for path in ("/a1", "/b2", "/v1/nothing"):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(server.url, path)
        assert e.value.code == 404 and json.loads(e.value.read())["error"]["message"]
    metrics = get(server.url, "/metrics")
    assert 'endpoint="unmatched",status="404"' in metrics
    assert not re.search(r'endpoint="/(a1|b2|v1/nothing)"', metrics)


def test_an_api_key_is_required_on_every_v1_route(bundled, monkeypatch):
    s = start_server(bundled, api_key="sesame")
    try:
        for path, body in (("/v1/completions", {"model": "bundled", "prompt": "Q: 1\nA:", "max_tokens": 2}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
                req = urllib.request.Request(s.url + path, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json", **headers})
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(req, timeout=30)
                error = json.loads(e.value.read())["error"]
                assert e.value.code == 401 and error["code"] == "invalid_api_key", error
                assert e.value.headers["WWW-Authenticate"] == "Bearer"
        with pytest.raises(urllib.error.HTTPError) as e:
            get(s.url, "/v1/models")
        assert e.value.code == 401
        assert json.loads(get(s.url, "/health"))["status"] == "ok"  # probes and scrapers need no key
        assert "s2d2_requests_total" in get(s.url, "/metrics")
        keyed = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
        want = expected(bundled, [PROBLEMS[0].prompt])[0]
        assert keyed.completions.create(model="bundled", prompt=PROBLEMS[0].prompt).choices[0].text == want.text
        assert [m.id for m in keyed.models.list().data] == ["bundled"]
        with pytest.raises(openai.AuthenticationError):
            s.client.completions.create(model="bundled", prompt=PROBLEMS[0].prompt)  # its key is "unused"
    finally:
        stop_server(s)


def test_a_body_over_the_limit_is_a_413(bundled):
    s = start_server(bundled, max_body_bytes=2000)
    try:
        big = {"model": "bundled", "prompt": "Q: 1\nA:", "user": "x" * 3000}
        status, payload, _ = post(s.url, big)
        assert status == 413 and payload["error"]["code"] == "body_too_large", payload
        assert "2000 bytes" in payload["error"]["message"]
        # a chunked body, whose size no header announces, is cut as soon as it passes the limit
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        chunks = iter([json.dumps(big).encode()[i:i + 500] for i in range(0, 3100, 500)])
        conn.request("POST", "/v1/completions", body=chunks, headers={"Content-Type": "application/json"},
                     encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and json.loads(response.read())["error"]["code"] == "body_too_large"
        conn.close()
        status, payload, _ = post(s.url, {"model": "bundled", "prompt": PROBLEMS[0].prompt, "max_tokens": 4})
        assert status == 200 and payload["choices"][0]["text"]
    finally:
        stop_server(s)


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    """`s2d2 serve` on SIGTERM (to the server and to its engine process, as a service manager sends it): stops
    accepting connections, lets the running request finish (a complete 200), then exits with status 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "s2d2", "serve", "--model", "bundled", "--port", "0",
                             "--shutdown-timeout", "60"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        port = None
        for line in proc.stderr:  # uvicorn says where it listens
            if match := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, "the server did not start"
        url = f"http://127.0.0.1:{port}"
        body = {"model": "bundled", "prompt": PROBLEMS[5].prompt, "max_tokens": 120, "method": "ar",
                "stop_token_ids": []}
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post, url, body)
            deadline = time.monotonic() + 30
            while running(url) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            engine = json.loads(get(url, "/health"))["replicas"][0]["pid"]
            proc.send_signal(signal.SIGTERM)
            os.kill(engine, signal.SIGTERM)  # as systemd signals every process of the service: engines wait
            status, payload, _ = answer.result(timeout=120)
        assert status == 200 and payload["usage"]["completion_tokens"] == 120  # drained, not cut
        assert proc.wait(timeout=60) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        proc.kill()
        proc.stderr.close()


def test_a_long_request_gets_its_own_cache_or_a_503_when_memory_is_short(server, bundled, monkeypatch):
    """A request longer than the shared slots (256 tokens) decodes in buffers of its own, beside short ones; when the
    memory for them cannot be had, it alone is refused: a 503 (code insufficient_memory) saying why, in one
    sentence, and the server serves on."""
    import s2d2.engine.engine as engine_module

    long_prompt = " ".join(p.prompt for p in PROBLEMS)[:900]
    assert len(bundled.encode(long_prompt)) + MAX_NEW > 256
    want = expected(bundled, [long_prompt, PROBLEMS[0].prompt])
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda p: server.client.completions.create(model="bundled", prompt=p,
                                                                         max_tokens=MAX_NEW),
                                [long_prompt, PROBLEMS[0].prompt]))
    assert [a.choices[0].text for a in answers] == [g.text for g in want]
    monkeypatch.setattr(engine_module, "free_memory", lambda device: 1 << 20)  # 1 MiB left
    status, payload, _ = post(server.url, {"model": "bundled", "prompt": long_prompt, "max_tokens": MAX_NEW})
    assert status == 503 and payload["error"]["code"] == "insufficient_memory"
    message = payload["error"]["message"]
    assert message.startswith("the request needs ") and "\n" not in message and message.endswith(".")
    short = server.client.completions.create(model="bundled", prompt=PROBLEMS[0].prompt, max_tokens=MAX_NEW)
    assert short.choices[0].text == want[1].text  # short requests use the shared slots: no memory asked
    wait_idle(server.url)


def test_max_batch_auto_takes_the_slots_that_fit(bundled, monkeypatch):
    """``--max-batch auto`` (the default): the engine takes as many slots as fit in the free memory, up to the CPU's
    limit of 64; /health says how many."""
    from s2d2.engine import memory
    from s2d2.serve.core import CACHE_CAPACITY

    per_slot = memory.row_bytes(bundled.adapter.model.config, bundled.dtype, CACHE_CAPACITY, 96, CACHE_CAPACITY)
    for free, slots in ((1 << 40, 64), (int(5.5 * per_slot / (1 - memory.MARGIN)), 5)):
        monkeypatch.setattr(memory, "free_memory", lambda device, free=free: free)
        s = start_server(bundled, max_batch="auto")
        try:
            assert json.loads(get(s.url, "/health"))["replicas"][0]["slots"] == slots
            answer = s.client.completions.create(model="bundled", prompt=PROBLEMS[0].prompt, max_tokens=MAX_NEW)
            assert answer.choices[0].text == expected(bundled, [PROBLEMS[0].prompt])[0].text
        finally:
            stop_server(s)
