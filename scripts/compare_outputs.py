"""Before/after check for changes that must not change behaviour: run the same decodes with two versions of the
package and compare every exact figure byte for byte (tokens, texts, NFE and every counter; accuracy, tokens per
forward and rows per forward of the benchmark); wall-clock figures are left out.

Usage (from the repository root; a version is a ``src`` folder, e.g. of ``git worktree add /tmp/before HEAD~1``)::

    .venv/bin/python scripts/compare_outputs.py run /tmp/before/src out/before
    .venv/bin/python scripts/compare_outputs.py run src out/after --models out/before/models
    .venv/bin/python scripts/compare_outputs.py diff out/before out/after

``run`` writes tiny random checkpoints of every family (``s2d2 init-random``, seed 0; ``--models`` reuses those of
an earlier run, so both versions decode the same weights), then ``s2d2 eval --samples`` on 20 arith problems with
three methods (dynamic, S2D2, S2D2 verifying every step) on every family and on the bundled model, and ``s2d2 bench
--quick`` on the bundled model. ``diff`` compares the files: it prints one line per file and exits 1 on the first difference it finds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FAMILIES = ("sdar", "fast_dllm_v2", "llada2", "d2f_llada", "d2f_dream")
METHODS = {
    "dynamic": ["--method", "dynamic", "--block-size", "4", "--threshold", "0.7"],
    "s2d2": ["--method", "s2d2", "--block-size", "8", "--threshold", "0.7"],
    # verifies every step: 2L verifications, fused drafts, kept rows and prefix caching on every family
    "s2d2-verify": ["--method", "s2d2", "--block-size", "8", "--policy", "mask_span_length", "--min-span", "1"],
}
# Per-row and benchmark fields that are measured wall time, not properties of the decode.
TIMED = ("time", "tokens_per_s", "speedup", "latency", "loop_share", "host_share", "engine_share")


def _cli(src: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import s2d2; print(s2d2.__file__)"], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"s2d2 imports from {where}, not from {src}")
    subprocess.run([sys.executable, "-m", "s2d2.cli", *args], env=env, check=True, stdout=subprocess.DEVNULL)


def run(src: Path, out: Path, models: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if models is None:
        models = out / "models"
        for family in FAMILIES:
            _cli(src, "init-random", "--family", family, "--out", str(models / family), "--force")
    for name in (*FAMILIES, "bundled"):
        model = "bundled" if name == "bundled" else str(models / name)
        for method, flags in METHODS.items():
            target = out / f"eval-{name}-{method}.jsonl"
            _cli(src, "eval", "--model", model, "--n", "20", "--max-new-tokens", "48", "--samples", str(target),
                 "--json", *flags)
            print(f"wrote {target}")
    bench = out / "bench"
    shutil.rmtree(bench, ignore_errors=True)
    _cli(src, "bench", "--quick", "--no-progress", "--out", str(bench))
    print(f"wrote {bench / 'results.jsonl'}")


def _exact(value: object) -> object:
    """``value`` without its wall-clock fields, recursively."""
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items() if not any(t in k for t in TIMED)}
    if isinstance(value, list):
        return [_exact(v) for v in value]
    return value


def diff(a: Path, b: Path) -> int:
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl") if "models" not in p.parts)
    if not files:
        raise SystemExit(f"no .jsonl files under {a}")
    for rel in files:
        left = [_exact(json.loads(line)) for line in (a / rel).read_text().splitlines()]
        right = [_exact(json.loads(line)) for line in (b / rel).read_text().splitlines()]
        same = json.dumps(left, sort_keys=True) == json.dumps(right, sort_keys=True)
        print(f"{'same' if same else 'DIFFERENT'}  {rel}  ({len(left)} records)")
        if not same:
            for k, (x, y) in enumerate(zip(left, right)):
                if x != y:
                    print(f"  first difference at record {k}:\n  {x}\n  {y}")
                    break
            return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("src", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--models", type=Path, default=None)
    d = sub.add_parser("diff")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    ns = ap.parse_args()
    if ns.command == "run":
        run(ns.src, ns.out, ns.models)
        return 0
    return diff(ns.a, ns.b)


if __name__ == "__main__":
    sys.exit(main())
