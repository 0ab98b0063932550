"""float32 against bfloat16 on the CPU, by model size: the milliseconds of one packed forward (1 and 16 requests of
one query row over a 64-token cache) for the bundled model, random models of 34M and 143M parameters, and any
``--model`` given (e.g. the SDAR-1.7B-shaped checkpoint of scripts/sized_checkpoint.py). This is what decides
``dtype="auto"`` on a CPU (s2d2.api.cpu_dtype). Shapes run in shuffled rounds; prints a table of medians and writes
``--out`` JSON.

    python scripts/dtype_cost.py --model /tmp/sdar-1.7b --out benchmarks/sdar-1.7b-random/dtype_cost.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import s2d2
from s2d2.training.random_init import write_random_model

sys.path.insert(0, str(Path(__file__).parent))
from forward_cost import measure  # noqa: E402

SIZES = {  # random models between the bundled one and the real ones (34M and 143M parameters)
    "random-34M": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=64, vocab_size=8192),
    "random-143M": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=10, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=128, vocab_size=8192),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="more models to measure (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="forwards timed per shape and round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"bundled": "bundled", **{name: str(write_random_model(Path(tmp) / name, **shape))
                                         for name, shape in SIZES.items()}, **{m: m for m in args.model}}
        records = []
        for name, path in paths.items():
            models = {dtype: s2d2.load(path, dtype=dtype) for dtype in ("float32", "bfloat16")}
            params = sum(p.numel() for p in models["float32"].adapter.model.parameters())
            times: dict[tuple[str, int], list[float]] = {}
            cases = [(dtype, n) for dtype in models for n in (1, 16)]
            for dtype, n in cases:  # warm-up: first forwards of a shape allocate and page in
                measure(models[dtype], n, 1, 64, 1, 1)
            for _ in range(args.rounds):
                random.shuffle(cases)
                for dtype, n in cases:
                    times.setdefault((dtype, n), []).extend(measure(models[dtype], n, 1, 64, args.repeats, 0))
            row = {"model": Path(name).name, "params": params}  # a directory's name, not the machine's path
            for (dtype, n), ms in sorted(times.items()):
                row[f"{dtype}_{n}_ms"] = round(statistics.median(ms), 2)
            for n in (1, 16):
                row[f"bf16_speedup_{n}"] = round(row[f"float32_{n}_ms"] / row[f"bfloat16_{n}_ms"], 2)
            records.append(row)
            print(json.dumps(row), flush=True)
            del models
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "records": records}, indent=1) + "\n")


if __name__ == "__main__":
    main()
