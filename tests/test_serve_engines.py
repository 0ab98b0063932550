"""`s2d2 serve`'s engine processes: the engine in a process of its own (what the CLI runs), several replicas behind
one endpoint, an engine killed mid-request (503 at once, then restarted), and a model that cannot load (one
sentence before the port opens). The API process holds the model on the meta device: no weights."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_server import MAX_NEW, PROBLEMS, expected, get, post, running, start_server, stop_server

import s2d2
from s2d2 import DecodeConfig
from s2d2.serve.core import ModelSource

pytestmark = pytest.mark.slow  # engine processes (spawned interpreters loading the model)


@pytest.fixture(scope="module")
def bundled() -> s2d2.Model:
    return s2d2.load("bundled")


def start(replicas: int = 1, **overrides) -> SimpleNamespace:
    """A server whose engines are processes loading the bundled model (1 thread each), ready to serve."""
    s = start_server(s2d2.load("bundled", device="meta"), ModelSource("bundled", threads=1), max_queue=8,
                     data_parallel_size=replicas, **overrides)
    deadline = time.monotonic() + 60
    while health(s.url)["status"] != "ok":
        assert time.monotonic() < deadline, f"the engines did not start: {health(s.url)}"
        time.sleep(0.1)
    return s


def health(url: str) -> dict:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while no engine is ready
        return json.loads(e.read())


def completion(url: str, prompt: str, **fields) -> tuple[int, dict]:
    status, payload, _ = post(url, {"model": "bundled", "prompt": prompt, **fields})
    return status, payload


def test_an_engine_process_answers_as_generate_does(bundled):
    s = start(max_batch="auto")
    try:
        info = health(s.url)
        assert info["replicas"][0]["pid"] not in (None, os.getpid())  # its own process
        assert info["replicas"][0]["slots"] == 64  # auto, on a CPU, for a model this small: the CPU limit
        prompts = [p.prompt for p in PROBLEMS[:3]]
        for prompt, want in zip(prompts, expected(bundled, prompts)):
            status, payload = completion(s.url, prompt)
            assert status == 200 and payload["choices"][0]["text"] == want.text
            assert payload["s2d2"]["nfe"] == want.stats.nfe
        # sampled: the engine process draws from the seed the API side chose, as generate(seed=) does
        want = bundled.generate([prompts[0]], DecodeConfig(max_new_tokens=MAX_NEW, temperature=0.9, seed=5),
                                batch_size=1)[0]
        status, payload = completion(s.url, prompts[0], temperature=0.9, seed=5)
        assert payload["choices"][0]["text"] == want.text
    finally:
        stop_server(s)


def test_two_replicas_share_the_requests_and_answer_as_one(bundled):
    s = start(replicas=2)
    try:
        info = health(s.url)
        assert [r["status"] for r in info["replicas"]] == ["ok", "ok"]
        assert len({r["pid"] for r in info["replicas"]}) == 2
        prompts = [p.prompt for p in PROBLEMS]
        want = expected(bundled, prompts, method="ar")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: completion(s.url, p, method="ar"), prompts))
        assert [a[1]["choices"][0]["text"] for a in answers] == [w.text for w in want]
        metrics = get(s.url, "/metrics")
        for replica in ("0", "1"):  # both decoded (requests go to the least-loaded replica)
            prefix = f's2d2_engine_steps_total{{replica="{replica}"}}'
            line = next(x for x in metrics.splitlines() if x.startswith(prefix))
            assert float(line.split()[-1]) > 0, metrics
    finally:
        stop_server(s)


def test_a_killed_engine_fails_its_requests_at_once_and_comes_back(bundled):
    s = start()
    try:
        pid = health(s.url)["replicas"][0]["pid"]
        body = {"max_tokens": 400, "method": "ar", "stop_token_ids": []}
        with ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(completion, s.url, PROBLEMS[i].prompt, **body) for i in range(2)]
            deadline = time.monotonic() + 30
            while running(s.url) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            results = [a.result(timeout=30) for a in answers]
            assert time.monotonic() - killed < 1.0  # none waits for its timeout
        for status, payload in results:
            assert status == 503 and payload["error"]["code"] == "engine_restarting", payload
        deadline = time.monotonic() + 60
        while (info := health(s.url))["status"] != "ok":  # "starting" (a 503) until the new process has loaded
            assert info["replicas"][0]["status"] == "starting"
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["replicas"][0]["restarts"] == 1 and info["replicas"][0]["pid"] != pid
        assert 's2d2_engine_restarts_total{replica="0"} 1.0' in get(s.url, "/metrics")
        want = expected(bundled, [PROBLEMS[3].prompt])[0]
        status, payload = completion(s.url, PROBLEMS[3].prompt)
        assert status == 200 and payload["choices"][0]["text"] == want.text
    finally:
        stop_server(s)


def test_an_engine_that_keeps_dying_is_restarted_after_growing_pauses_then_given_up(monkeypatch):
    """The first quick death restarts at once; the next ones wait RESTART_BACKOFF_S, then twice that (shown in
    /health); after MAX_QUICK_RESTARTS quick deaths in a row the replica is failed, with the reason, and requests get
    a 503 saying so instead of a restart loop."""
    import s2d2.serve.worker as worker

    monkeypatch.setattr(worker, "RESTART_BACKOFF_S", 2.0)
    monkeypatch.setattr(worker, "MAX_QUICK_RESTARTS", 2)
    s = start()
    try:
        for deaths in (1, 2, 3):
            pid = health(s.url)["replicas"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed, pauses = time.monotonic(), []
            deadline = killed + 60
            while (info := health(s.url)["replicas"][0])["status"] == "starting" or (info["status"] == "ok"
                                                                                     and info["pid"] == pid):
                pauses.append(info.get("next_start_in_s"))
                assert time.monotonic() < deadline, info
                time.sleep(0.05)
            if deaths == 1:  # at once: no pause was announced
                assert info["status"] == "ok" and not any(pauses) and info["restarts"] == 1
            elif deaths == 2:  # the second quick death in a row waits RESTART_BACKOFF_S before starting again
                assert info["status"] == "ok" and 0 < max(p for p in pauses if p) <= 2.0, pauses
                assert time.monotonic() - killed >= 2.0 and info["restarts"] == 2
        assert info["status"] == "failed" and info["restarts"] == 2
        assert info["error"].startswith("the engine stopped 3 times in a row within 60 s of starting"), info
        assert health(s.url)["status"] == "failed"
        status, payload = completion(s.url, PROBLEMS[3].prompt)
        assert status == 503 and payload["error"]["code"] == "engine_failed"
        assert payload["error"]["message"].startswith("no engine can serve: the engine stopped 3 times"), payload
    finally:
        stop_server(s)


def test_serve_with_weights_that_cannot_load_is_one_sentence(random_model_dir, tmp_path, capsys):
    from s2d2.cli import main

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(random_model_dir).iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes())
    assert main(["serve", "--model", str(broken), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("s2d2: error: engine 0 could not load the model (ModelLoadError: weights file")
