"""cProfile of one batched decode of the bundled model: where an engine step's time goes (issue 28).

The bundled model decodes ``--n`` wordy test problems at ``--batch`` rows (after a warm-up batch) under cProfile;
prints the wall time, the engine's host share and the functions with the most time of their own.

Usage: python scripts/profile_batch.py [--method s2d2] [--block-size 8] [--n 64] [--batch 64] [--sampled] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import s2d2
from s2d2.evaluation.tasks import wordy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="s2d2")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sampled", action="store_true", help="sample (temperature 0.8, top-p 0.95, seed 0)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    sampling = {"temperature": 0.8, "top_p": 0.95, "seed": 0} if args.sampled else {}
    model = s2d2.load("bundled")
    block = {} if args.method == "ar" else {"block_size": args.block_size}
    cfg = s2d2.DecodeConfig(method=args.method, **block, **sampling)
    prompts = [p.prompt for p in wordy.generate("test", args.n, seed=0)]
    model.generate(prompts[:args.batch], cfg, batch_size=args.batch)  # warm-up
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    model.generate(prompts, cfg, batch_size=args.batch)
    profile.disable()
    print(f"wall {time.perf_counter() - t0:.2f} s, host share {model.last_batch_stats.to_dict()['host_share']:.1%}")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
