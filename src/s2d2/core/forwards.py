"""A row's forwards as requests: each method builds one request, counts it, and turns its logits into a draft or a
verdict (:mod:`s2d2.core.loop` decides which to ask for and what to commit)."""

from __future__ import annotations

import math
from collections.abc import Generator, Iterable

import torch

from s2d2.config import DecodeConfig
from s2d2.core import routing, strategies
from s2d2.core.requests import (
    CacheView,
    Carried,
    CommitRequest,
    DraftRequest,
    FinalizeRequest,
    HostRead,
    KeepRows,
    RowInput,
    RowRequest,
    Scored,
    VerifyRequest,
)
from s2d2.core.sampler import Accept, Draw
from s2d2.core.sampling import uniforms
from s2d2.core.state import BlockState, Draft, Sequence, Span
from s2d2.core.stats import DecodeStats
from s2d2.core.trace import Tracer
from s2d2.core.verify import Verdict, accept_greedy


def _confident_rest(masked: Iterable[int], commits: dict[int, int], draft: Draft, threshold: float) -> dict[int, int]:
    """``commit_confident``: the masks a verification left whose drafts clear ``threshold`` (the dynamic rule's
    commits, without its quota), to commit beside the verdict."""
    candidates = [i for i in masked if i not in commits]
    return {i: draft.tokens[i] for i in strategies.select_dynamic(candidates, draft.confidence, 0, threshold)}


def _all_accepted_estimate(draft: Draft, span: Span) -> float:
    """The drafter's own estimate that verification accepts every draft of ``span``: the product of their
    confidences (``fuse_draft_threshold`` compares it)."""
    return math.prod(draft.confidence[span.start:span.end])


