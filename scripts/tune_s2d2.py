"""Sweep S2D2 and dynamic settings on the *validation* split (accuracy and tokens per forward, both exact under
greedy decoding), to choose the tuned rows of ``s2d2 bench``'s default grid without looking at the test split.

Usage: python scripts/tune_s2d2.py [--model bundled] [--n 150] [--out runs/tune.json]
Prints one Markdown row per setting, then the Pareto-optimal rows (accuracy against tokens per forward).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import s2d2
from s2d2.evaluate import evaluate

POLICIES: dict[str, dict] = {
    "config-A": dict(),
    "tau=-0.5": dict(tau=-0.5),
    "tau=0.5": dict(tau=0.5),
    "span>=1": dict(policy="mask_span_length", min_span=1),
    "span>=2": dict(policy="mask_span_length", min_span=2),
    "span>=4": dict(policy="mask_span_length", min_span=4),
    "hysteresis": dict(policy="score_hysteresis", score_type="difference_dynamic", penalty=1.0, tau_on=1.0,
                       tau_off=-5.0),
}


def settings() -> list[tuple[str, dict]]:
    out = [("ar", dict(method="ar"))]
    for b in (4, 8, 16):
        for t in (0.5, 0.7, 0.9, 0.95):
            out.append((f"dynamic B={b} t={t}", dict(method="dynamic", block_size=b, threshold=t)))
        for t in (0.5, 0.7, 0.9):
            out += [(f"s2d2 {name} B={b} t={t}", dict(method="s2d2", block_size=b, threshold=t, **fields))
                    for name, fields in POLICIES.items()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--out", default="runs/tune.json")
    args = ap.parse_args()
    model = s2d2.load(args.model)
    rows = []
    print("| setting | accuracy | tokens / forward |\n|---|---|---|")
    for name, fields in settings():
        r = evaluate(model, s2d2.DecodeConfig(**fields), n=args.n, split="validation")
        tpf = r.stats.to_dict()["tokens_per_forward"]
        rows.append({"name": name, "config": fields, "accuracy": r.accuracy, "tokens_per_forward": tpf})
        print(f"| {name} | {r.accuracy:.1%} | {tpf:.2f} |", flush=True)
    front = [r for r in rows if not any(o["accuracy"] >= r["accuracy"] and o["tokens_per_forward"] > r["tokens_per_forward"]
                                        for o in rows)]
    print("\nPareto-optimal:")
    for r in sorted(front, key=lambda r: -r["accuracy"]):
        print(f"  {r['name']}: {r['accuracy']:.1%}, {r['tokens_per_forward']:.2f} tokens/forward")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
