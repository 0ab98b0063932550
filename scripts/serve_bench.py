"""What serving costs against offline decoding, and what a second replica adds (issue 29's targets).

On the bundled model, the first ``--n`` arith test problems, ``--max-tokens`` each, greedy ``--method``:

1. **Offline**: ``Model.generate(..., batch_size=1)`` in a process of its own, ``--threads`` threads.
2. **One client**: ``s2d2 serve --threads T`` (the engine in its own process; started as ``scripts/loadtest.py``
   starts it), the same prompts one after another
   from one client, non-streamed and streamed (the openai client). Tokens/s against offline is the serving cost.
3. **Replicas**: ``--data-parallel-size 1`` and ``2`` (``--threads 1`` each), ``--concurrency`` clients sending the
   prompts of a shared list (each prompt ``--repeat`` times), generated tokens/s over the whole run.
4. **The engine's thread**: the same batch-1 decoding through the engine run from the main thread and from a
   worker thread (how the server ran it before the engine had a process of its own).

Every measurement is its own process (servers are started and stopped per measurement); ``--rounds`` rounds in a
shuffled (seeded) order, medians reported. Run alone on the machine::

    python scripts/serve_bench.py --out benchmarks/bundled-arith/serve.md     # ~10 min here
    python scripts/serve_bench.py --only "one client" --stream-intervals 0.02 0.05   # streaming alone
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadtest import serving  # (scripts/ is on the path of a script run from it)

OFFLINE = """
import json, sys, time, torch
import s2d2
from s2d2.evaluation.tasks import arith
n, max_tokens, method, threads = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
torch.set_num_threads(threads)
model = s2d2.load("bundled")
prompts = [p.prompt for p in arith.generate("test", n, seed=0)]
cfg = s2d2.DecodeConfig(method=method, max_new_tokens=max_tokens)
model.generate(prompts[:3], cfg, batch_size=1)
t0 = time.perf_counter()
outs = model.generate(prompts, cfg, batch_size=1)
print(json.dumps({"tokens": sum(len(o.token_ids) for o in outs), "seconds": time.perf_counter() - t0}))
"""

THREADED = """
import json, sys, threading, time, torch
import s2d2
from s2d2.engine.engine import Engine
from s2d2.evaluation.tasks import arith
n, max_tokens, method, threads, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
model = s2d2.load("bundled")
prompts = [model.encode(p.prompt) for p in arith.generate("test", n, seed=0)]
cfg = model.resolve_config(s2d2.DecodeConfig(method=method, max_new_tokens=max_tokens))
out = {}
def decode():
    torch.set_grad_enabled(False)
    engine = Engine(model.adapter, 16, capacity=256, stream=True)  # as the server builds it
    for warm in (True, False):
        t0, tokens = time.perf_counter(), 0
        for ids in prompts[:3] if warm else prompts:
            engine.add(ids, cfg)
            while not engine.idle:
                tokens += sum(len(e.token_ids) for e in engine.step() if e.finished)
        out.update(tokens=tokens, seconds=time.perf_counter() - t0)
if where == "main":
    decode()
else:
    t = threading.Thread(target=decode)
    t.start()
    t.join()
print(json.dumps(out))
"""


def child(code: str, *args: object) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_client(args: argparse.Namespace, prompts: list[str], stream: bool, interval: float = 0.0) -> dict:
    import openai

    extra = ("--stream-interval", str(interval)) if interval else ()
    with serving("bundled", args.method, 16, 64, threads=args.threads, extra=extra) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        kw = dict(model="loadtest", max_tokens=args.max_tokens)
        for p in prompts[:3]:
            client.completions.create(prompt=p, **kw)
        t0, tokens = time.perf_counter(), 0
        for p in prompts:
            if stream:
                for chunk in client.completions.create(prompt=p, stream=True, stream_options={"include_usage": True},
                                                       **kw):
                    tokens += chunk.usage.completion_tokens if chunk.usage else 0
            else:
                tokens += client.completions.create(prompt=p, **kw).usage.completion_tokens
        return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def replicas(args: argparse.Namespace, prompts: list[str], count: int) -> dict:
    import openai

    with serving("bundled", args.method, 16, 256, replicas=count, threads=1) as (_, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
        kw = dict(model="loadtest", max_tokens=args.max_tokens)
        work = prompts * args.repeat

        def send(p: str) -> int:
            return client.completions.create(prompt=p, **kw).usage.completion_tokens

        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(send, prompts[:args.concurrency]))  # warm-up, every replica
            t0 = time.perf_counter()
            tokens = sum(pool.map(send, work))
        return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--method", default="ar")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--stream-intervals", type=float, nargs="*", default=[],
                        help="also measure one streamed client with each of these --stream-interval values")
    parser.add_argument("--only", nargs="*", default=None, help="measure only the cells whose name contains one of "
                        "these (offline batch 1 is always measured: the ratios need it)")
    args = parser.parse_args()
    from s2d2.evaluation.tasks import arith

    prompts = [p.prompt for p in arith.generate("test", args.n, seed=0)]
    cells = {
        "offline generate, batch 1": lambda: child(OFFLINE, args.n, args.max_tokens, args.method, args.threads),
        "server, one client, non-streamed": lambda: one_client(args, prompts, False),
        "server, one client, streamed": lambda: one_client(args, prompts, True),
        "engine on the main thread": lambda: child(THREADED, args.n, args.max_tokens, args.method, args.threads,
                                                   "main"),
        "engine on a worker thread": lambda: child(THREADED, args.n, args.max_tokens, args.method, args.threads,
                                                   "thread"),
        f"1 replica, {args.concurrency} clients": lambda: replicas(args, prompts, 1),
        f"2 replicas, {args.concurrency} clients": lambda: replicas(args, prompts, 2),
        **{f"server, one client, streamed, --stream-interval {t:g}":
           (lambda t=t: one_client(args, prompts, True, t)) for t in args.stream_intervals},
    }
    if args.only is not None:
        cells = {name: run for name, run in cells.items()
                 if name.startswith("offline") or any(part in name for part in args.only)}
    runs: dict[str, list[dict]] = {name: [] for name in cells}
    rng = random.Random(0)
    for r in range(args.rounds):
        for name in rng.sample(list(cells), len(cells)):
            runs[name].append(cells[name]())
            print(f"round {r}: {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    rate = {name: statistics.median(x["tokens"] / x["seconds"] for x in v) for name, v in runs.items()}
    tokens = {name: v[0]["tokens"] for name, v in runs.items()}
    offline = rate["offline generate, batch 1"]
    lines = [f"# Serving against offline decoding: bundled, {args.n} arith test problems, {args.max_tokens} tokens "
             f"at most, {args.method}, {args.rounds} shuffled rounds, {os.cpu_count()} cores", "",
             "| measurement | tokens | tokens / s (median) | vs offline batch 1 |", "|---|---|---|---|"]
    for name in cells:
        lines.append(f"| {name} | {tokens[name]} | {rate[name]:.0f} | {rate[name] / offline:.2f}x |")
    two, one = (rate.get(f"{k} replica{'s' if k > 1 else ''}, {args.concurrency} clients") for k in (2, 1))
    if two and one:
        lines += ["", f"2 replicas / 1 replica at {args.concurrency} clients: {two / one:.2f}x."]
    if "engine on the main thread" in rate and "engine on a worker thread" in rate:
        lines += ["", f"engine on a worker thread / main thread: "
                  f"{rate['engine on a worker thread'] / rate['engine on the main thread']:.2f}x."]
    lines += ["", f"threads: {args.threads} (offline, one client, engine), 1 per replica."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
