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

**Relaxed acceptance** (:class:`Relaxation`, off by default; docs/decoding.md "Relaxed acceptance") trades exactness
for longer accepted runs:

- *typical acceptance* (Medusa, Cai et al. 2024, §2.3.1): a draft is also accepted when the verifier gives it
  probability above ``min(epsilon, delta * exp(-H(q_i)))``, H the entropy of ``q_i`` (greedy and sampled);
- *ratio tempering* (the reference's ``ssd_ratio_tempering_factor``, sampled only): the acceptance probability is
  ``min(1, (q_i(d_i) / p_i(d_i)) ** gamma)``;
- *ratio threshold* (the reference's ``ssd_ratio_threshold``): after the first rejection, every later span draft
  whose ratio is at least the threshold is committed too; the ratio is ``min(1, (q/p) ** gamma)`` when sampling and
  ``q_i(d_i) / max q_i`` when greedy.

With neutral values the exact functions run unchanged, so the output is bit-identical to exact acceptance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from s2d2.config import Relaxation


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying a span: a prefix of accepted drafts, then the verifier's own token if one was rejected."""

    num_accepted: int
    correction: int | None  # token committed at the first rejected offset; None when every draft was accepted
    # relaxed acceptance (ratio threshold): (offset in the span, draft token) committed after the first rejection
    extra: tuple[tuple[int, int], ...] = ()

    def tokens(self, drafted: list[int]) -> list[int]:
        """The tokens this verification commits, left to right from the span's start."""
        accepted = drafted[: self.num_accepted]
        return accepted if self.correction is None else accepted + [self.correction]


def _typical(q: torch.Tensor, index: torch.Tensor, relax: Relaxation) -> torch.Tensor:
    """Medusa's typical acceptance test, per row: ``q(d) > min(epsilon, delta * exp(-H(q)))``."""
    if relax.typical_epsilon <= 0.0:
        return torch.zeros(len(index), dtype=torch.bool, device=q.device)
    entropy = -(q * q.clamp_min(1e-30).log()).sum(dim=-1)
    bound = torch.clamp(relax.typical_delta * torch.exp(-entropy), max=relax.typical_epsilon)
    return q.gather(-1, index).squeeze(-1) > bound


def _thresholded(ratio: Sequence[float], drafted: list[int], first: int,
                 relax: Relaxation) -> tuple[tuple[int, int], ...]:
    """The later drafts (after the first rejection ``first``) whose ratio reaches the threshold."""
    if relax.ratio_threshold is None:
        return ()
    return tuple((j, drafted[j]) for j in range(first + 1, len(drafted)) if float(ratio[j]) >= relax.ratio_threshold)


def accept_greedy(drafted: list[int], q_logits: torch.Tensor, relax: Relaxation | None = None,
                  argmax: Sequence[int] | None = None) -> Verdict:
    """Deterministic acceptance: ``q_logits`` is ``[n, V]`` for the ``n`` drafted tokens (``argmax``: their argmax,
    when the executor has it on the host already). With ``relax``, a draft that is not the argmax is also accepted
    when typical acceptance allows it, and after the first rejection drafts with ``q(d) / max q`` at or above the
    ratio threshold are committed too."""
    if relax is not None and not relax.neutral:
        q = torch.softmax(q_logits.float(), dim=-1)
        index = torch.tensor(drafted, device=q.device)[:, None]
        top, target = q.max(dim=-1)
        accepted = ((target == index.squeeze(-1)) | _typical(q, index, relax)).tolist()
        if False not in accepted:
            return Verdict(len(drafted), None)
        f = accepted.index(False)
        ratio = q.gather(-1, index).squeeze(-1) / top
        return Verdict(f, int(target[f]), _thresholded(ratio, drafted, f, relax))
    target = list(argmax) if argmax is not None else q_logits.argmax(dim=-1).tolist()
    for i, (d, t) in enumerate(zip(drafted, target)):
        if d != t:
            return Verdict(i, t)
    return Verdict(len(drafted), None)


def sampled_verdict(
    drafted: list[int],
    p: torch.Tensor,  # [n, V] draft distribution the tokens were drawn from
    q: torch.Tensor,  # [n, V] verifier distribution, same transform
    generator: torch.Generator | None,
    relax: Relaxation | None = None,
) -> torch.Tensor:
    """Speculative sampling on the device, without reading anything back: accept ``d_i`` w.p.
    ``min(1, q_i(d_i)/p_i(d_i))``, resample the first rejection from the residual. With ``relax``: the ratio raised
    to ``ratio_tempering``, typical acceptance as a second way in (the ratio threshold reads the ratios on the host).

    Returns ``[first rejected offset (n: none), correction, ratio_0 .. ratio_{n-1}]`` as float64, for
    :func:`read_sampled_verdict` once on the host; an engine reads every row's at once (one transfer per step). The
    generator gives ``n`` uniforms, then one residual draw, every time: the draw is made before anyone knows whether
    a draft was rejected, and is dropped when none was, so a row's stream never depends on a host read."""
    n = len(drafted)
    index = torch.tensor(drafted, device=p.device)[:, None]
    p_d = p.gather(-1, index).squeeze(-1).clamp_min(1e-12)
    q_d = q.gather(-1, index).squeeze(-1)
    u = torch.rand(n, generator=generator, device=p.device)
    ratio = torch.clamp(q_d / p_d, max=1.0)
    if relax is not None and not relax.neutral:
        ratio = ratio ** relax.ratio_tempering
        rejected = (u >= ratio) & ~_typical(q, index, relax)
    else:
        rejected = u >= ratio
    # the first rejected offset (argmax returns the first maximum), n when none was rejected
    first = torch.where(rejected.any(), rejected.to(torch.uint8).argmax(), n)
    at = first.clamp(max=n - 1).view(1)
    q_f = q.index_select(0, at)[0]
    residual = (q_f - p.index_select(0, at)[0]).clamp_min(0.0)
    total = residual.sum()
    # The residual is empty only when q <= p everywhere, i.e. q == p up to rounding; then q itself is exact.
    dist = torch.where((total > 0.0) & total.isfinite(), residual / total, q_f)
    correction = torch.multinomial(dist, 1, generator=generator)
    return torch.cat([first.view(1).double(), correction.double(), ratio.double()])


def read_sampled_verdict(values: Sequence[float], drafted: list[int], relax: Relaxation | None = None) -> Verdict:
    """The :class:`Verdict` of a :func:`sampled_verdict` read to the host."""
    first = int(values[0])
    if first == len(drafted):
        return Verdict(first, None)
    extra = _thresholded(values[2:], drafted, first, relax) if relax is not None and not relax.neutral else ()
    return Verdict(first, int(values[1]), extra)


def accept_sampled(drafted: list[int], p: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None,
                   relax: Relaxation | None = None) -> Verdict:
    """:func:`sampled_verdict`, read to the host at once (one row's verification; an engine batches the reads)."""
    return read_sampled_verdict(sampled_verdict(drafted, p, q, generator, relax).tolist(), drafted, relax)
