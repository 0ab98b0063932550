"""How much a draft tree could add (issue 32, item 2), measured before building it.

A verification accepts the prefix of one draft path. A tree verifies several: at some positions of the span, the
draft's runner-up tokens too (as Medusa and SpecInfer verify token trees in one forward with a tree attention
mask), and accepts the longest path that agrees with the verifier. This script decodes with greedy S2D2 verifying
every step (the output is AR's, token for token; ``fuse_draft`` off, so every draft comes from a diffusion-mode
forward whose logits the script reads) and, at every verification, asks how far a tree built from that draft would
have agreed with the tokens finally committed (AR's argmax chain from the span's start):

- **path**: the draft's argmax at each position (what a verification accepts today, plus its correction);
- **top-2 at the b least confident positions**: a path may take the runner-up token there (2**b paths);
- **top-k everywhere**: the Cartesian upper bound of a tree with k candidates at every position.

For each it reports the mean tokens a verification would commit (the matching prefix, plus the verifier's
correction when the prefix ends inside the span) and the tree's query rows (its nodes: the rows a verification
forward computes instead of the span's), and a first-order projection of tokens per forward (the extra tokens of
each verification added, the forwards unchanged: accepting more also moves later spans, which this does not
model). Batch 1, one process, the bundled model.

Usage: python scripts/tree_potential.py [--task wordy] [--split test] [--n 200] [--block-size 16] [--out F]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch

import s2d2
from s2d2.core.forwards import Forwards
from s2d2.core.requests import Scored


@dataclass
class Verification:
    """One verification: the span's absolute start, and the draft's candidates and confidence at each position."""

    start: int
    candidates: list[list[int]]  # per span position, the draft's tokens by descending probability
    confidence: list[float]
    drafted: list[int]


def committed(candidates: list[list[int]], final: list[int], width: list[int]) -> int:
    """Tokens a greedy tree verification commits: the longest prefix whose token at position i is among the first
    ``width[i]`` candidates there, plus the correction when it ends inside the span."""
    n = 0
    for options, w, token in zip(candidates, width, final):
        if token not in options[:w]:
            break
        n += 1
    return n + (1 if n < len(final) else 0)


def tree_rows(width: list[int]) -> int:
    """Query rows of the tree with ``width[i]`` candidates at position i: its nodes, depth by depth."""
    rows, paths = 0, 1
    for w in width:
        paths *= w
        rows += paths
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="wordy", choices=["wordy", "arith"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from s2d2.evaluation.tasks import arith, wordy

    task = wordy if args.task == "wordy" else arith
    model = s2d2.load("bundled")
    cfg = s2d2.DecodeConfig(method="s2d2", block_size=args.block_size, policy="mask_span_length", min_span=1,
                            fuse_draft=False)
    last_draft: dict = {}  # the block's latest diffusion-mode candidates (batch 1: one row at a time)
    verifications: list[Verification] = []
    real_verify, real_draft = Forwards.verify, Forwards.draft

    def draft(self, seq, block, generator, num_blocks=1, carried=None):
        inner = real_draft(self, seq, block, generator, num_blocks, carried)
        request = next(inner)
        while True:  # pass the row's requests through, reading the draft forward's logits on the way
            sent = yield request
            if isinstance(sent, Scored):
                probs = torch.softmax(sent.logits.float(), dim=-1)
                last_draft.update(start=block.start, top=probs.topk(args.top_k, dim=-1).indices.tolist())
            try:
                request = inner.send(sent)
            except StopIteration as done:
                return done.value

    def verify(self, seq, block, unit, span, made, generator):
        top = last_draft["top"][span.start:span.end]
        verifications.append(Verification(block.start + span.start, top, list(made.confidence[span.start:span.end]),
                                          list(made.tokens[span.start:span.end])))
        return (yield from real_verify(self, seq, block, unit, span, made, generator))

    Forwards.verify, Forwards.draft = verify, draft
    records: list[tuple[Verification, list[int]]] = []
    forwards = tokens = 0
    for problem in task.generate(args.split, args.n, seed=0):
        verifications.clear()
        ids = model.encode(problem.prompt)
        out = model.generate(ids, cfg, batch_size=1)[0]
        forwards, tokens = forwards + out.stats.nfe, tokens + len(out.token_ids)
        for v in verifications:
            final = out.token_ids[v.start - len(ids):v.start - len(ids) + len(v.candidates)]
            if len(final) == len(v.candidates):
                records.append((v, final))
    # the first candidate is the draft's own token (its argmax), but where two tokens tie
    agree = statistics.mean(v.candidates[i][0] == v.drafted[i] for v, _ in records for i in range(len(v.drafted)))

    def widths(v: Verification, branches: int, k: int) -> list[int]:
        """k candidates at the ``branches`` least confident positions (every position with branches < 0)."""
        if branches < 0:
            return [k] * len(v.candidates)
        low = sorted(range(len(v.confidence)), key=lambda i: v.confidence[i])[:branches]
        return [k if i in low else 1 for i in range(len(v.candidates))]

    trees = [("path (today)", 0, 1)] + [(f"top-2 at the {b} least confident", b, 2) for b in (1, 2, 3, 4)]
    trees += [(f"top-{k} everywhere (upper bound)", -1, k) for k in range(2, args.top_k + 1)]
    base = statistics.mean(committed(v.candidates, f, [1] * len(f)) for v, f in records)
    lines = [
        f"# Draft-tree potential: bundled, {args.n} {args.task} {args.split} problems, greedy S2D2 verifying every "
        f"step, B = {args.block_size}, fuse_draft off",
        "",
        f"{tokens} tokens in {forwards} forwards ({tokens / forwards:.3f} tokens per forward); {len(records)} "
        f"verifications (those whose span the output reaches); the first candidate is the drafted token at "
        f"{agree:.1%} of positions.",
        "",
        "| tree | tokens committed per verification | tree nodes per verification (today: the span) | "
        "projected tokens per forward |",
        "|---|---|---|---|",
    ]
    for name, branches, k in trees:
        got = [committed(v.candidates, f, widths(v, branches, k)) for v, f in records]
        rows = statistics.mean(tree_rows(widths(v, branches, k)) for v, _ in records)
        extra = sum(got) - base * len(records)
        lines.append(f"| {name} | {statistics.mean(got):.3f} | {rows:.1f} | {(tokens + extra) / forwards:.3f} |")
    # where a tree would have to branch: each first rejection's correction among the draft's candidates there, and
    # how the rejected position ranks by the draft's confidence within its span (0: the least confident)
    rejected = []
    for v, final in records:
        f = next((i for i, (options, token) in enumerate(zip(v.candidates, final)) if options[0] != token), None)
        if f is not None:
            rank = sorted(range(len(v.confidence)), key=lambda i: v.confidence[i]).index(f)
            rejected.append((v.candidates[f].index(final[f]) if final[f] in v.candidates[f] else args.top_k, rank))
    lines += ["", f"{len(rejected)} of them rejected a draft. The correction was the draft's candidate "
              + ", ".join(f"{k + 1}: {sum(c == k for c, _ in rejected) / len(rejected):.0%}"
                          for k in range(1, args.top_k))
              + f", below the top {args.top_k}: {sum(c == args.top_k for c, _ in rejected) / len(rejected):.0%}. "
              "The rejected position was the span's least confident in "
              f"{sum(r == 0 for _, r in rejected) / len(rejected):.0%} of them, among its 4 least confident in "
              f"{sum(r < 4 for _, r in rejected) / len(rejected):.0%}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
