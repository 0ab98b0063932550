"""The decoding loop: one loop for AR, static, dynamic and S2D2.

Glossary (design.md): a **block** is B consecutive positions at an absolute multiple of B; a **mask** is a
position not yet committed; a **draft** is one diffusion-mode forward over the block; the **span** is the
left-most maximal run of masks in the block; **route** decides per step whether to **verify** the span with one
AR-mode forward; **commit** gives a masked position its final token, and only committed tokens enter the KV cache;
**NFE** counts forwards of every kind.

Per block, each step: draft; (s2d2) route, and maybe verify with speculative acceptance; top up to the step's
quota with the base strategy; commit. ``ar`` is ``static`` with B = 1, ``dynamic`` is ``s2d2`` that never
verifies, and every variant (cache modes, policies, estimators) is an argument of this one loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from s2d2 import routing, strategies
from s2d2.adapters.base import FamilyAdapter
from s2d2.cache import KVCache
from s2d2.config import DecodeConfig
from s2d2.sampling import choose_tokens, token_probs
from s2d2.state import BlockState, Draft, Sequence, Span
from s2d2.stats import DecodeStats
from s2d2.verify import Verdict, accept_greedy, accept_sampled


@torch.inference_mode()
def decode(adapter: FamilyAdapter, prompt_ids: list[int], cfg: DecodeConfig, cache: KVCache,
           generator: torch.Generator | None = None,
           stop_check: Callable[[list[int]], bool] | None = None) -> tuple[list[int], str, DecodeStats]:
    """Decode one prompt; returns the generated ids (stop token excluded), ``"stop"``/``"length"`` and stats.

    ``stop_check(generated_ids)`` runs after each finished block; True ends decoding there (stop strings)."""
    t0 = time.perf_counter()
    stats = DecodeStats(prompt_tokens=len(prompt_ids))
    forwards = _Forwards(adapter, cache, cfg, stats)
    seq = Sequence(prompt_ids, cfg.block_size, cfg.max_new_tokens, adapter.mask_id,
                   adapter.stop_ids if cfg.stop_token_ids is None else cfg.stop_token_ids, adapter.device)
    base = "static" if cfg.method in ("ar", "static") else "dynamic" if cfg.method == "dynamic" else cfg.fallback
    quotas = strategies.step_quotas(cfg.block_size, cfg.steps)
    router = routing.RouterState.initial(cfg)
    cache.reset()
    for block in seq.blocks():
        for quota in quotas:
            span = block.span()
            if span is None:
                break
            draft = forwards.draft(seq, block, generator)
            commits: dict[int, int] = {}
            verdict = None
            if cfg.method == "s2d2":
                verify_now, router = routing.route(router, block, span, draft, cfg)
                if verify_now:
                    verdict = forwards.verify(seq, block, span, draft, generator)
                    commits = dict(zip(span.offsets(), verdict.tokens(list(draft.tokens[span.start:span.end]))))
            need = min(quota, block.num_masked) - len(commits)
            if need > 0:
                candidates = [i for i in block.masked_offsets() if i not in commits]
                chosen = strategies.select(base, candidates, draft.confidence, need, cfg.threshold)
                commits.update((i, draft.tokens[i]) for i in chosen)
                stats.fallback_tokens += len(chosen)
            router = routing.observe(router, len(commits), verified=verdict is not None)
            block = seq.commit(block, commits)
            stats.steps += 1
        assert block.span() is None, "the step quotas add up to the block size"
        if stop_check is not None and not seq.stopped and stop_check(seq.generated()):
            seq.stop_at(block.start + block.end)
    token_ids, finish_reason = seq.output()
    stats.num_tokens = len(token_ids)
    stats.time_s = time.perf_counter() - t0
    return token_ids, finish_reason, stats


class _Forwards:
    """The loop's access to the model: builds each forward's inputs, counts it, and times it."""

    def __init__(self, adapter: FamilyAdapter, cache: KVCache, cfg: DecodeConfig, stats: DecodeStats) -> None:
        self.adapter, self.cache, self.cfg, self.stats = adapter, cache, cfg, stats
        self._sync = adapter.device.type == "cuda"
        self._fuse_draft = cfg.fuse_draft and cfg.cache_ver and cfg.fuse_commit
        self._next_draft: tuple[int, torch.Tensor] | None = None  # (block start, logits) drafted by a verify

    def _timed(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self._sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if self._sync:
            torch.cuda.synchronize()
        self.stats.forward_time_s += time.perf_counter() - t0
        return out

    def draft(self, seq: Sequence, block: BlockState, generator: torch.Generator | None) -> Draft:
        """One diffusion-mode forward over the block; tokens drawn at every offset.

        The forward first writes the pending K/V (prompt or previous block); without ``fuse_commit`` they get a
        forward of their own instead, as in the reference code.
        """
        cfg = self.cfg
        fused, self._next_draft = self._next_draft, None
        if fused is not None and fused[0] == block.start:
            logits = fused[1]  # drafted by the verify forward that finished the previous block
            self.stats.fused_drafts += 1
        else:
            if not cfg.fuse_commit and self.cache.length < block.start:
                self.write_pending(seq, block.start)
            logits = self._timed(self.adapter.draft, seq.ids, self.cache, block.start, block.size, block.first_mask,
                                 cache_ver=cfg.cache_ver, draft_ver=cfg.draft_ver)
            self.stats.draft_forwards += 1
        probs = token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        tokens = choose_tokens(probs, cfg.greedy, generator)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
        return Draft(tuple(tokens.tolist()), tuple(confidence.tolist()), probs)

    def verify(self, seq: Sequence, block: BlockState, span: Span, draft: Draft,
               generator: torch.Generator | None) -> Verdict:
        """One AR-mode forward scoring the span's drafts, then speculative acceptance.

        With ``fuse_draft``, a span that runs to the end of a full block (so acceptance may finish it) also gets
        the next block's draft rows; if every draft is accepted, the block's K/V written by this forward are
        committed to the cache and the next draft is kept, so the next block starts without a forward.
        """
        cfg = self.cfg
        drafted = list(draft.tokens[span.start:span.end])
        filled = list(block.tokens[:span.start]) + drafted
        ahead = block.size if (self._fuse_draft and span.end == block.end == block.size
                               and block.start + block.size < seq.limit) else 0
        logits = self._timed(self.adapter.verify, filled, self.cache, block.start, block.start + span.start, ahead)
        logits, next_logits = logits[:span.length], logits[span.length:]
        self.stats.verify_forwards += 1
        if cfg.greedy:
            verdict = accept_greedy(drafted, logits)
        else:
            q = token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
            verdict = accept_sampled(drafted, draft.probs[span.start:span.end], q, generator)
        self.stats.observe_verification(span.length, verdict.num_accepted, verdict.correction is not None)
        if ahead and verdict.num_accepted == span.length:
            self.cache.commit(block.size)  # the causal K/V of the finished block, as fuse_commit would write them
            self._next_draft = (block.start + block.size, next_logits)
        return verdict

    def write_pending(self, seq: Sequence, end: int) -> None:
        """A forward of its own that writes the K/V of ``seq.ids[cache.length : end]`` (prefill or block commit)."""
        kind = "prefill_forwards" if self.cache.length == 0 else "commit_forwards"
        self._timed(self.adapter.commit, seq.ids, self.cache, end, self.cfg.block_size, cache_ver=self.cfg.cache_ver)
        setattr(self.stats, kind, getattr(self.stats, kind) + 1)
