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
from s2d2.core.sampling import draw_tokens, row_values, uniforms
from s2d2.transfer import to_device


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


def _typical(q: torch.Tensor, index: torch.Tensor, relax: Sequence[Relaxation], counts: Sequence[int]) -> torch.Tensor:
    """Medusa's typical acceptance test, per row: ``q(d) > min(epsilon, delta * exp(-H(q)))``, rows ``counts[i]``
    at a time with ``relax[i]`` (off where epsilon is 0)."""
    if all(r.typical_epsilon <= 0.0 for r in relax):
        return torch.zeros(len(index), dtype=torch.bool, device=q.device)
    entropy = -(q * q.clamp_min(1e-30).log()).sum(dim=-1)
    delta, epsilon = (row_values(values, counts, q) for values in (
        [r.typical_delta for r in relax], [r.typical_epsilon for r in relax]))
    epsilon = torch.as_tensor(epsilon, dtype=q.dtype, device=q.device)
    typical = q.gather(-1, index).squeeze(-1) > torch.minimum(delta * torch.exp(-entropy), epsilon)
    return typical & (epsilon > 0.0)


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
        accepted = ((target == index.squeeze(-1)) | _typical(q, index, [relax], [len(drafted)])).tolist()
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


def sampled_verdicts(drafted: Sequence[list[int]], p: torch.Tensor, q: torch.Tensor, u: torch.Tensor,
                     u_residual: torch.Tensor, relax: Sequence[Relaxation | None]) -> torch.Tensor:
    """Speculative sampling of several spans at once, on the device, without reading anything back: span ``s``
    accepts ``d_i`` w.p. ``min(1, q_i(d_i)/p_i(d_i))`` left to right and draws the first rejection's correction from
    the residual ``(q - p)+``. With ``relax[s]``: the ratio raised to ``ratio_tempering``, typical acceptance as a
    second way in (the ratio threshold reads the ratios on the host).

    ``drafted``: each span's tokens; ``p`` (draft), ``q`` (verifier): ``[M, V]``, the spans' rows one after the
    other; ``u``: ``[M]`` uniforms for the acceptance tests, ``u_residual``: ``[S]``, one per span for its
    correction, drawn whether or not a draft is rejected (and dropped when none is), so that a row's random stream
    never depends on a host read. Returns ``[first rejected offset (n: none), correction]`` per span, then every
    span's ratios, as one float64 vector: :func:`read_verdicts` splits it on the host. One set of operations for
    all spans of an engine step (issue 28)."""
    lengths = [len(d) for d in drafted]
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    host = ([t for d in drafted for t in d] + [s for s, n in enumerate(lengths) for _ in range(n)]
            + [i for n in lengths for i in range(n)] + lengths + starts)
    tokens, span, offset, length, start = to_device(host, torch.long, p.device).split(
        [sum(lengths)] * 3 + [len(lengths)] * 2)
    index = tokens[:, None]
    p_d = p.gather(-1, index).squeeze(-1).clamp_min(1e-12)
    q_d = q.gather(-1, index).squeeze(-1)
    ratio = torch.clamp(q_d / p_d, max=1.0)
    neutral = [r is None or r.neutral for r in relax]
    if all(neutral):
        rejected = u >= ratio
    else:
        relax = [Relaxation() if n else r for r, n in zip(relax, neutral)]
        ratio = ratio ** row_values([r.ratio_tempering for r in relax], lengths, ratio)
        rejected = (u >= ratio) & ~_typical(q, index, relax, lengths)
    # each span's first rejected offset (its length when none was rejected)
    first = length.scatter_reduce(0, span, torch.where(rejected, offset, length[span]), "amin")
    at = start + first.clamp(max=length - 1)
    q_f = q.index_select(0, at)
    residual = (q_f - p.index_select(0, at)).clamp_min(0.0)
    total = residual.sum(dim=-1, keepdim=True)
    # The residual is empty only when q <= p everywhere, i.e. q == p up to rounding; then q itself is exact.
    dist = torch.where((total > 0.0) & total.isfinite(), residual / total, q_f)
    correction = draw_tokens(dist, u_residual)
    return torch.cat([torch.stack([first, correction], dim=-1).flatten().double(), ratio.double()])


def read_verdicts(values: Sequence[float], drafted: Sequence[list[int]],
                  relax: Sequence[Relaxation | None]) -> list[Verdict]:
    """The :class:`Verdict` of each span of a :func:`sampled_verdicts` read to the host."""
    ratios = len(drafted) * 2
    verdicts = []
    for s, (d, r) in enumerate(zip(drafted, relax)):
        verdicts.append(read_sampled_verdict([values[2 * s], values[2 * s + 1]] + list(values[ratios:ratios + len(d)]),
                                             d, r))
        ratios += len(d)
    return verdicts


def read_sampled_verdict(values: Sequence[float], drafted: list[int], relax: Relaxation | None = None) -> Verdict:
    """The :class:`Verdict` of one span of :func:`sampled_verdicts` (``[first, correction, its ratios]``) read to the
    host."""
    first = int(values[0])
    if first == len(drafted):
        return Verdict(first, None)
    extra = _thresholded(values[2:], drafted, first, relax) if relax is not None and not relax.neutral else ()
    return Verdict(first, int(values[1]), extra)


def accept_sampled(drafted: list[int], p: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None,
                   relax: Relaxation | None = None) -> Verdict:
    """One span's :func:`sampled_verdicts`, its ``len(drafted) + 1`` uniforms drawn from ``generator`` in one call,
    read to the host at once (an engine batches the spans of a step and their reads)."""
    u = uniforms(len(drafted) + 1, generator, p.device)
    values = sampled_verdicts([drafted], p, q, u[:-1], u[-1:], [relax]).tolist()
    return read_sampled_verdict(values, drafted, relax)
