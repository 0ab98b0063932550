"""Eager against compiled forwards (``--compile``) on one model, side by side in one process.

1. **Cost of one forward** through the single-row path (one request, n query rows over ``--cache`` cached tokens),
   eager and compiled, and a least-squares fit ``ms = fixed + per_row * rows`` over 1-64 rows: the cost model.
2. **Decoding** at each of ``--batch-sizes`` (default 1 and 16), the first ``--n`` test problems of the arith task,
   AR and the given settings, eager and compiled, in ``--repeats`` rounds whose order is shuffled (seeded); tokens/s
   and forward times (the batch's own: at batch > 1, the engine's packed forwards) are medians over rounds. Each
   batch-1 row also gets the cost model's predictions from its exact counters: forward time ``nfe * fixed +
   query_rows * per_row`` against the measured forward time, and tokens/s with the loop's own time added
   (``nfe * loop``, ``loop`` per forward calibrated on AR alone) against the measured tokens/s. Batches larger than
   one run the engine's packed forward, whose token-wise parts ``--compile`` compiles (attention stays eager).

    python scripts/compile_bench.py --out benchmarks/compile       # run alone on the CPU (~25 min)

Writes ``compile.json`` and ``compile.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import s2d2
from s2d2 import DecodeConfig
from s2d2.engine.runner import ForwardTimer, run
from s2d2.evaluation.tasks import arith
from s2d2.models.batching import ForwardSpec

SETTINGS = {
    "ar": dict(method="ar"),
    "dynamic B=4 t=0.9": dict(method="dynamic", block_size=4, threshold=0.9),
    "s2d2 config-A skip-confident B=16 t=0.9": dict(method="s2d2", block_size=16, threshold=0.9, skip_confident=True),
    "s2d2 config-A skip-confident B=16 t=0.9 fuse_draft_threshold=0.3": dict(
        method="s2d2", block_size=16, threshold=0.9, skip_confident=True, fuse_draft_threshold=0.3),
}
ROWS = [1, 2, 4, 8, 16, 24, 32, 48, 64]


def forward_ms(model: s2d2.Model, rows: int, cache_len: int, repeats: int) -> float:
    """Median milliseconds of one single-row-path forward with ``rows`` query rows after ``cache_len`` tokens."""
    adapter = model.adapter
    cache = adapter.new_cache(cache_len + rows + 8)
    cache.length = cache_len  # K/V values do not change the cost; only the shapes matter
    device = adapter.device
    spec = ForwardSpec([5] * rows, range(cache_len, cache_len + rows),
                       torch.ones(rows, rows, dtype=torch.bool, device=device), num_store=0, logits_from=0)
    times, timer = [], ForwardTimer(device)
    with torch.inference_mode():
        for i in range(repeats + 3):
            with timer:
                run(adapter, spec, cache)
            if i >= 3:
                times.append(timer.elapsed * 1000)
    return statistics.median(times)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``(fixed, per_row)`` of ``ms = fixed + per_row * rows``."""
    n = len(points)
    mx = sum(r for r, _ in points) / n
    my = sum(t for _, t in points) / n
    slope = sum((r - mx) * (t - my) for r, t in points) / sum((r - mx) ** 2 for r, _ in points)
    return my - slope * mx, slope


