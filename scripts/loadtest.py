"""Load and fault test of ``s2d2 serve`` on loopback: N concurrent streaming clients for a fixed time, per method and
number of engine replicas.

For each method and each ``--replicas`` count it starts its own ``s2d2 serve --model MODEL --method METHOD
--data-parallel-size R`` on a free loopback port (``--threads`` per engine process when given), warms it up, then
for each concurrency level runs that many client threads (the openai client, streaming, so the time to first token
is seen) for ``--seconds``, each sending arith test prompts one after another. Reported per (method, replicas,
concurrency): requests, errors, p50/p99 latency, p50/p99 time to first token, generated tokens/s, and the server's
resident memory (RSS, the API process and its engine processes) before and after.

Then, against the last server: ``--kill-engine`` runs the top concurrency and kills engine 0 (SIGKILL) halfway,
counting what the clients got (every error must be a 503 of the killed engine's requests) and how long until
``/health`` is ok again; ``--disconnects N`` sends N non-streamed requests whose clients close their connection
after 0.2 s and times how long until no generation is running; ``--soak-minutes`` keeps the top concurrency running
and samples the RSS every 30 s (growth over the soak is the leak check).

Bounded: every level stops after ``--seconds`` or ``--max-requests``, the soak after its minutes, and the server
is killed at the end whatever happens. Loopback only. Run alone on the machine (it measures speed)::

    python scripts/loadtest.py --methods s2d2 ar --replicas 1 2 --threads 1 --concurrency 1 4 16 64 \
        --seconds 20 --kill-engine --disconnects 200 --out benchmarks/bundled-arith/loadtest.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai

from s2d2.evaluation.tasks import arith


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the server's engine processes), MiB (Linux /proc)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += rss_mib(int(child))
    return total


@contextlib.contextmanager
def serving(model: str, method: str, max_batch: int, max_queue: int, replicas: int = 1,
            threads: int | None = None, extra: tuple[str, ...] = ()) -> Iterator[tuple[subprocess.Popen, str]]:
    """``s2d2 serve`` on a free loopback port (served as ``loadtest``; ``extra``: more flags), once its engines are
    ready: yields the process and its URL, and stops it on the way out."""
    port = free_port()
    cmd = [sys.executable, "-m", "s2d2.cli", "serve", "--model", model, "--port", str(port), "--method", method,
           "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--log-level", "warning",
           "--served-model-name", "loadtest", "--data-parallel-size", str(replicas), *extra]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:  # the engines load before the port opens
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start: {' '.join(cmd)}") from None
                time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()


def one_request(client: openai.OpenAI, prompt: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        stream = client.completions.create(model="loadtest", prompt=prompt, max_tokens=max_tokens, stream=True,
                                           stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        code = body.get("code") or (body.get("error") or {}).get("code") or ""
        return {"error": f"{e.status_code} {code}".strip()}
    except openai.APIError as e:
        return {"error": type(e).__name__}
    return {"latency": time.perf_counter() - t0, "ttft": ttft if ttft is not None else time.perf_counter() - t0,
            "tokens": tokens}


def run_level(url: str, prompts: list[str], concurrency: int, seconds: float, max_requests: int,
              max_tokens: int) -> dict[str, Any]:
    """``concurrency`` clients sending requests back to back for ``seconds`` (or ``max_requests`` in all)."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))

    def client_loop() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        while time.monotonic() < stop_at:
            with lock:
                k = next(counter)
            if k >= max_requests:
                return
            r = one_request(client, prompts[k % len(prompts)], max_tokens)
            with lock:
                results.append(r)
            if r.get("error", "").startswith(("429", "503")):
                time.sleep(1.0)  # the server's Retry-After, as a client that retries would wait

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    kinds: dict[str, int] = {}
    for r in results:
        if "error" in r:
            kinds[r["error"]] = kinds.get(r["error"], 0) + 1
    return {"concurrency": concurrency, "requests": len(ok), "errors": len(results) - len(ok), "error_kinds": kinds,
            "wall_s": wall,
            "latency_p50_s": statistics.median(lat) if lat else float("nan"), "latency_p99_s": pct(lat, 0.99),
            "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"), "ttft_p99_s": pct(ttft, 0.99),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "requests_per_s": len(ok) / wall}


