"""Invariant 3 with power: sampled S2D2 that verifies every step draws exactly from the AR distribution, with
temperature != 1, top-k and top-p, over several blocks and with fused next-block drafts.

The model is a hand-built table (no network): the verifier's AR conditional q(x | prefix) depends on the last token
only (a Markov chain), and the drafter's p is a different table, so speculative acceptance really rejects and
resamples. The target is therefore exact, and the test counts transitions (previous token -> next token) over all
generated tokens: under the correct algorithm every committed token, given the one before it, is a draw from
q'(. | prev), the transformed verifier row (Anderson-Goodman: the pooled transition chi-square is chi-square
distributed). Counting transitions rather than whole sequences gives the test enough power to reject a planted
distortion of the draft distribution handed to acceptance (p^0.9, renormalised), which a whole-sequence test on a
real model with N = 1500 does not see; the last test shows that it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from scipy.stats import chi2

import s2d2.core.sampler
import s2d2.engine.runner
from s2d2.config import DecodeConfig
from s2d2.core.loop import decode_steps
from s2d2.core.requests import CommitRequest, FamilyTraits
from s2d2.core.sampling import Sampling, token_probs
from s2d2.engine.runner import drive, request_spec
from s2d2.models.cache import KVCache

pytestmark = pytest.mark.slow  # statistical: thousands of sampled decodes

V = 5  # real tokens 0..4
MASK = V  # the mask id; the vocabulary is V + 1
TEMPERATURE, TOP_K, TOP_P = 1.5, 4, 0.95
# Row a of the verifier is Q_LOGITS rolled by a; the drafter's rows are P_LOGITS rolled. Chosen (by a search over
# random tables) so that the p^0.9 distortion moves the accepted distribution as far as it can under this transform.
Q_LOGITS = torch.tensor([0.5, -2.1, -0.6, -3.0, 2.4])
P_LOGITS = torch.tensor([-0.6, -6.6, 0.2, 0.3, 3.3])
PROMPT = [1, 3, 0]
NUM_NEW, N = 6, 4000  # N = 4000: the p^0.9 distortion below is rejected at p ~ 1e-12


def _row(logits: torch.Tensor) -> torch.Tensor:
    return torch.cat((logits, torch.tensor([float("-inf")])))  # the mask is never a candidate


class TableAdapter:
    """A FamilyAdapter whose forwards read tables instead of running a network.

    draft: offset j of a block whose committed prefix ends with token c drafts from ``P_LOGITS`` rolled by
    ``c + j``; it is a function of the committed tokens only, so the next-block rows of a verification (given the
    span's drafts) equal the draft forward of the next block when every draft is accepted, as with a real model.
    verify: row i is the AR conditional of span position i given the prefix and the drafts before it.
    """

    mask_id = MASK
    stop_ids: tuple[int, ...] = ()
    max_positions = 1 << 16
    vocab_size = V + 1
    device = torch.device("cpu")
    shifted_logits = False
    blocks_from_prompt_end = False
    default_block_size = None
    default_sub_block_size = None

    def __init__(self) -> None:
        self.ids: list[int] | None = None

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(0, 1, 1, capacity)

    def _draft_rows(self, last: int, first: int, size: int) -> torch.Tensor:
        return torch.stack([_row(P_LOGITS.roll(last + j)) for j in range(first, first + size)])

    def draft(self, ids, cache, block_start, block_size, first_mask, *, cache_ver, draft_ver, num_blocks=1,
              cache_prefix=False):
        assert num_blocks == 1
        self.ids = ids
        # the pending tokens (with prefix caching, the block's committed prefix too) are now "cached"
        cache.commit(block_start + (first_mask if cache_prefix else 0) - cache.length)
        last = ids[block_start + first_mask - 1]
        rows = self._draft_rows(last, 0, block_size)
        return rows

    def verify(self, filled, cache, block_start, span_start, next_block=0):
        assert self.ids is not None and block_start <= cache.length <= span_start
        prefix = self.ids[:block_start] + list(filled)
        rows = [_row(Q_LOGITS.roll(prefix[p - 1])) for p in range(span_start, block_start + len(filled))]
        if next_block:
            rows += list(self._draft_rows(prefix[-1], 0, next_block))
        return torch.stack(rows)

    def commit(self, ids, cache, end, block_size, *, cache_ver):
        cache.commit(end - cache.length)

    # The loop's requests become specs (request_spec); here a spec just defers to the table forwards above.
    def draft_spec(self, ids, cache_len, block_start, block_size, first_mask, **kw):
        return _TableSpec(block_size, lambda cache: self.draft(ids, cache, block_start, block_size, first_mask, **kw))

    def verify_spec(self, filled, cache_len, block_start, span_start, next_block=0):
        return _TableSpec(len(filled), lambda cache: self.verify(filled, cache, block_start, span_start, next_block))

    def commit_spec(self, ids, cache_len, end, block_size, *, cache_ver):
        return _TableSpec(end - cache_len, lambda cache: self.commit(ids, cache, end, block_size, cache_ver=cache_ver))

    @property
    def traits(self) -> FamilyTraits:
        return FamilyTraits(self.mask_id, self.stop_ids, self.shifted_logits)


def decode(adapter: TableAdapter, prompt: list[int], cfg: DecodeConfig, cache: KVCache,
           generator: torch.Generator) -> tuple[list[int], str, object]:
    """The runner's single-row driver with the table forwards in place of a network: each request's spec computes
    its rows from the tables."""
    cache.reset()

    def forward(request):
        logits = request_spec(adapter, request, cache.length).compute(cache)
        return None if isinstance(request, CommitRequest) else logits

    return drive(decode_steps(prompt, cfg, cache, adapter.traits, generator), cache, forward, Sampling.of(cfg))


@dataclass(frozen=True)
class _TableSpec:
    """A stand-in for :class:`s2d2.models.batching.ForwardSpec`: its row count, and the table forward to run."""

    num_rows: int
    compute: Callable[[KVCache], torch.Tensor | None]


def target_row(prev: int) -> torch.Tensor:
    return token_probs(_row(Q_LOGITS.roll(prev))[None], TEMPERATURE, TOP_K, TOP_P)[0]


def transition_counts(block_size: int, seed: int = 0, redraft: float | None = None) -> torch.Tensor:
    adapter = TableAdapter()
    cfg = DecodeConfig(method="s2d2", policy="mask_span_length", min_span=1, block_size=block_size,
                       temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, max_new_tokens=NUM_NEW, stop_token_ids=(),
                       redraft=redraft)
    cache = adapter.new_cache(64)
    counts = torch.zeros(V + 1, V + 1, dtype=torch.long)
    fused = redrafts = 0
    for i in range(N):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        tokens, _, stats = decode(adapter, PROMPT, cfg, cache, gen)
        assert len(tokens) == NUM_NEW and stats.fallback_tokens == 0  # every token came from a verification
        fused += stats.fused_drafts
        redrafts += stats.redrafts
        seq = PROMPT[-1:] + tokens
        for a, b in zip(seq, seq[1:]):
            counts[a, b] += 1
    assert fused > 0 or block_size >= NUM_NEW + len(PROMPT), "the fused next-block draft path was exercised"
    assert redrafts > 0 or redraft is None, "the redraft path was exercised"
    return counts


def transition_pvalue(counts: torch.Tensor) -> float:
    """Pooled Pearson chi-square of each row's counts against the target row; a forbidden transition gives 0."""
    stat, df = 0.0, 0
    for prev in range(V):
        n = int(counts[prev].sum())
        if n == 0:
            continue
        q = target_row(prev)
        if int(counts[prev][q == 0].sum()) > 0:
            return 0.0  # a token the target never emits (cut by top-k / top-p, or the mask)
        support = (q > 0).nonzero().flatten()
        expected = n * q[support]
        stat += float(((counts[prev][support] - expected) ** 2 / expected).sum())
        df += len(support) - 1
    return float(chi2.sf(stat, df))


@pytest.mark.parametrize("block_size", [2, 4])
def test_sampled_s2d2_draws_the_transformed_ar_chain(block_size):
    assert transition_pvalue(transition_counts(block_size)) > 1e-3


def test_sampled_s2d2_with_redrafts_draws_the_transformed_ar_chain():
    """Redrafts (issue 32): the tokens drawn from the verifier's rows after a rejection, accepted against the next
    verification with those rows as p, keep the target distribution."""
    assert transition_pvalue(transition_counts(4, redraft=0.0)) > 1e-3


def test_acceptance_receives_the_distribution_the_drafts_were_drawn_from(monkeypatch):
    """Reference §8.4: p handed to acceptance must be exactly the distribution each draft token was sampled from."""
    drawn, handed = [], []
    real_draw, real_accept = s2d2.core.sampler.draw_tokens, s2d2.core.sampler.sampled_verdicts

    def draw(probs, u):
        drawn.append(probs.clone())
        return real_draw(probs, u)

    def accept(drafted, p, q, u, u_residual, relax):
        handed.append(p.clone())
        return real_accept(drafted, p, q, u, u_residual, relax)

    monkeypatch.setattr(s2d2.core.sampler, "draw_tokens", draw)
    monkeypatch.setattr(s2d2.core.sampler, "sampled_verdicts", accept)
    cfg = DecodeConfig(method="s2d2", policy="mask_span_length", min_span=1, block_size=4, temperature=TEMPERATURE,
                       top_k=TOP_K, top_p=TOP_P, max_new_tokens=NUM_NEW, stop_token_ids=(), fuse_draft=False)
    adapter = TableAdapter()
    decode(adapter, PROMPT, cfg, adapter.new_cache(64), torch.Generator().manual_seed(0))
    assert len(drawn) == len(handed) > 1  # without fused drafts, one draw per verification
    for probs, p in zip(drawn, handed):  # p is the span's rows of the step's draft distribution, bit for bit
        assert any(torch.equal(p, probs[i:i + len(p)]) for i in range(len(probs) - len(p) + 1))


def test_the_test_rejects_a_draft_distribution_distorted_as_p_to_the_0_9(monkeypatch):
    real = s2d2.core.sampler.sampled_verdicts

    def distorted(drafted, p, q, u, u_residual, relax):
        warped = p ** 0.9
        return real(drafted, warped / warped.sum(dim=-1, keepdim=True), q, u, u_residual, relax)

    monkeypatch.setattr(s2d2.core.sampler, "sampled_verdicts", distorted)
    assert transition_pvalue(transition_counts(2)) < 1e-4


def test_the_test_rejects_a_verifier_that_ignores_top_p(monkeypatch):
    real = s2d2.engine.runner.filtered_probs
    monkeypatch.setattr(s2d2.engine.runner, "filtered_probs",
                        lambda logits, rows: real(logits, [(replace(s, top_p=1.0), n) for s, n in rows]))
    assert transition_pvalue(transition_counts(2)) == 0.0
