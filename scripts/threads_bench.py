"""What should ``--threads`` default to? Tokens/s of the bundled model with 1 and 2 torch threads and with the
default (``auto``: no flag; the idle cores at start) on an idle machine and on a busy one, at batch 1 and 64.

"Busy" is emulated by ``--busy K`` processes that spin on a core each for the whole measurement (another job on
the machine, as on a shared VM or beside a training run). Every measurement is its own ``s2d2 eval`` process (the
thread count is per process), rounds are shuffled, and the medians are printed as a table with the ratio to one
thread. Greedy decoding: the tokens are the same at every thread count (checked: the accuracies must agree).

Usage: python scripts/threads_bench.py [--rounds 3] [--busy 0 1 2] [--out threads.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

# (label, eval flags): batch 1 is `s2d2 generate` on one prompt; batch 64 is `s2d2 eval`'s and the server's regime
WORKLOADS = {
    "s2d2 batch 1": ["--method", "s2d2", "--block-size", "8", "--n", "24", "--batch-size", "1"],
    "ar batch 1": ["--method", "ar", "--n", "24", "--batch-size", "1"],
    "s2d2 batch 64": ["--method", "s2d2", "--block-size", "8", "--n", "64", "--batch-size", "64"],
    "ar batch 64": ["--method", "ar", "--n", "64", "--batch-size", "64"],
}
THREADS = ("1", "2", "auto")
SPIN = "while True: pass"


def measure(workload: str, threads: str) -> dict:
    """One ``s2d2 eval`` run: its accuracy and the engine's tokens/s (model loading excluded)."""
    cmd = [sys.executable, "-m", "s2d2", "eval", "--task", "wordy", "--json", "--no-progress",
           *WORKLOADS[workload], *([] if threads == "auto" else ["--threads", threads])]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {"accuracy": out["accuracy"], "tokens_per_s": out["stats"]["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="spinning processes (0 = idle)")
    parser.add_argument("--out", default=None, help="also write every measurement (JSON lines)")
    args = parser.parse_args()
    records = []
    rng = random.Random(0)
    for busy in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            cells = [(w, t) for w in WORKLOADS for t in THREADS] * args.rounds
            rng.shuffle(cells)
            for workload, threads in cells:
                rec = {"busy": busy, "workload": workload, "threads": threads, **measure(workload, threads)}
                records.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
        finally:
            for p in spinners:
                p.kill()
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    print("| busy cores | workload | " + " | ".join(f"{t} thread(s) tok/s" for t in THREADS)
          + " | 2 / 1 | auto / best |")
    print("|---|---|" + "---|" * (len(THREADS) + 2))
    for busy in args.busy:
        for workload in WORKLOADS:
            cell = {t: [r for r in records if (r["busy"], r["workload"], r["threads"]) == (busy, workload, t)]
                    for t in THREADS}
            assert len({r["accuracy"] for rs in cell.values() for r in rs}) == 1, "outputs differ across threads"
            med = {t: statistics.median(r["tokens_per_s"] for r in rs) for t, rs in cell.items()}
            print(f"| {busy} | {workload} | " + " | ".join(f"{med[t]:.0f}" for t in THREADS)
                  + f" | {med['2'] / med['1']:.2f} | {med['auto'] / max(med['1'], med['2']):.2f} |")


if __name__ == "__main__":
    main()