def _row(name: str, mode: str, batch_size: int, runs: list, cost: dict, loop_ms: float) -> dict:
    """One setting's figures over its rounds (medians of times; counters are exact), with the cost model's
    predictions from its counters: forward time ``nfe * fixed + query_rows * per_row``, and total time adding the
    loop's own ``loop_ms`` per forward (calibrated on AR alone, so every other row is a prediction)."""
    elapsed = statistics.median(e for e, _, _ in runs)
    forward_s = statistics.median(f for _, _, f in runs)
    st = runs[0][1]
    predicted_s = (st.nfe * cost["fixed_ms"] + st.query_rows * cost["per_row_ms"]) / 1000
    total_s = predicted_s + st.nfe * loop_ms / 1000
    return {"setting": name, "mode": mode, "batch_size": batch_size, "tokens": st.num_tokens, "nfe": st.nfe,
            "rows_per_forward": st.query_rows / st.nfe, "tokens_per_forward": st.num_tokens / st.nfe,
            "time_s": elapsed, "forward_time_s": forward_s, "tokens_per_s": st.num_tokens / elapsed,
            "predicted_forward_s": predicted_s, "predicted_tokens_per_s": st.num_tokens / total_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if 1 not in args.batch_sizes:
        parser.error("--batch-sizes must include 1: the cost model is calibrated at batch 1")
    models = {"eager": s2d2.load(args.model, device=args.device),
              "compiled": s2d2.load(args.model, device=args.device, compile=True)}
    warm_up = models["compiled"].warm_up()
    print(f"compile warm-up {warm_up:.1f} s (compiled: {models['compiled'].adapter.model.compiled})", flush=True)

    cost = {}
    for mode, model in models.items():
        points = [(r, forward_ms(model, r, args.cache, 30)) for r in ROWS]
        fixed, per_row = fit(points)
        cost[mode] = {"points": points, "fixed_ms": fixed, "per_row_ms": per_row}
        print(f"{mode}: fixed {fixed:.3f} ms + {per_row:.4f} ms/row; " +
              ", ".join(f"{r} rows {t:.2f}" for r, t in points), flush=True)

    prompts = [p.prompt for p in arith.generate("test", args.n, seed=0)]
    cells = [(name, mode, b) for name in SETTINGS for mode in models for b in args.batch_sizes]
    runs: dict[tuple[str, str, int], list] = {c: [] for c in cells}
    rng = random.Random(0)
    for mode, model in models.items():  # warm-up pass
        model.generate(prompts[:4], DecodeConfig(method="ar", generation_config="none"), batch_size=1)
    for _ in range(args.repeats):
        rng.shuffle(cells)
        for name, mode, b in cells:
            cfg = DecodeConfig(**SETTINGS[name], generation_config="none")
            t0 = time.perf_counter()
            outs = models[mode].generate(prompts, cfg, batch_size=b)
            elapsed = time.perf_counter() - t0
            stats = s2d2.DecodeStats.total([o.stats for o in outs])
            # the forwards' time: the rows' own at batch 1, the engine's (one packed forward per step) above
            forward = stats.forward_time_s if b == 1 else models[mode].last_batch_stats.forward_time_s
            runs[(name, mode, b)].append((elapsed, stats, forward))
    for mode in models:  # the loop's own time per forward, from AR at batch 1 (a row's time outside its forwards)
        ar_runs = runs[("ar", mode, 1)]
        loop_s = statistics.median(e - f for e, _, f in ar_runs)
        cost[mode]["loop_ms_per_forward"] = loop_s / ar_runs[0][1].nfe * 1000
    rows = []
    for b in args.batch_sizes:
        for name in SETTINGS:
            for mode in models:
                rows.append(_row(name, mode, b, runs[(name, mode, b)], cost[mode],
                                 cost[mode]["loop_ms_per_forward"]))
    ar = {(r["mode"], r["batch_size"]): r for r in rows if r["setting"] == "ar"}
    sizes = ", ".join(map(str, args.batch_sizes))
    lines = [f"# Eager and compiled forwards: {args.model}, batch {sizes}, {args.n} test problems, "
             f"{args.repeats} rounds",
             "",
             f"Compile warm-up (one-time, in process): {warm_up:.1f} s.", "",
             "| forward | fixed ms | ms per row | loop ms per forward (AR) | " +
             " | ".join(f"{r} rows" for r in ROWS) + " |",
             "|---|---|---|---|" + "---|" * len(ROWS)]
    for mode, c in cost.items():
        lines.append(f"| {mode} | {c['fixed_ms']:.3f} | {c['per_row_ms']:.4f} | {c['loop_ms_per_forward']:.3f} | " +
                     " | ".join(f"{t:.2f}" for _, t in c["points"]) + " |")
    lines += ["", "| batch | setting | forward | tokens / forward | rows / forward | tokens / s | speedup vs AR (same "
              "forward) | forward time s | predicted forward time s (error) | predicted tokens / s (error) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        prediction, forward = "– | –", f"{r['forward_time_s']:.2f}"
        if r["batch_size"] == 1:  # the cost model is the single-row path's
            err_f = r["predicted_forward_s"] / r["forward_time_s"] - 1
            err_t = r["predicted_tokens_per_s"] / r["tokens_per_s"] - 1
            prediction = (f"{r['predicted_forward_s']:.2f} ({err_f:+.0%}) | "
                          f"{r['predicted_tokens_per_s']:.0f} ({err_t:+.0%})")
        vs_ar = r["tokens_per_s"] / ar[(r["mode"], r["batch_size"])]["tokens_per_s"]
        lines.append(f"| {r['batch_size']} | {r['setting']} | {r['mode']} | {r['tokens_per_forward']:.2f} | "
                     f"{r['rows_per_forward']:.1f} | {r['tokens_per_s']:.0f} | {vs_ar:.2f}x | "
                     f"{forward} | {prediction} |")
    for b in args.batch_sizes:
        for name in SETTINGS:
            e, c = (next(r for r in rows if r["setting"] == name and r["mode"] == m and r["batch_size"] == b)
                    for m in ("eager", "compiled"))
            ratio = c["tokens_per_s"] / e["tokens_per_s"]
            lines.append(f"\nbatch {b}, {name}: compiled / eager tokens/s {ratio:.2f}x, "
                         f"forward time {e['forward_time_s'] / c['forward_time_s']:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compile.json").write_text(json.dumps({"model": args.model, "n": args.n, "repeats": args.repeats,
                                                     "threads": torch.get_num_threads(), "warm_up_s": warm_up,
                                                     "cost": cost, "rows": rows}, indent=1))
        (out / "compile.md").write_text(text)


if __name__ == "__main__":
    main()
