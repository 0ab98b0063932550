"""The host's cost of an engine step against the batch size (issue 28, item 4): what the cost model's host term is.

For each method and batch size, the bundled model decodes the same wordy test problems through the batched engine
(one warm-up batch first) and the engine's own counters give, per step: the forward's milliseconds, the host's
(everything else: the rows' algorithm, building and packing the forwards, the numerical stage), and the part of
the host's that is the engine's own (admitting, building, packing; the rest is the rows' algorithm and the
numerical stage that feeds it, which counted as the engine's before commit 77b1d6b). Medians of
``--rounds`` runs. The host term is what a faster device does not shrink: on a GPU, where a forward of a 1.7B model
at batch 64 takes a few milliseconds, it is the bound to watch.

Usage: python scripts/host_cost.py [--n 128] [--batch-sizes 1 4 16 64] [--rounds 3] [--sampled]   # alone
"""

from __future__ import annotations

import argparse
import statistics

import s2d2
from s2d2.evaluation.tasks import wordy

METHODS = {
    "ar": {"method": "ar"},
    "dynamic B=8 t=0.9": {"method": "dynamic", "block_size": 8, "threshold": 0.9},
    "s2d2 config-A B=8": {"method": "s2d2", "block_size": 8},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sampled", action="store_true", help="sample (temperature 0.8, top-p 0.95, seed 0)")
    args = parser.parse_args()
    sampling = {"temperature": 0.8, "top_p": 0.95, "seed": 0} if args.sampled else {}
    model = s2d2.load("bundled")
    prompts = [p.prompt for p in wordy.generate("test", args.n, seed=0)]
    print("| method | batch | steps | forward ms / step | host ms / step | of which the engine's | host share |")
    print("|---|---|---|---|---|---|---|")
    for name, fields in METHODS.items():
        cfg = s2d2.DecodeConfig(**fields, **sampling)
        for batch in args.batch_sizes:
            model.generate(prompts[:batch], cfg, batch_size=batch)  # warm-up
            runs = []
            for _ in range(args.rounds):
                model.generate(prompts, cfg, batch_size=batch)
                runs.append(model.last_batch_stats)
            steps = runs[0].steps
            forward = statistics.median(r.forward_time_s / r.steps for r in runs) * 1e3
            host = statistics.median((r.time_s - r.forward_time_s) / r.steps for r in runs) * 1e3
            engine = statistics.median((r.time_s - r.forward_time_s - r.row_time_s) / r.steps for r in runs) * 1e3
            share = statistics.median(r.to_dict()["host_share"] for r in runs)
            print(f"| {name} | {batch} | {steps} | {forward:.2f} | {host:.2f} | {engine:.2f} | {share:.1%} |",
                  flush=True)


if __name__ == "__main__":
    main()