class Forwards:
    """The row's forwards as requests: builds each one, counts it, and turns its logits into a draft or a verdict."""

    def __init__(self, cache: CacheView, cfg: DecodeConfig, stats: DecodeStats, shifted_logits: bool = False,
                 tracer: Tracer | None = None) -> None:
        self.cache, self.cfg, self.stats, self.shifted, self.tracer = cache, cfg, stats, shifted_logits, tracer
        self.relax = cfg.relaxation()  # neutral: the acceptance functions run their exact rule
        self._features = routing.reads_features(cfg, tracer is not None)  # what a sampled draft must describe
        # a block's K/V may enter the cache early only if no edit can change it afterwards
        self._fuse_draft = (cfg.fuse_draft and cfg.cache_ver and cfg.fuse_commit and cfg.editing_threshold is None
                            and cfg.block_add_threshold is None)
        # Prefix caching: with the AR-consistent cache a committed token's causal K/V depend only on the tokens to
        # its left, so once the block's left-most committed run grows they are final. Drafts (draft_ver: those rows
        # are causal) and verifications (their first half is causal) compute them anyway and keep them.
        # (Like fuse_commit, whose cost model it extends: without it, as in the reference, K/V get forwards of their
        # own.)
        self._cache_prefix = (cfg.prefix_cache and cfg.cache_ver and cfg.draft_ver and cfg.fuse_commit
                              and cfg.editing_threshold is None)

    def _trace_forward(self, kind: str) -> None:
        if self.tracer is not None:
            self.tracer.forward(kind)

    def _count_cache_write(self) -> None:
        """Count a forward of its own that writes committed K/V: the prompt's (prefill) or a finished block's."""
        if self.cache.length == 0:
            self.stats.prefill_forwards += 1
        else:
            self.stats.commit_forwards += 1

    def open_block(self, seq: Sequence, block: BlockState, generator: torch.Generator | None,
                   carried: Carried | None = None) -> Generator[RowRequest, RowInput, int]:
        """Shifted logits: the block's first token, decoded in AR mode from the row before it (drawn with the
        decoding temperature). That row is ``carried`` from the verification that finished the previous block, or
        comes from a forward writing the previous block (or the prompt) to the cache and predicting from its last
        row."""
        cfg = self.cfg
        if carried is not None and carried.token and carried.block_start == block.start:
            self.stats.fused_drafts += 1
            self._trace_forward("fused_token")
            return carried.draft.tokens[0]  # drawn by the verification that computed the row
        self._count_cache_write()
        self._trace_forward("finalize")
        scored = yield FinalizeRequest(seq.tokens, block.start, cfg.block_size, cfg.cache_ver)
        if cfg.greedy:
            return scored.choices.tokens[0]
        (drawn,) = yield HostRead((Draw(scored.probs[:1], uniforms(1, generator, scored.probs.device)),))
        return drawn.tokens[0]

    def draft(self, seq: Sequence, block: BlockState, generator: torch.Generator | None, num_blocks: int = 1,
              carried: Carried | None = None) -> Generator[RowRequest, RowInput, Draft]:
        """One diffusion-mode forward over the block (or the ``num_blocks`` blocks in flight that ``block`` spans);
        tokens drawn at every offset. A draft ``carried`` from the verification that finished the previous block or
        sub-block takes the forward's place when it is this draft.

        The forward first writes the pending K/V (prompt or previous blocks); without ``fuse_commit`` they get a
        forward of their own instead, as in the reference code.
        """
        cfg = self.cfg
        if (carried is not None and not carried.token
                and (carried.block_start, carried.first_mask) == (block.start, block.first_mask)):
            if carried.redraft:  # the verifier's rows after the last step's rejection
                self.stats.redrafts += 1
                self._trace_forward("redraft")
            else:  # drafted by the verify forward that finished the previous block or sub-block
                self.stats.fused_drafts += 1
                self._trace_forward("fused_draft")
            return carried.draft
        if not cfg.fuse_commit and self.cache.length < block.start:
            self._count_cache_write()
            self._trace_forward("commit")
            yield CommitRequest(seq.tokens, block.start, cfg.block_size, cfg.cache_ver)
        self._trace_forward("draft")
        scored = yield DraftRequest(seq.tokens, block.start, block.size // num_blocks, block.first_mask,
                                    cfg.cache_ver, cfg.draft_ver, num_blocks, self._cache_prefix)
        self.stats.draft_forwards += 1
        if cfg.greedy:  # the executor's choices are the draft: argmax of the plain softmax
            return Draft(scored.choices)
        # sampled: a token drawn from each of this row's distributions, by the step's sampler (docs/decoding.md)
        (drawn,) = yield HostRead((self._draw(scored.probs, uniforms(len(scored.probs), generator,
                                                                      scored.probs.device)),))
        return Draft(drawn, scored.probs)

    def _draw(self, probs: torch.Tensor, u: torch.Tensor) -> Draw:
        """A sampled draft's draws from ``probs`` at ``u``, described by the routing features when routing reads
        them."""
        return Draw(probs, u, self._features)

    def _redraft(self, verdict: Verdict, span: Span, redraft: Draft | None) -> bool:
        """Whether a verification's rows after its rejection (``redraft``: their draft, None when the setting is
        off) become the next draft (``DecodeConfig.redraft``):
        offsets are left in the span after the correction, and the first of them is confident enough (the
        probability of its argmax, or sampled of its drawn token)."""
        after = verdict.num_accepted + 1
        return (redraft is not None and verdict.correction is not None and not verdict.extra and after < span.length
                and redraft.confidence[after] >= self.cfg.redraft)

    def route_and_verify(self, router: routing.RouterState, seq: Sequence, block: BlockState, unit: BlockState,
                         span: Span, draft: Draft, generator: torch.Generator | None
                         ) -> Generator[RowRequest, RowInput,
                                        tuple[routing.RouterState, Verdict | None, dict[int, int], Carried | None]]:
        """One S2D2 routing decision on the span of ``unit`` and, if it says so, the verification: returns the next
        router state, the verdict (None when not verified), the commits it decides (``offset: token``: the
        verifier's, and with ``commit_confident`` the unit's other masks whose drafts clear the threshold), and what
        the verification carried for the next draft or AR token (:meth:`verify`)."""
        if draft.redraft:  # always verified: its tokens are guesses made after a rejected token (no policy asked)
            verify_now = True
        else:
            verify_now, router = routing.route(router, unit, span, draft, self.cfg)
        if self.tracer is not None:
            why = {"policy": self.cfg.policy, "redraft": True} if draft.redraft else routing.explain(
                router, unit, span, draft, self.cfg)
            self.tracer.route(verify_now, (block.start + span.start, block.start + span.end), why)
        if not verify_now:
            return router, None, {}, None
        verdict, carried = yield from self.verify(seq, block, unit, span, draft, generator)
        commits = dict(zip(span.offsets(), verdict.tokens(list(draft.tokens[span.start:span.end]))))
        commits.update((span.start + j, token) for j, token in verdict.extra)
        if self.cfg.commit_confident:
            confident = _confident_rest(unit.masked_offsets(), commits, draft, self.cfg.threshold)
            commits.update(confident)
            self.stats.fallback_tokens += len(confident)
        return router, verdict, commits, carried

    def verify(self, seq: Sequence, block: BlockState, unit: BlockState, span: Span, draft: Draft,
               generator: torch.Generator | None
               ) -> Generator[RowRequest, RowInput, tuple[Verdict, Carried | None]]:
        """One AR-mode forward scoring the span's drafts, then speculative acceptance; returns the verdict and what
        the forward carried for the next draft or AR token (None: nothing usable).

        With ``fuse_draft``, a span that runs to the end of a full block (so acceptance may finish it) also gets
        the next block's draft rows; if every draft is accepted, the block's K/V written by this forward are kept
        in the cache (:class:`KeepRows`) and the next draft is carried, so the next block starts without a
        forward. Shifted logits: the span's last row predicts the next block's first token instead, and (with
        ``draft_ver``) a span that ends its sub-block inside the block brings the rest of the block as draft rows,
        the next draft. With prefix caching the accepted drafts' rows are kept too.
        """
        cfg = self.cfg
        drafted = list(draft.tokens[span.start:span.end])
        filled = list(block.tokens[:span.start]) + drafted
        # the next draft's rows are used only if every draft is accepted: carry them when that is likely enough
        fuse = self._fuse_draft and (cfg.fuse_draft_threshold <= 0.0
                                     or _all_accepted_estimate(draft, span) >= cfg.fuse_draft_threshold)
        finishes_block = fuse and span.end == block.end == block.size and block.start + block.size < seq.limit
        # Shifted logits, draft_ver: the rows of a draft before its first mask are causal, exactly this forward's
        # rows, so the later sub-blocks (all masks) can be drafted here; the next draft starts at the span's end.
        finishes_unit = self.shifted and fuse and cfg.draft_ver and span.end == unit.end < block.end
        if self.shifted:
            ahead = block.size - span.end if finishes_unit else 0
        else:
            ahead = block.size if finishes_block else 0
        self._trace_forward("verify")
        scored = yield VerifyRequest(filled, block.start, block.start + span.start, ahead)
        verifier, following = scored.rows(0, span.length), scored.rows(span.length)
        self.stats.verify_forwards += 1

        def ahead_of(rows: Scored) -> Scored | None:
            """Of the rows after the span's, those that make the next draft if every draft is accepted (shifted
            logits: the next block's first token), or None."""
            if finishes_block:
                return rows.rows(0, 1) if self.shifted else rows
            if finishes_unit:  # offsets span.end.. read from the span's last row and the draft rows but the last;
                # the committed offsets before them get placeholder rows, as a draft's own are never read either
                return rows.rows(0, -1).pad_front(span.end)
            return None

        ahead_rows = ahead_of(following)
        if cfg.greedy:
            verdict = accept_greedy(drafted, verifier.logits, self.relax, argmax=verifier.choices.tokens)
            ahead = None if ahead_rows is None else Draft(ahead_rows.choices)
            redraft = None if cfg.redraft is None else Draft(verifier.choices)  # the verifier's argmax
        else:
            # Acceptance and, when this forward may make the next draft, that draft's draws: asked of the step's
            # sampler together, one read per forward, every uniform from one call to the row's generator (the
            # draft's draws are dropped unless every draft is accepted)
            q, p = scored.probs[:span.length], draft.probs[span.start:span.end]
            ahead_probs = None if ahead_rows is None else ahead_rows.probs
            counts = [span.length + 1, 0 if ahead_probs is None else len(ahead_probs),
                      0 if cfg.redraft is None else span.length]
            u = uniforms(sum(counts), generator, q.device).split(counts)
            items = [Accept(drafted, p, q, u[0], self.relax)]
            if ahead_probs is not None:
                items.append(self._draw(ahead_probs, u[1]))
            if cfg.redraft is not None:  # a token drawn from every verifier row: those after a rejection may redraft
                items.append(self._draw(q, u[2]))
            results = yield HostRead(tuple(items))
            verdict = results[0]
            ahead = None if ahead_rows is None else Draft(results[1], ahead_probs)
            redraft = None if cfg.redraft is None else Draft(results[-1], q)
        if self.tracer is not None:
            self.tracer.verdict(span.length, verdict.num_accepted, verdict.correction)
        self.stats.observe_verification(span.length, verdict.num_accepted, verdict.correction is not None)
        keep_to, carried = self.cache.length, None  # the cache keeps this forward's rows up to keep_to
        if self._cache_prefix:  # the accepted drafts' (first-half) rows are their final causal K/V
            end = span.start + verdict.num_accepted
            if self.shifted:  # ... but the last token before the first mask stays a query row: it predicts the mask
                end = min(end, span.end - 1)
            keep_to = block.start + end
        if verdict.num_accepted == span.length:
            if finishes_block:
                keep_to = block.start + block.size  # the finished block's causal K/V, as fuse_commit writes them
                carried = Carried(block.start + block.size, 0, ahead, token=self.shifted)
            elif finishes_unit:
                carried = Carried(block.start, span.end, ahead)
        elif self._redraft(verdict, span, redraft):
            # Redraft: the verifier's rows for the span offsets after the correction are a draft there, computed
            # already (conditioned on the rejected draft, not the correction: a guess, verified like any draft);
            # the rest of the block keeps this step's draft. Sampled, its tokens were drawn from those rows, which
            # are then the distribution (p) their acceptance reads.
            after = verdict.num_accepted + 1
            a, b = span.start + after, span.end
            probs = None if cfg.greedy else torch.cat([draft.probs[:a], redraft.probs[after:], draft.probs[b:]])
            carried = Carried(block.start, a, Draft(draft.choices.with_rows(a, redraft.choices.rows(after)), probs,
                                                    redraft=True), redraft=True)
        if keep_to > self.cache.length:
            yield KeepRows(keep_to - self.cache.length)
        return verdict, carried
