"""From logits to token distributions and choices.

One transform is used for the drafter's p and the verifier's q, so that speculative acceptance with
``min(1, q/p)`` and the residual ``(q - p)+`` preserves the verifier's distribution (reference §8.4: p must be the
distribution the draft was actually sampled from). At temperature 0 the choice is the argmax, and the reported
distribution is the plain softmax (temperature 1, no top-k/top-p): that is the model's own confidence, which the
confidence threshold and the acceptance estimators read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from s2d2.config import DecodeConfig
from s2d2.transfer import to_device


@dataclass(frozen=True)
class Sampling:
    """How a sampled row turns logits into the distribution it draws from: temperature (> 0), then top-k (0: off),
    then top-p (1: off)."""

    temperature: float
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def of(cls, cfg: DecodeConfig) -> Sampling | None:
        """A config's sampling, None when it decodes greedily."""
        return None if cfg.greedy else cls(float(cfg.temperature), int(cfg.top_k), float(cfg.top_p))


def row_values(values: list[float], counts: list[int], like: torch.Tensor) -> float | torch.Tensor:
    """``values[i]`` for ``counts[i]`` rows each: a number when every value is the same (no tensor, no transfer),
    else an ``[n]`` vector of ``like``'s dtype and device, built with one host-to-device copy."""
    if all(v == values[0] for v in values):
        return float(values[0])
    return to_device(torch.tensor(values, dtype=like.dtype).repeat_interleave(torch.tensor(counts)), like.dtype,
                     like.device)


def _column(values: float | torch.Tensor) -> float | torch.Tensor:
    """A :func:`row_values` result broadcast against ``[n, V]`` rows."""
    return values[:, None] if isinstance(values, torch.Tensor) else values


