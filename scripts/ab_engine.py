"""A/B of the batched engine between two versions of the package: tokens/s and the host's share of a step.

Each measurement is its own process importing the version's ``src`` folder (e.g. ``git worktree add /tmp/before
HEAD~1``), decoding the same problems of the bundled model with ``Model.generate(..., batch_size=B)`` after one
warm-up batch; rounds are shuffled, medians printed side by side with the ratio after / before. Exact figures
(tokens, NFE) must agree between the versions: the script checks it. With ``--sampled`` every method samples
(temperature 0.8, top-p 0.95, seed 0; ``--top-k K``: top-k too): then each version must give the same outputs in
every round, but the two versions may draw differently (a change of the random stream), so their outputs are not
compared.

With ``--reads`` it counts instead of timing: the device reads (host reads of a tensor) in each engine step; with
``--ops``, the tensor operations each step runs outside its forward (views aside: what would each be a kernel on a GPU)
and its host-to-device copies (calls of ``s2d2.transfer.to_device``).

Usage: python scripts/ab_engine.py BEFORE_SRC AFTER_SRC [--n 200] [--batch-sizes 16 64] [--rounds 3] [--sampled]
       [--top-k K] [--reads | --ops] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys

METHODS = {
    "ar": {"method": "ar"},
    "dynamic B=8 t=0.9": {"method": "dynamic", "block_size": 8, "threshold": 0.9},
    "s2d2 config-A B=8": {"method": "s2d2", "block_size": 8},
}

# one measurement, run inside the version's process
CHILD = """
import json, sys, time
import s2d2
from s2d2.evaluation.tasks import wordy
fields, batch, n = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model = s2d2.load("bundled")
prompts = [p.prompt for p in wordy.generate("test", n, seed=0)]
cfg = s2d2.DecodeConfig(**fields)
model.generate(prompts[:batch], cfg, batch_size=batch)  # warm-up
outs = model.generate(prompts, cfg, batch_size=batch)
stats = model.last_batch_stats.to_dict()
print(json.dumps({"tokens_per_s": stats["tokens_per_s"], "host_share": stats["host_share"],
                  "engine_share": stats["engine_share"], "nfe": sum(o.stats.nfe for o in outs),
                  "tokens": [o.token_ids for o in outs]}))
"""

# --reads: the device reads (host reads of a tensor) in each engine step, counted instead of timed, with the device
# check's counter (scripts/device_check.py, its directory passed as the last argument)
READS = """
import json, statistics, sys
import s2d2
from s2d2.engine.engine import Engine
from s2d2.evaluation.tasks import wordy
fields, batch, n = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from device_check import counted_reads
model = s2d2.load("bundled")
prompts = [p.prompt for p in wordy.generate("test", n, seed=0)]
per_step = []
step = Engine.step
def counted_step(self):
    with counted_reads(model.device) as count:
        out = step(self)
    per_step.append(count[0])
    return out
Engine.step = counted_step
outs = model.generate(prompts, s2d2.DecodeConfig(**fields), batch_size=batch)
print(json.dumps({"median_reads": statistics.median(per_step), "max_reads": max(per_step), "steps": len(per_step),
                  "nfe": sum(o.stats.nfe for o in outs), "tokens": [o.token_ids for o in outs]}))
"""

# --ops: per engine step, the tensor operations outside the forward and the host-to-device copies
OPS = """
import json, statistics, sys
import s2d2
from s2d2.engine.engine import Engine
from s2d2.evaluation.tasks import wordy
fields, batch, n = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from device_check import counted_step_costs
model = s2d2.load("bundled")
prompts = [p.prompt for p in wordy.generate("test", n, seed=0)]
per_step, step = [], Engine.step
def counted_step(self):
    count[:] = [0, 0]
    out = step(self)
    per_step.append(tuple(count))
    return out
Engine.step = counted_step
with counted_step_costs() as count:
    outs = model.generate(prompts, s2d2.DecodeConfig(**fields), batch_size=batch)
print(json.dumps({"median_ops": statistics.median(o for o, _ in per_step),
                  "median_copies": statistics.median(c for _, c in per_step), "steps": len(per_step),
                  "nfe": sum(o.stats.nfe for o in outs), "tokens": [o.token_ids for o in outs]}))
"""


def measure(src: str, fields: dict, batch: int, n: int, child: str = CHILD) -> dict:
    env = {**os.environ, "PYTHONPATH": src}
    scripts = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", child, json.dumps(fields), str(batch), str(n), scripts], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sampled", action="store_true", help="sample (temperature 0.8, top-p 0.95, seed 0)")
    parser.add_argument("--top-k", type=int, default=0, help="with --sampled: top-k too (0: off)")
    parser.add_argument("--out", default=None, help="also write every measurement (JSON lines)")
    parser.add_argument("--reads", action="store_true", help="count device reads per engine step (once per "
                        "version and cell) instead of timing")
    parser.add_argument("--ops", action="store_true", help="count the tensor operations outside the forward and the "
                        "host-to-device copies per engine step (once per version and cell) instead of timing")
    args = parser.parse_args()
    sampling = {"temperature": 0.8, "top_p": 0.95, "top_k": args.top_k, "seed": 0} if args.sampled else {}
    if args.reads or args.ops:
        child, keys = (READS, ("median_reads", "max_reads")) if args.reads else (OPS, ("median_ops", "median_copies"))
        print("| method | batch | reads / step before: median | max | after: median | max |" if args.reads else
              "| method | batch | ops / step before | host-to-device copies / step before | ops after | copies after |")
        print("|---|---|---|---|---|---|")
        for method in METHODS:
            for batch in args.batch_sizes:
                got = {v: measure(getattr(args, v), {**METHODS[method], **sampling}, batch, args.n, child)
                       for v in ("before", "after")}
                assert got["before"]["tokens"] == got["after"]["tokens"] or args.sampled, "outputs differ"
                values = [f"{got[v][key]:g}" for v in ("before", "after") for key in keys]
                print(f"| {method} | {batch} | " + " | ".join(values) + " |", flush=True)
        return
    cells = [(v, m, b) for v in ("before", "after") for m in METHODS for b in args.batch_sizes] * args.rounds
    random.Random(0).shuffle(cells)
    records = []
    for version, method, batch in cells:
        rec = measure(getattr(args, version), {**METHODS[method], **sampling}, batch, args.n)
        records.append({"version": version, "method": method, "batch": batch, **rec})
        print(json.dumps({k: v for k, v in records[-1].items() if k != "tokens"}), file=sys.stderr, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps({k: v for k, v in r.items() if k != "tokens"}) + "\n" for r in records)
    print("| method | batch | tokens/s before | after | after / before | host share before | after |")
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        for batch in args.batch_sizes:
            mine = {v: [r for r in records if (r["version"], r["method"], r["batch"]) == (v, method, batch)]
                    for v in ("before", "after")}
            for rs in (mine.values() if args.sampled else [mine["before"] + mine["after"]]):
                assert len({json.dumps(r["tokens"]) for r in rs}) == 1, "outputs differ"
                assert len({r["nfe"] for r in rs}) == 1, "NFE differs"
            tps = {v: statistics.median(r["tokens_per_s"] for r in rs) for v, rs in mine.items()}
            host = {v: statistics.median(r["host_share"] for r in rs) for v, rs in mine.items()}
            print(f"| {method} | {batch} | {tps['before']:.0f} | {tps['after']:.0f} | "
                  f"{tps['after'] / tps['before']:.2f} | {host['before']:.1%} | {host['after']:.1%} |")


if __name__ == "__main__":
    main()