def health(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while no engine is ready
        return json.loads(e.read())


def kill_engine(url: str, prompts: list[str], concurrency: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    """Run ``concurrency`` clients and SIGKILL engine 0 halfway: the errors the clients saw, and the seconds until
    ``/health`` reports every engine ready again."""
    before = health(url)["replicas"][0]
    box: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: box.update(run_level(url, prompts, concurrency, seconds, 10**9,
                                                                  max_tokens)))
    runner.start()
    time.sleep(seconds / 2)
    os.kill(before["pid"], signal.SIGKILL)
    killed = time.monotonic()
    while (h := health(url))["status"] != "ok" or h["replicas"][0]["restarts"] == before["restarts"]:
        time.sleep(0.05)
    recovered = time.monotonic() - killed
    runner.join()
    return {"concurrency": concurrency, "requests": box["requests"], "errors": box["errors"],
            "error_kinds": box["error_kinds"], "recovery_s": recovered}


def disconnects(url: str, prompts: list[str], count: int, max_tokens: int) -> dict[str, Any]:
    """``count`` non-streamed requests whose clients go away after 0.2 s: the seconds from the last close until
    ``/health`` counts no running generation."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for k in range(count):
        body = json.dumps({"model": "loadtest", "prompt": prompts[k % len(prompts)], "max_tokens": max_tokens,
                           "method": "ar", "stop_token_ids": []}).encode()
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        socks.append(sock)
    time.sleep(0.2)
    peak = health(url)["running"]
    for sock in socks:
        sock.close()
    closed = time.monotonic()
    while health(url)["running"]:
        time.sleep(0.02)
    return {"clients": count, "running_before_close": peak, "freed_s": time.monotonic() - closed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--methods", nargs="+", default=["s2d2", "ar"])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1], help="engine processes (--data-parallel-size)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per engine process")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=30.0, help="per concurrency level")
    parser.add_argument("--max-requests", type=int, default=5000, help="per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--kill-engine", action="store_true", help="then kill engine 0 under load")
    parser.add_argument("--disconnects", type=int, default=0, help="then this many clients that go away")
    parser.add_argument("--soak-minutes", type=float, default=0.0, help="then this long at the top concurrency")
    parser.add_argument("--out", default=None, help="a JSON file for every figure")
    args = parser.parse_args()
    if max(args.concurrency) > args.max_batch + args.max_queue:
        raise SystemExit("--concurrency above --max-batch + --max-queue would be answered 429")
    prompts = [p.prompt for p in arith.generate("test", 200, seed=0)]
    records, faults, soak = [], {}, None
    print("| method | replicas | clients | requests | errors | latency p50 / p99 (s) | TTFT p50 / p99 (s) | tokens/s | "
          "RSS before -> after (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    servers = [(m, r) for m in args.methods for r in args.replicas]
    for i, (method, replicas) in enumerate(servers):
        with serving(args.model, method, args.max_batch, args.max_queue, replicas, args.threads) as (proc, url):
            run_level(url, prompts, 2 * replicas, 3.0, 20, args.max_tokens)  # warm-up
            for c in args.concurrency:
                before = rss_mib(proc.pid)
                r = run_level(url, prompts, c, args.seconds, args.max_requests, args.max_tokens)
                r.update(method=method, replicas=replicas, rss_before_mib=before, rss_after_mib=rss_mib(proc.pid))
                records.append(r)
                print(f"| {method} | {replicas} | {c} | {r['requests']} | {r['errors']} | {r['latency_p50_s']:.3f} / "
                      f"{r['latency_p99_s']:.3f} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | "
                      f"{r['tokens_per_s']:.0f} | {r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} |", flush=True)
            if i < len(servers) - 1:
                continue
            if args.kill_engine:
                faults["kill_engine"] = k = kill_engine(url, prompts, max(args.concurrency), args.seconds,
                                                        args.max_tokens)
                print(f"\nengine 0 killed under {k['concurrency']} clients: {k['requests']} requests served, "
                      f"{k['errors']} errors {k['error_kinds']}, every engine ready again after "
                      f"{k['recovery_s']:.1f} s", flush=True)
            if args.disconnects:
                faults["disconnects"] = d = disconnects(url, prompts, args.disconnects, 400)
                print(f"\n{d['clients']} clients gone ({d['running_before_close']} generations running or queued): "
                      f"all freed {d['freed_s']:.2f} s after the last close", flush=True)
            if args.soak_minutes > 0:
                samples = [(0.0, rss_mib(proc.pid))]
                start, errors, requests = time.monotonic(), 0, 0
                while time.monotonic() - start < args.soak_minutes * 60:
                    r = run_level(url, prompts, max(args.concurrency), 30.0, args.max_requests, args.max_tokens)
                    errors, requests = errors + r["errors"], requests + r["requests"]
                    samples.append((time.monotonic() - start, rss_mib(proc.pid)))
                growth = samples[-1][1] / samples[0][1] - 1
                soak = {"method": method, "minutes": args.soak_minutes, "clients": max(args.concurrency),
                        "requests": requests, "errors": errors, "rss_mib": samples, "rss_growth": growth}
                print(f"\nsoak: {method}, {max(args.concurrency)} clients, {args.soak_minutes:g} min: {requests} "
                      f"requests, {errors} errors, RSS {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MiB "
                      f"({growth:+.1%})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens,
                                              "max_batch": args.max_batch, "threads": args.threads,
                                              "cpus": os.cpu_count(), "levels": records, "faults": faults,
                                              "soak": soak}, indent=1))


if __name__ == "__main__":
    main()