def filter_logits(logits: torch.Tensor, rows: Sequence[tuple[Sampling, int]]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, each row with its own values; filtered entries become -inf.
    ``logits``: ``[n, V]``; ``rows``: ``(sampling, count)`` runs covering the ``n`` rows in order (a batch's rows,
    each with its request's sampling). One set of operations for all rows, whatever their values (issue 28).

    A row's result does not depend on the rows beside it (batched == batch 1): top-p reads each row's
    probabilities in the original order, gathered into descending order, so the sort (every row's whole vocabulary)
    and the top-k candidates (when every row that cuts by top-p also cuts by top-k: the only tokens left) give the
    same cumulative sums; a row with a smaller top-k than the batch's largest has zeros after its own."""
    vocab = logits.shape[-1]
    params, counts = [s for s, _ in rows], [c for _, c in rows]
    temperature = _column(row_values([s.temperature if s.temperature > 0.0 else 1.0 for s in params], counts,
                                      logits))
    if not (isinstance(temperature, float) and temperature == 1.0):
        logits = logits / temperature
    ks = [s.top_k if 0 < s.top_k < vocab else 0 for s in params]
    order = None
    if max(ks) > 0:
        top = torch.topk(logits, max(ks), dim=-1)
        kth = _column(row_values([float(k) for k in ks], counts, logits))
        if not isinstance(kth, torch.Tensor):
            bound = top.values[:, -1:]
        else:  # each row's own k-th value; a row without top-k keeps everything
            index = (kth.long() - 1).clamp_min(0)
            bound = top.values.gather(-1, index).masked_fill(kth == 0, float("-inf"))
        logits = logits.masked_fill(logits < bound, float("-inf"))
        order = top.indices  # every token a row keeps is among them, in descending order
    if any(s.top_p < 1.0 for s in params):
        if any(s.top_p < 1.0 and k == 0 for s, k in zip(params, ks)):
            order = torch.sort(logits, dim=-1, descending=True).indices
        sorted_probs = torch.softmax(logits, dim=-1).gather(-1, order)
        top_p = _column(row_values([s.top_p if s.top_p < 1.0 else math.inf for s in params], counts, logits))
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# Bytes of temporary work per row and vocabulary entry: the filter's (scaled and masked copies, the sort's values and
# indices, sorted probabilities and their sums, masks) and an inverse-CDF draw's (float64 copy and sums).
FILTER_BYTES, DRAW_BYTES = 32, 16
# What s2d2.engine.memory.row_bytes reserves per logit row and vocabulary entry for the numerical stage (two float32
# arrays), and the least a chunk may take: the stage works through a step's rows in chunks within that.
STAGE_BYTES, MIN_CHUNK_BYTES = 8, 256 * 2**20


def row_chunks(n: int, vocab: int, bytes_per_entry: int) -> list[tuple[int, int]]:
    """The ranges of ``n`` rows that the numerical stage works through one after the other, so that its temporaries
    (``bytes_per_entry`` per row and vocabulary entry) stay within what the memory planner reserved for it (or
    ``MIN_CHUNK_BYTES``): one range for a small vocabulary or batch; at 151,936 entries (SDAR) a few per step, each
    still one set of operations over many rows. Every operation is row by row, so chunks change no value."""
    size = max(1, max(n * vocab * STAGE_BYTES, MIN_CHUNK_BYTES) // (vocab * bytes_per_entry))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _cut(rows: Sequence[tuple[Sampling, int]], start: int, stop: int) -> list[tuple[Sampling, int]]:
    """The ``(sampling, count)`` runs of rows ``start .. stop - 1``."""
    out, at = [], 0
    for sampling, count in rows:
        lo, hi = max(at, start), min(at + count, stop)
        if lo < hi:
            out.append((sampling, hi - lo))
        at += count
    return out


def filtered_probs(logits: torch.Tensor, rows: Sequence[tuple[Sampling, int]]) -> torch.Tensor:
    """The distributions sampled rows draw from (float32, ``[n, V]``): softmax of :func:`filter_logits`, in
    :func:`row_chunks`. What an executor hands every sampled row of a step at once (``Scored.probs``)."""
    chunks = row_chunks(*logits.shape, FILTER_BYTES)
    if len(chunks) == 1:
        return torch.softmax(filter_logits(logits.float(), rows), dim=-1)
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for a, b in chunks:
        out[a:b] = torch.softmax(filter_logits(logits[a:b].float(), _cut(rows, a, b)), dim=-1)
    return out


def transform_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """:func:`filter_logits` with one sampling for every row of ``logits`` (``[n, V]``)."""
    return filter_logits(logits, [(Sampling(temperature, top_k, top_p), len(logits))])


def token_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a token is drawn from (float32, ``[n, V]``); plain softmax when greedy."""
    if temperature == 0.0:
        return torch.softmax(logits.float(), dim=-1)
    return filtered_probs(logits, [(Sampling(temperature, top_k, top_p), len(logits))])


@dataclass(frozen=True)
class Choices:
    """Rows of token distributions as the per-row algorithm reads them, on the host: the token chosen at each row and
    what the confidence threshold and the acceptance estimators read of its distribution. :func:`describe` builds
    them with one device-to-host transfer for any number of rows, so that a batch of rows costs one transfer per
    forward, not a few per row (issue 28). Each of the features only the routing policies read (entropy, margin,
    collision: :data:`FEATURES`) is None when the executor was told no row needs it; reading it then fails loudly."""

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
        if self.entropy is self.margin is self.collision is None:  # (every row, every forward: built directly)
            return Choices(self.tokens[start:stop], self.confidence[start:stop])
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
        if not count:
            return self
        return self._map(lambda column: column[:1] * count + column)


# the distribution features the acceptance estimators and the UCB policy may read, in a choice table's column order
FEATURES = ("entropy", "margin", "collision")


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each row divided by ln(V); ``[n, V] -> [n]``."""
    # p * log p with log 0 = -inf clamped to the lowest float (0 * that = 0): the same values as torch.special.xlogy
    # up to rounding, at a third of its cost on a CPU (xlogy's kernel is slow there; this runs over every logit row)
    entropy = -(probs * probs.log().clamp_min(torch.finfo(probs.dtype).min)).sum(dim=-1)
    return entropy / math.log(probs.shape[-1])


def choice_table(probs: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor | None = None,
                 features: Collection[str] = FEATURES) -> torch.Tensor:
    """The :class:`Choices` of ``probs`` (``[n, V]``) with ``tokens`` (``[n]``) chosen, still on the device: an
    ``[n, 2 + len(features)]`` float64 table (token, confidence, then the ``features`` asked for, in
    :data:`FEATURES` order); float64 holds token ids and float32 values exactly. ``confidence``: the tokens'
    probabilities, when not those of ``probs``. :func:`read_choices` turns the table, once on the host, into
    :class:`Choices`. Each feature is a pass over the whole vocabulary of every row, so only those asked for are
    computed."""
    if confidence is None:
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    columns = [tokens.to(torch.float64), confidence.double()]
    for name in (f for f in FEATURES if f in features):
        if name == "entropy":
            columns.append(normalized_entropy(probs).double())
        elif name == "margin":
            top2 = torch.topk(probs, 2, dim=-1).values
            columns.append((top2[:, 0] - top2[:, 1]).double())
        else:
            columns.append(probs.square().sum(dim=-1).double())
    return torch.stack(columns, dim=-1)


def read_choices(values: Sequence[float], features: Collection[str]) -> Choices:
    """The :class:`Choices` of a :func:`choice_table` (computed with ``features``) read to the host as one flat
    sequence (row after row)."""
    names = [f for f in FEATURES if f in features]
    width = 2 + len(names)
    columns = [tuple(values[c::width]) for c in range(width)]
    return Choices(tuple(int(t) for t in columns[0]), columns[1], **dict(zip(names, columns[2:])))


def describe(probs: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor | None = None,
             features: Collection[str] = FEATURES) -> Choices:
    """The :class:`Choices` of ``probs`` with ``tokens`` chosen (:func:`choice_table`), read to the host at once:
    one transfer for any number of rows."""
    return read_choices(choice_table(probs, tokens, confidence, features).flatten().tolist(), features)


def greedy_table(logits: torch.Tensor, features: Collection[str] = FEATURES) -> torch.Tensor:
    """The :func:`choice_table` of each logit row's argmax under the plain softmax (what greedy decoding reads;
    ``features``: also what the routing policies read), on the device."""
    probs = torch.softmax(logits.float(), dim=-1)
    confidence, tokens = probs.max(dim=-1)
    return choice_table(probs, tokens, confidence, features)


def greedy_choices(logits: torch.Tensor, features: Collection[str] = FEATURES) -> Choices:
    """:func:`greedy_table` read to the host (one transfer)."""
    return read_choices(greedy_table(logits, features).flatten().tolist(), features)


def uniforms(count: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``count`` uniforms in [0, 1) from a row's generator, in one call: every random number a sampled row's
    forward needs (its draws, its acceptance tests) comes from one such call, so that its stream depends on its
    seed and its own path only, whatever shares its batch."""
    return torch.rand(count, generator=generator, dtype=torch.float64, device=device)


def draw_tokens(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (``[n, V]``, rows summing to about 1) by inverting its cumulative
    distribution at ``u`` (``[n]`` uniforms in [0, 1)): the first token whose cumulative probability exceeds
    ``u`` times the row's total. Sums in float64, so a token of probability 0 is never drawn and the rest are drawn
    with their probability up to float64 rounding, for any number of rows at once (in :func:`row_chunks`). Returns
    ``[n]`` int64."""
    chunks = row_chunks(*probs.shape, DRAW_BYTES)
    if len(chunks) > 1:
        tokens = torch.empty(len(probs), dtype=torch.long, device=probs.device)
        for a, b in chunks:
            tokens[a:b] = draw_tokens(probs[a:b], u[a:b])
        return tokens
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1]
    # below the total even where u * total rounds up to it: the last token drawn is the last of probability > 0
    at = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, at[:, None], right=True).squeeze(-1)


def choose_tokens(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Argmax (greedy) or one draw per row (:func:`draw_tokens`); returns ``[n]`` int64."""
    if greedy:
        return probs.argmax(dim=-1)
    return draw_tokens(probs, uniforms(len(probs), generator, probs.device))


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
