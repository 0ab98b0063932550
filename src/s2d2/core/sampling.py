"""From logits to token distributions and choices.

One transform is used for the drafter's p and the verifier's q, so that speculative acceptance with
``min(1, q/p)`` and the residual ``(q - p)+`` preserves the verifier's distribution (reference §8.4: p must be the
distribution the draft was actually sampled from). At temperature 0 the choice is the argmax, and the reported
distribution is the plain softmax (temperature 1, no top-k/top-p): that is the model's own confidence, which the
confidence threshold and the acceptance estimators read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def transform_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p filtering; filtered entries become -inf. ``logits``: ``[n, V]``."""
    if temperature > 0.0 and temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def token_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a token is drawn from (float32, ``[n, V]``); plain softmax when greedy."""
    if temperature == 0.0:
        return torch.softmax(logits.float(), dim=-1)
    return torch.softmax(transform_logits(logits.float(), temperature, top_k, top_p), dim=-1)


@dataclass(frozen=True)
class Choices:
    """Rows of token distributions as the per-row algorithm reads them, on the host: the token chosen at each row and
    what the confidence threshold and the acceptance estimators read of its distribution. :func:`describe` builds
    them with one device-to-host transfer for any number of rows, so that a batch of rows costs one transfer per
    forward, not a few per row (issue 28). The features only the routing policies read (entropy, margin,
    collision) are None when the executor was told no row needs them; reading them then fails loudly."""

    tokens: tuple[int, ...]
    confidence: tuple[float, ...]  # the chosen token's probability
    entropy: tuple[float, ...] | None = None  # Shannon entropy / ln V (V the full vocabulary, as in the reference)
    margin: tuple[float, ...] | None = None  # top-1 minus top-2 probability
    collision: tuple[float, ...] | None = None  # sum_v p_v^2 (exp of minus the Renyi-2 entropy)

    def __len__(self) -> int:
        return len(self.tokens)

    def _map(self, f: Callable[[tuple], tuple]) -> Choices:
        return Choices(*(None if column is None else f(column) for column in (
            self.tokens, self.confidence, self.entropy, self.margin, self.collision)))

    def rows(self, start: int, stop: int | None = None) -> Choices:
        """Rows ``start .. stop - 1``."""
        return self._map(lambda column: column[start:stop])

    def with_rows(self, start: int, other: Choices) -> Choices:
        """These rows with rows ``start .. start + len(other) - 1`` replaced by ``other``'s (a column either lacks is
        None)."""
        def column(mine: tuple | None, theirs: tuple | None) -> tuple | None:
            if mine is None or theirs is None:
                return None
            return mine[:start] + theirs + mine[start + len(theirs):]

        return Choices(*(column(getattr(self, f), getattr(other, f))
                         for f in ("tokens", "confidence", "entropy", "margin", "collision")))

    def pad_front(self, count: int) -> Choices:
        """``count`` copies of the first row before the rows (placeholder rows nobody reads, as logits get them)."""
        return self._map(lambda column: column[:1] * count + column)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row divided by ln(V); ``[n, V] -> [n]``."""
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)
    return entropy / math.log(probs.shape[-1])


def choice_table(probs: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor | None = None,
                 features: bool = True) -> torch.Tensor:
    """The :class:`Choices` of ``probs`` (``[n, V]``) with ``tokens`` (``[n]``) chosen, still on the device: an
    ``[n, 2]`` float64 table (token, confidence), ``[n, 5]`` with ``features`` (entropy, margin, collision too);
    float64 holds token ids and float32 values exactly. ``confidence``: the tokens' probabilities, when not those of
    ``probs``. :func:`read_choices` turns the table, once on the host, into :class:`Choices`."""
    if confidence is None:
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    columns = [tokens.to(torch.float64), confidence.double()]
    if features:
        top2 = torch.topk(probs, 2, dim=-1).values
        columns += [normalized_entropy(probs).double(), (top2[:, 0] - top2[:, 1]).double(),
                    probs.square().sum(dim=-1).double()]
    return torch.stack(columns, dim=-1)


def read_choices(values: Sequence[float], features: bool) -> Choices:
    """The :class:`Choices` of a :func:`choice_table` read to the host as one flat sequence (row after row)."""
    width = 5 if features else 2
    columns = [tuple(values[c::width]) for c in range(width)]
    return Choices(tuple(int(t) for t in columns[0]), *columns[1:])


def describe(probs: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor | None = None,
             features: bool = True) -> Choices:
    """The :class:`Choices` of ``probs`` with ``tokens`` chosen (:func:`choice_table`), read to the host at once:
    one transfer for any number of rows."""
    return read_choices(choice_table(probs, tokens, confidence, features).flatten().tolist(), features)


def greedy_table(logits: torch.Tensor, features: bool = True) -> torch.Tensor:
    """The :func:`choice_table` of each logit row's argmax under the plain softmax (what greedy decoding reads;
    ``features``: also what the routing policies read), on the device."""
    probs = torch.softmax(logits.float(), dim=-1)
    confidence, tokens = probs.max(dim=-1)
    return choice_table(probs, tokens, confidence, features)


def greedy_choices(logits: torch.Tensor, features: bool = True) -> Choices:
    """:func:`greedy_table` read to the host (one transfer)."""
    return read_choices(greedy_table(logits, features).flatten().tolist(), features)


def choose_tokens(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Argmax (greedy) or one multinomial draw per row; returns ``[n]`` int64."""
    if greedy:
        return probs.argmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def row_seed(seed: int, row: int, choice: int = 0) -> int:
    """The seed of prompt ``row``'s sampled choice ``choice`` under a request seeded with ``seed``.

    Prompt ``row`` (choice 0) draws from ``seed + row``, the documented batch contract (data-parallel shards shift
    the seed by their first row). Further choices of one prompt (the server's ``n``) get seeds scattered by a
    SplitMix64 step, so that choice 1 of seed 1 is not choice 0 of seed 2, as ``seed + k`` would make it. Every
    value wraps modulo 2**64, the generator's range."""
    base = (seed + row) % 2**64
    if choice == 0:
        return base
    z = (base + choice * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)
