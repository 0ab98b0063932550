"""What ``batch_size="auto"`` chooses, and what the batch then really takes: ``--prompts`` prompts of ``--tokens``
tokens decoded with the default batch size, the plan (rows, bytes per row, free memory) against the peak resident
memory the decoding added (``ru_maxrss`` after minus before, the weights already loaded). Run alone::

    python scripts/auto_batch.py --model /tmp/sdar-1.7b --prompts 8 --tokens 2000 \\
        --out benchmarks/sdar-1.7b-random/auto_batch.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from long_context import long_prompt  # noqa: E402

import s2d2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--method", default="s2d2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = s2d2.load(args.model)
    base = long_prompt(args.model, args.tokens * args.prompts)
    ids = model.encode(base)
    prompts = [ids[k * args.tokens:(k + 1) * args.tokens] for k in range(args.prompts)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    outs = model.generate(prompts, method=args.method, max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - t0
    added = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    plan = model.last_batch_plan
    report = {"model": Path(args.model).name, "dtype": str(model.dtype).removeprefix("torch."),
              "prompts": args.prompts, "tokens": args.tokens, "rows": plan.rows, "plan": plan.describe(),
              "estimate_gib": round(plan.rows * plan.row_bytes / 2**30, 2),
              "measured_added_gib": round(added / 2**30, 2),
              "seconds": round(seconds, 1), "generated": sum(len(o.token_ids) for o in outs),
              "nfe": sum(o.stats.nfe for o in outs)}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
