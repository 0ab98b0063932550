"""Load time and peak memory of ``s2d2.load`` on a checkpoint, each load in a fresh process with the files' pages
evicted from the page cache first (a cold load, as after a download).

Prints one JSON line per dtype: seconds, the process's peak resident memory (``ru_maxrss``), what the load added to
it (peak after minus peak before; a tiny model is loaded first, so that one-time imports are not counted), the
weights' bytes in the loaded dtype, and both as multiples of the weights.

    python scripts/load_memory.py /tmp/sdar-1.7b --dtypes bfloat16 float32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, time
import s2d2
path, dtype, tiny = sys.argv[1:4]
s2d2.load(tiny, dtype=dtype)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
model = s2d2.load(path, dtype=dtype)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in model.adapter.model.parameters())
after = int(open("/proc/self/statm").read().split()[1]) * 4096
print(json.dumps({"dtype": dtype, "seconds": round(seconds, 1), "weights_gib": round(weights / 2**30, 2),
                  "peak_rss_gib": round(peak / 2**30, 2), "added_gib": round((peak - before) / 2**30, 2),
                  "rss_after_gib": round(after / 2**30, 2), "peak_x": round(peak / weights, 2),
                  "added_x": round((peak - before) / weights, 2)}))
"""


def evict(model_dir: Path) -> None:
    """Drop the checkpoint files' clean pages from the page cache (no root needed)."""
    for path in model_dir.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    args = parser.parse_args()
    from s2d2.training.random_init import write_random_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_random_model(Path(tmp) / "tiny")
        for dtype in args.dtypes:
            evict(args.model)
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.model), dtype, str(tiny)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
