"""Speculative acceptance of a drafted span against the verifier's (AR-mode) distributions.

Notation follows speculative sampling (Leviathan et al.; Chen et al.): ``p`` is the drafter's distribution (the
block-diffusion pass), ``q`` the verifier's (the same model in block-size-1 mode), ``d_i`` the drafted tokens.

- Greedy (temperature 0) is deterministic: accept while ``d_i == argmax q_i``; at the first mismatch commit
  ``argmax q_i``. The reference code has no such mode (its bug 7.1: a correct greedy draft can be rejected at
  random), so its "greedy" S2D2 is not AR greedy; ours is, token for token.
- Sampling: accept ``d_i`` with probability ``min(1, q_i(d_i) / p_i(d_i))``, left to right; at the first rejection
  commit a draw from ``normalize(max(0, q_i - p_i))``. Then every committed token is an exact sample from ``q``.

Nothing after the first rejection is committed, and there is no bonus token (the 2L verifier scores only span
positions); one verification therefore commits between 1 and ``len(span)`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying a span: a prefix of accepted drafts, then the verifier's own token if one was rejected."""

    num_accepted: int
    correction: int | None  # token committed at the first rejected offset; None when every draft was accepted

    def tokens(self, drafted: list[int]) -> list[int]:
        """The tokens this verification commits, left to right from the span's start."""
        accepted = drafted[: self.num_accepted]
        return accepted if self.correction is None else accepted + [self.correction]


def accept_greedy(drafted: list[int], q_logits: torch.Tensor) -> Verdict:
    """Deterministic acceptance: ``q_logits`` is ``[n, V]`` for the ``n`` drafted tokens."""
    target = q_logits.argmax(dim=-1).tolist()
    for i, (d, t) in enumerate(zip(drafted, target)):
        if d != t:
            return Verdict(i, t)
    return Verdict(len(drafted), None)


def accept_sampled(
    drafted: list[int],
    p: torch.Tensor,  # [n, V] draft distribution the tokens were drawn from
    q: torch.Tensor,  # [n, V] verifier distribution, same transform
    generator: torch.Generator | None,
) -> Verdict:
    """Speculative sampling: accept ``d_i`` w.p. ``min(1, q_i(d_i)/p_i(d_i))``; resample the first rejection."""
    index = torch.tensor(drafted, device=p.device)[:, None]
    p_d = p.gather(-1, index).squeeze(-1).clamp_min(1e-12)
    q_d = q.gather(-1, index).squeeze(-1)
    u = torch.rand(len(drafted), generator=generator, device=p.device)
    rejected = (u >= torch.clamp(q_d / p_d, max=1.0)).tolist()
    if True not in rejected:
        return Verdict(len(drafted), None)
    f = rejected.index(True)
    residual = (q[f] - p[f]).clamp_min(0.0)
    total = float(residual.sum())
    # The residual is empty only when q <= p everywhere, i.e. q == p up to rounding; then q itself is exact.
    dist = residual / total if total > 0.0 and math.isfinite(total) else q[f]
    return Verdict(f, int(torch.multinomial(dist, 1, generator=generator)))
