"""Accuracy and cost of each decoding method on the bundled model (the tables in its model card).

Usage: python scripts/model_card_eval.py [--model bundled] [--n 500] [--splits wordy:test wordy:generalisation arith:test]
                                         [--settings ar ...] [--out runs/model_card.json]

Every setting decodes the same first N problems of each task:split, greedily, batched (batched decoding gives each
row the tokens and counters of batch 1, so every figure here is exact and hardware-free; wall clock is in
BENCHMARKS.md). For wordy's generalisation split a second table gives AR greedy's accuracy per held-out production
(over every problem that uses it) and by how many held-out productions a problem uses. For each wordy split, AR's
wrong answers are counted by what went wrong at their first step that differs from the worked solution.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import s2d2
from s2d2.evaluation.evaluate import EvalResult, evaluate
from s2d2.evaluation.tasks import wordy

SETTINGS: list[tuple[str, dict]] = [("ar", dict(method="ar"))]
SETTINGS += [(f"static B={b} S={s}", dict(method="static", block_size=b, steps=s)) for b, s in ((4, 4), (8, 4), (16, 8))]
SETTINGS += [(f"dynamic B={b} t={t}", dict(method="dynamic", block_size=b, threshold=t))
             for b in (4, 8, 16) for t in (0.5, 0.9)]
SETTINGS += [(f"s2d2 config-A B={b}", dict(method="s2d2", block_size=b)) for b in (4, 8, 16)]
SETTINGS += [
    ("s2d2 always-verify B=16", dict(method="s2d2", block_size=16, policy="mask_span_length", min_span=1)),
    ("s2d2 hysteresis B=16", dict(method="s2d2", block_size=16, policy="score_hysteresis", score_type="difference_dynamic",
                                  penalty=1.0, tau_on=1.0, tau_off=-5.0, threshold=0.9)),
    ("s2d2 span>=2 B=8 t=0.7", dict(method="s2d2", block_size=8, policy="mask_span_length", min_span=2, threshold=0.7)),
    ("s2d2 ucb B=16 t=0.7", dict(method="s2d2", block_size=16, policy="contextual_bandit_ucb", threshold=0.7)),
    ("s2d2 skip-confident B=8 t=0.9", dict(method="s2d2", block_size=8, threshold=0.9, skip_confident=True)),
    ("s2d2 skip-confident B=16 t=0.9", dict(method="s2d2", block_size=16, threshold=0.9, skip_confident=True)),
]


def held_out_table(result: EvalResult) -> dict[str, tuple[float, int]]:
    """Accuracy and problem count per held-out production, and for problems using one or several of them."""
    problems = wordy.generate("generalisation", result.n, seed=0)
    groups: dict[str, list[bool]] = {}
    for sample in result.samples:
        held = sorted(set(problems[sample["index"]].productions) & wordy.HELD_OUT.keys())
        for name in held + ["one held-out production" if len(held) == 1 else "several held-out productions"]:
            groups.setdefault(name, []).append(bool(sample["correct"]))
    order = list(wordy.HELD_OUT) + ["one held-out production", "several held-out productions"]
    return {k: (sum(groups[k]) / len(groups[k]), len(groups[k])) for k in order if k in groups}


_STEP = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")
ERROR_KINDS = ("wrong plan (an operand from the question, the wrong one)", "a number mis-copied (an operand found "
               "nowhere in the question or the steps before)", "wrong operator (right operands)",
               "arithmetic (right expression, wrong result)", "too few or too many steps",
               "malformed (not the solution's format)")


def error_kind(problem: wordy.WordyProblem, text: str) -> str:
    """Why a wrong answer is wrong, judged at its first step that differs from the worked solution."""
    gold = list(problem.steps)
    pred = [s.rstrip(".") for s in text.split("####")[0].split()]
    k = next((i for i, (g, p) in enumerate(zip(gold, pred)) if g != p), None)
    if k is None:
        return ERROR_KINDS[4] if len(gold) != len(pred) else ERROR_KINDS[5]
    g, p = _STEP.fullmatch(gold[k]), _STEP.fullmatch(pred[k])
    if p is None:
        return ERROR_KINDS[5]
    if g.group(1, 2, 3) == p.group(1, 2, 3):
        return ERROR_KINDS[3]
    known = set(re.findall(r"\d+", problem.question)) | {s.split("=")[-1] for s in gold[:k]}
    if not {p.group(1), p.group(3)} <= known:
        return ERROR_KINDS[1]
    if g.group(2) != p.group(2) and sorted(g.group(1, 3)) == sorted(p.group(1, 3)):
        return ERROR_KINDS[2]
    return ERROR_KINDS[0]


def error_table(result: EvalResult, split: str) -> Counter:
    """How many of AR's wrong answers fall in each of :data:`ERROR_KINDS`."""
    problems = wordy.generate(split, result.n, seed=0)
    return Counter(error_kind(problems[s["index"]], s["text"]) for s in result.samples if not s["correct"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--splits", nargs="+", default=["wordy:test", "wordy:generalisation", "arith:test"],
                    help="task:split pairs, one table each")
    ap.add_argument("--settings", nargs="+", default=None, metavar="NAME",
                    help="only these rows of the table (default: all), e.g. ar 's2d2 config-A B=16'")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default="runs/model_card.json")
    args = ap.parse_args()
    settings = [(name, fields) for name, fields in SETTINGS if args.settings is None or name in args.settings]
    if not settings or (args.settings and len(settings) != len(set(args.settings))):
        ap.error(f"--settings names rows of the table: {', '.join(name for name, _ in SETTINGS)}")
    model = s2d2.load(args.model)
    rows = []
    for pair in args.splits:
        task, _, split = pair.partition(":")
        split = split or "test"
        print(f"\n**{task} {split}** ({args.n} problems)\n")
        print("| decoding | accuracy | by level | tokens / forward | NFE / problem |")
        print("|---|---|---|---|---|")
        ar_generalisation = None
        for name, fields in settings:
            r = evaluate(model, s2d2.DecodeConfig(**fields), task=task, n=args.n, split=split,
                         batch_size=args.batch_size)
            d = r.stats.to_dict()
            levels = " / ".join(f"{v:.0%}" for v in r.accuracy_by_level.values())
            print(f"| {name} | {r.accuracy:.1%} | {levels} | {d['tokens_per_forward']:.2f} | {d['nfe'] / r.n:.1f} |",
                  flush=True)
            rows.append({"name": name, "task": task, "split": split, "config": fields, **r.to_dict()})
            if name == "ar" and (task, split) == ("wordy", "generalisation"):
                ar_generalisation = r
            if name == "ar" and task == "wordy":
                kinds = error_table(r, split)
                print("\n| AR's wrong answers, by their first wrong step | answers |\n|---|---|")
                for kind in ERROR_KINDS:
                    print(f"| {kind} | {kinds[kind]} |")
                rows.append({"name": "ar errors by kind", "task": task, "split": split, "errors": dict(kinds)})
                print()
        if ar_generalisation is not None:
            table = held_out_table(ar_generalisation)
            print("\n| held-out production (AR greedy) | accuracy | problems |\n|---|---|---|")
            for k, (acc, count) in table.items():
                print(f"| {k} | {acc:.1%} | {count} |", flush=True)
            rows.append({"name": "ar by held-out production", "task": task, "split": split,
                         "accuracy_by_held_out": {k: {"accuracy": a, "n": c} for k, (a, c) in table.items()}})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
