"""How good a free redraft would be (issue 32, item 1), measured before building it.

After a verification rejects a draft, its 2L forward has already computed the verifier's rows for the span positions
after the rejected one; their argmax could be the next draft, saving the next diffusion-mode forward. Those rows are
conditioned on the rejected draft token, not on the correction, so whether they make a good draft is an empirical
question. This script decodes with greedy S2D2 verifying every step (so the output is AR's, token for token) and,
at every rejection, compares two candidate next drafts for the positions after the correction with the tokens
finally committed there:

- the **redraft**: the verifier's argmax at those positions, from the rejecting forward (free);
- the **fresh draft**: the next diffusion-mode draft the decoder actually ran (one forward).

For each it counts the leading positions that equal the final tokens: what a greedy verification of that draft
would accept. It also reports the drafts' own confidence of their first token, the signal a per-step choice could
read. Batch 1, one process, the bundled model.

Usage: python scripts/redraft_potential.py [--task wordy] [--split test] [--n 200] [--block-size 16] [--out F]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field

import s2d2
import s2d2.core.forwards as forwards_module
from s2d2.core.forwards import Forwards


@dataclass
class Rejection:
    """One rejection: where the positions after the correction start, and both candidate drafts for them."""

    start: int  # absolute position right after the correction
    end: int  # absolute end of the verified span
    redraft: list[int]
    redraft_confidence: float
    fresh: list[int] = field(default_factory=list)
    fresh_confidence: float = 0.0


def _matched(draft: list[int], final: list[int]) -> int:
    n = 0
    for d, t in zip(draft, final):
        if d != t:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="wordy", choices=["wordy", "arith"])
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from s2d2.evaluation.tasks import arith, wordy

    task = wordy if args.task == "wordy" else arith
    model = s2d2.load("bundled")
    cfg = s2d2.DecodeConfig(method="s2d2", block_size=args.block_size, policy="mask_span_length", min_span=1)
    context: dict = {}  # the verification in progress (batch 1: one at a time)
    open_rejections: list[Rejection] = []  # waiting for the next fresh draft
    real_verify, real_draft, real_accept = Forwards.verify, Forwards.draft, forwards_module.accept_greedy

    def verify(self, seq, block, unit, span, draft, generator):
        context.update(block_start=block.start, span=span)
        return (yield from real_verify(self, seq, block, unit, span, draft, generator))

    def accept(drafted, q_logits, relax=None, argmax=None):
        verdict = real_accept(drafted, q_logits, relax, argmax)
        if verdict.correction is not None and verdict.num_accepted + 1 < len(drafted):
            span, f = context["span"], verdict.num_accepted
            confidence = float(q_logits[f + 1].float().softmax(-1).max())
            open_rejections.append(Rejection(context["block_start"] + span.start + f + 1,
                                             context["block_start"] + span.end, list(argmax[f + 1:]), confidence))
        return verdict

    def draft(self, seq, block, generator, num_blocks=1, carried=None):
        made = yield from real_draft(self, seq, block, generator, num_blocks, carried)
        for r in open_rejections:
            if not r.fresh and block.start <= r.start < block.start + block.size:
                offset = r.start - block.start
                r.fresh = list(made.tokens[offset:offset + (r.end - r.start)])
                r.fresh_confidence = made.confidence[offset]
        return made

    Forwards.verify, Forwards.draft, forwards_module.accept_greedy = verify, draft, accept
    records: list[tuple[Rejection, list[int]]] = []
    forwards = tokens = 0
    for problem in task.generate(args.split, args.n, seed=0):
        open_rejections.clear()
        ids = model.encode(problem.prompt)
        out = model.generate(ids, cfg, batch_size=1)[0]
        forwards, tokens = forwards + out.stats.nfe, tokens + len(out.token_ids)
        generated = out.token_ids
        for r in open_rejections:
            final = generated[r.start - len(ids):r.end - len(ids)]
            if r.fresh and final:
                records.append((r, final))
    redraft = [_matched(r.redraft, final) for r, final in records]
    fresh = [_matched(r.fresh, final) for r, final in records]
    better = sum(a > b for a, b in zip(redraft, fresh))
    worse = sum(a < b for a, b in zip(redraft, fresh))
    confident = [(a, b) for (r, _), a, b in zip(records, redraft, fresh) if r.redraft_confidence >= 0.9]
    gated = (f"redraft {statistics.mean(a for a, _ in confident):.2f}, fresh "
             f"{statistics.mean(b for _, b in confident):.2f} positions." if confident else "none.")
    lines = [
        f"# Redraft potential: bundled, {args.n} {args.task} {args.split} problems, greedy S2D2 verifying every "
        f"step, B = {args.block_size}",
        "",
        f"{tokens} tokens in {forwards} forwards ({tokens / forwards:.2f} tokens per forward); {len(records)} "
        "rejections with positions left after the correction.",
        "",
        "| next draft | mean positions matching the final tokens | zero matching | first-token confidence (mean) |",
        "|---|---|---|---|",
        f"| redraft (verifier rows, free) | {statistics.mean(redraft):.2f} | {redraft.count(0) / len(redraft):.0%} | "
        f"{statistics.mean(r.redraft_confidence for r, _ in records):.2f} |",
        f"| fresh diffusion draft (one forward) | {statistics.mean(fresh):.2f} | {fresh.count(0) / len(fresh):.0%} | "
        f"{statistics.mean(r.fresh_confidence for r, _ in records):.2f} |",
        "",
        f"The redraft matches more positions in {better / len(records):.0%} of rejections, fewer in "
        f"{worse / len(records):.0%}. Where its first token's confidence is >= 0.9 ({len(confident)} rejections): "
        + gated,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
