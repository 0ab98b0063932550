"""Cost of one forward of a model against its number of query rows, through the engine's packed forward.

Two shapes per row count n: one request with n query rows (what a draft or 2L verification of one prompt is), and
n requests with one query row each (what batched AR decoding is), every request over a cache of ``--cache``
committed tokens. Prints a table of medians (and minima), and writes forward_cost.json and forward_cost.png to
``--out``. This is what decides where batched AR overtakes batched S2D2 (BENCHMARKS.md, "Batched decoding"): while
a forward costs nearly the same whatever its rows, more tokens per forward is free; once it grows with its rows,
S2D2's extra rows (drafts, 2L verification) cost as much as they save.

    python scripts/forward_cost.py --out benchmarks/bundled-arith      # run alone on the CPU (about a minute)
    python scripts/forward_cost.py --model /tmp/sdar-1.7b --dtype bfloat16 --counts 1 2 4 8 16 32 64 \
        --repeats 3 --warmup 2 --out benchmarks/sdar-1.7b-random/bfloat16  # a real size (scripts/sized_checkpoint.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import s2d2
from s2d2.engine.runner import ForwardTimer, run_batch
from s2d2.models.batching import ForwardSpec


def measure(model: s2d2.Model, requests: int, rows: int, cache_len: int, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of ``repeats`` forwards of ``requests`` requests with ``rows`` query rows each."""
    adapter = model.adapter
    cache = adapter.new_batch_cache(requests, cache_len + rows + 8)
    for s in range(requests):
        cache.lengths[s] = cache_len  # K/V values do not change the cost; only the shapes matter
    device = adapter.device
    mask = torch.ones(rows, rows, dtype=torch.bool, device=device)
    spec = ForwardSpec([5] * rows, range(cache_len, cache_len + rows), mask, num_store=0, logits_from=0)
    times, timer = [], ForwardTimer(device)  # synchronises CUDA around the forward
    with torch.inference_mode():
        for i in range(repeats + warmup):
            with timer:
                run_batch(adapter, [spec] * requests, cache, list(range(requests)))
            if i >= warmup:
                times.append(timer.elapsed * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--cache", type=int, default=64, help="committed tokens per request")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None, help="folder for forward_cost.json / .png")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256, 512, 1024],
                        help="query rows per forward to measure")
    parser.add_argument("--warmup", type=int, default=3, help="forwards run before timing each shape")
    args = parser.parse_args()
    model = s2d2.load(args.model, device=args.device, dtype=args.dtype)
    counts = args.counts
    records = []
    print("| query rows | one request: median ms (min) | n requests x 1 row: median ms (min) |")
    print("|---|---|---|")
    for n in counts:
        one = measure(model, 1, n, args.cache, args.repeats, args.warmup)
        many = measure(model, n, 1, args.cache, args.repeats, args.warmup)
        records.append({"rows": n, "one_request_ms": statistics.median(one), "one_request_min_ms": min(one),
                        "many_requests_ms": statistics.median(many), "many_requests_min_ms": min(many)})
        r = records[-1]
        print(f"| {n} | {r['one_request_ms']:.2f} ({r['one_request_min_ms']:.2f}) | "
              f"{r['many_requests_ms']:.2f} ({r['many_requests_min_ms']:.2f}) |", flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"model": Path(args.model).name, "cache": args.cache, "device": args.device, "dtype": str(model.dtype),
                "threads": torch.get_num_threads()}
        (out / "forward_cost.json").write_text(json.dumps({**meta, "records": records}, indent=1))
        plot(out / "forward_cost.json")


def plot(path: Path) -> None:
    """Draw ``forward_cost.png`` beside a ``forward_cost.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    records, counts = data["records"], [r["rows"] for r in data["records"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(counts, [r["one_request_ms"] for r in records], marker="o", label="one request, n query rows")
    ax.plot(counts, [r["many_requests_ms"] for r in records], marker="s", label="n requests, 1 query row each")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("query rows in the forward")
    ax.set_ylabel("ms per forward (median)")
    dtype = str(data.get("dtype", "")).removeprefix("torch.")
    ax.set_title(f"{data['model']} {dtype}: cost of one forward (cache {data['cache']} tokens per request)",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
