"""Redrafts from the verifier (issue 32, item 1) on the bundled model: exact figures per split, and wall clock.

For each split (wordy test, wordy generalisation, arith test; ``--n`` problems each), AR and every setting decode the
same problems (batched: the figures are batch 1's); the table gives, per setting, how many outputs equal AR's token
for token, tokens per forward, query rows per forward and the redrafts used. Then ``--rounds`` shuffled rounds of
batch-1 decoding on the first split time the base setting against each redraft setting (tokens/s ratio).

Usage: python scripts/redraft_bench.py [--n 200] [--rounds 3] [--timing-n 100] [--out F]   # alone on the CPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import s2d2
from s2d2.evaluation.tasks import arith, wordy

SPLITS = {"wordy test": (wordy, "test"), "wordy generalisation": (wordy, "generalisation"),
          "arith test": (arith, "test")}
BASE = {"method": "s2d2", "block_size": 16}  # configuration A at B = 16: today's best exact setting
SETTINGS = {
    "config A B=16": BASE,
    "config A B=16 redraft 0.9": {**BASE, "redraft": 0.9},
    "config A B=16 redraft 0.99": {**BASE, "redraft": 0.99},
    "verify every step B=16": {**BASE, "policy": "mask_span_length", "min_span": 1},
    "verify every step B=16 redraft 0.99": {**BASE, "policy": "mask_span_length", "min_span": 1, "redraft": 0.99},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timing-n", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = s2d2.load("bundled")
    lines = [f"# Redrafts on the bundled model: {args.n} problems per split, greedy", "",
             "| split | setting | identical to AR | tokens / forward | vs config A | rows / forward | redrafts |",
             "|---|---|---|---|---|---|---|"]
    for split, (task, name) in SPLITS.items():
        prompts = [p.prompt for p in task.generate(name, args.n, seed=0)]
        ar = [o.token_ids for o in model.generate(prompts, method="ar")]
        base_tpf = None
        for label, fields in SETTINGS.items():
            outs = model.generate(prompts, s2d2.DecodeConfig(**fields))
            same = sum(o.token_ids == a for o, a in zip(outs, ar))
            tokens, nfe = sum(len(o.token_ids) for o in outs), sum(o.stats.nfe for o in outs)
            rows = sum(o.stats.query_rows for o in outs)
            tpf = tokens / nfe
            base_tpf = base_tpf or tpf
            lines.append(f"| {split} | {label} | {same}/{len(outs)} | {tpf:.3f} | {tpf / base_tpf - 1:+.1%} | "
                         f"{rows / nfe:.1f} | {sum(o.stats.redrafts for o in outs)} |")
            print(lines[-1], flush=True)
    task, name = SPLITS["wordy test"]
    prompts = [p.prompt for p in task.generate(name, args.timing_n, seed=0)]
    timed = ["config A B=16", "config A B=16 redraft 0.99", "verify every step B=16",
             "verify every step B=16 redraft 0.99"]
    rates: dict[str, list[float]] = {label: [] for label in timed}
    model.generate(prompts[:4], s2d2.DecodeConfig(**BASE), batch_size=1)  # warm-up
    order = timed * args.rounds
    random.Random(0).shuffle(order)
    for label in order:
        t0 = time.perf_counter()
        outs = model.generate(prompts, s2d2.DecodeConfig(**SETTINGS[label]), batch_size=1)
        rates[label].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
    lines += ["", f"Batch 1, wordy test, {args.timing_n} problems, medians of {args.rounds} shuffled rounds:", "",
              "| setting | tokens / s | vs its base |", "|---|---|---|"]
    for label in timed:
        base = "config A B=16" if label.startswith("config A") else "verify every step B=16"
        ratio = statistics.median(rates[label]) / statistics.median(rates[base])
        lines.append(f"| {label} | {statistics.median(rates[label]):.0f} | {ratio:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
