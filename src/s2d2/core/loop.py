"""The decoding loop: one loop for AR, static, dynamic and S2D2.

Glossary (design.md): a **block** is B consecutive positions at an absolute multiple of B (D2F: from the prompt's
end); a **mask** is a
position not yet committed; a **draft** is one diffusion-mode forward over the block; the **span** is the
left-most maximal run of masks in the block; **route** decides per step whether to **verify** the span with one
AR-mode forward; **commit** gives a masked position its final token, and only committed tokens enter the KV cache;
**NFE** counts forwards of every kind.

Per block, each step: draft; (s2d2) route, and maybe verify with speculative acceptance; top up to the step's
quota with the base strategy; commit. ``ar`` is ``static`` with B = 1, ``dynamic`` is ``s2d2`` that never
verifies, and every variant (cache modes, policies, estimators) is an argument of this one loop.

The loop (:func:`decode_steps`) is a generator that *asks* for each forward (``logits = yield DraftRequest(...)``,
:mod:`s2d2.core.requests`) instead of running it, so the same per-row algorithm runs alone
(:func:`s2d2.engine.runner.decode`) or as one row of the batched engine (:mod:`s2d2.engine.engine`), which schedules
and never decides. How each forward is built and what its logits become lives in :mod:`s2d2.core.forwards`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

import torch

from s2d2.config import DecodeConfig
from s2d2.core import routing, strategies
from s2d2.core.forwards import Forwards
from s2d2.core.requests import CacheView, Carried, FamilyTraits, RowRequest, RowState, RowSteps
from s2d2.core.state import BlockState, Draft, Sequence, Span
from s2d2.core.trace import Tracer
from s2d2.core.verify import Verdict


def decode_steps(prompt_ids: list[int], cfg: DecodeConfig, cache: CacheView, traits: FamilyTraits,
                 generator: torch.Generator | None = None, stop_check: Callable[[list[int]], bool] | None = None,
                 state: RowState | None = None) -> RowSteps:
    """Decode one prompt, asking for each forward instead of running it: the algorithm, free of scheduling.

    The caller (:func:`s2d2.engine.runner.decode` for one row, :class:`s2d2.engine.engine.Engine` for a batch)
    executes each yielded :data:`~s2d2.core.requests.RowRequest` against ``cache`` (the row's own committed K/V,
    empty when decoding starts; the loop only reads it) and sends back its logits: a forward's, or None for a
    :class:`~s2d2.core.requests.KeepRows`, which commits rows the last forward computed.
    ``stop_check(generated_ids)`` runs after each finished block; True ends decoding there (stop strings). Forward
    time is the caller's to add to ``state.stats.forward_time_s``. With
    ``traits.shifted_logits`` (the family reads token t from row t-1), each block opens with its first token decoded
    in AR mode, from the row before it (:meth:`Forwards.open_block`). With ``traits.blocks_from_prompt_end`` (D2F)
    blocks start at the prompt's end instead of at absolute multiples of the block size.
    """
    t0 = time.perf_counter()
    state = state if state is not None else RowState()
    stats = state.stats
    stats.prompt_tokens = len(prompt_ids)
    tracer = state.trace
    forwards = Forwards(cache, cfg, stats, traits.shifted_logits, tracer)
    seq = state.seq = Sequence(prompt_ids, cfg.block_size, cfg.max_new_tokens, traits.mask_id,
                               traits.stop_ids if cfg.stop_token_ids is None else cfg.stop_token_ids,
                               traits.blocks_from_prompt_end)
    base = "static" if cfg.method in ("ar", "static") else "dynamic" if cfg.method == "dynamic" else cfg.fallback
    quotas = strategies.step_quotas(cfg.block_size, cfg.steps)
    router = routing.RouterState.initial(cfg)
    carried: Carried | None = None  # what the last verification computed for the next draft or AR token
    if tracer is not None:
        tracer.header(prompt_tokens=len(prompt_ids), block_size=cfg.block_size, method=cfg.method,
                      policy=cfg.policy if cfg.method == "s2d2" else None, threshold=cfg.threshold,
                      pipelined=cfg.block_add_threshold is not None)
    if cfg.block_add_threshold is not None:
        yield from _decode_pipelined(seq, cfg, forwards, generator, stop_check)
    for block in seq.blocks() if cfg.block_add_threshold is None else ():
        if traits.shifted_logits and block.masked[0] and block.end > 0:
            token = yield from forwards.open_block(seq, block, generator, carried)
            carried = None
            block = seq.commit(block, {0: token})
            if tracer is not None:
                tracer.commit(block.start, token, "ar")
        step, post_steps, edited = 0, 0, False
        while True:
            # the decoding unit: the block, or the sub-block holding its first mask; spans and commits stay in it
            unit = block.unit(cfg.sub_block_size)
            span = unit.span()
            if span is None:
                # editing: a block whose masks are gone runs editing-only steps while the last step edited
                if not (edited and post_steps < cfg.max_post_steps):
                    break
                post_steps += 1
            quota = quotas[min(step, len(quotas) - 1)]
            draft = yield from forwards.draft(seq, block, generator, carried=carried)
            carried = None
            if tracer is not None:
                tracer.draft(block.start, unit.masked_offsets(), draft.tokens, draft.confidence)
            edits = _edits(block, draft, cfg.editing_threshold) if cfg.editing_threshold is not None else {}
            edited = bool(edits)
            stats.edits += len(edits)
            commits: dict[int, int] = dict(edits)
            verdict = None
            if cfg.method == "s2d2" and span is not None:
                # the verifier reads the edited prefix
                router, verdict, verified, carried = yield from forwards.route_and_verify(
                    router, seq, block.with_tokens(edits) if edits else block, unit, span, draft, generator)
                commits.update(verified)
            need = min(quota, unit.num_masked) - (len(commits) - len(edits))
            if need > 0:
                candidates = [i for i in unit.masked_offsets() if i not in commits]
                chosen = strategies.select(base, candidates, draft.confidence, need, cfg.threshold)
                commits.update((i, draft.tokens[i]) for i in chosen)
                stats.fallback_tokens += len(chosen)
            if span is not None:
                router = routing.observe(router, len(commits) - len(edits), verified=verdict is not None)
            block = seq.commit(block, commits)
            if tracer is not None:
                # AR's one-token blocks are the static strategy at B = S = 1: their commits are AR tokens
                _trace_commits(tracer, block.start, commits, edits, span, verdict,
                               plain="ar" if cfg.method == "ar" else "fallback")
                tracer.end_step(stats.steps, block.start)
            stats.steps += 1
            step += 1
        if stop_check is not None and not seq.stopped and stop_check(seq.generated()):
            seq.stop_at(block.start + block.end)
    token_ids, finish_reason = seq.output()
    stats.num_tokens = len(token_ids)
    stats.time_s = time.perf_counter() - t0
    if tracer is not None:
        tracer.done(token_ids, finish_reason, stats.to_dict())
    return token_ids, finish_reason, stats


def _trace_commits(tracer: Tracer, start: int, commits: dict[int, int], edits: dict[int, int], span: Span | None,
                   verdict: Verdict | None, plain: str = "fallback") -> None:
    """Record a step's commits with how each came about (the trace schema's ``how``); ``plain`` names the commits
    that were neither verified nor edits (the base strategy's, or AR's tokens)."""
    for offset, token in sorted(commits.items()):
        how = plain
        if offset in edits:
            how = "edit"
        elif verdict is not None and span is not None and (
                span.start <= offset < span.start + verdict.num_accepted
                or any(span.start + j == offset for j, _ in verdict.extra)):
            how = "accepted"
        elif verdict is not None and span is not None and offset == span.start + verdict.num_accepted:
            how = "corrected"
        tracer.commit(start + offset, token, how)


def _edits(block: BlockState, draft: Draft, threshold: float) -> dict[int, int]:
    """LLaDA2.1's self-correction: committed generated tokens of the block (never the prompt, never past a stop) whose
    draft now differs with confidence above ``threshold``, and the token to put there."""
    return {i: draft.tokens[i] for i in range(block.num_prompt, block.end)
            if not block.masked[i] and draft.tokens[i] != block.tokens[i] and draft.confidence[i] > threshold}


def _decode_pipelined(seq: Sequence, cfg: DecodeConfig, forwards: Forwards, generator: torch.Generator | None,
                      stop_check: Callable[[list[int]], bool] | None) -> Generator[RowRequest, torch.Tensor | None,
                                                                                   None]:
    """D2F's pipelined blocks: several blocks in flight, one draft forward over all of them per step.

    Each step: open the next block when the last one's decoded share reaches ``block_add_threshold`` (one per step);
    fully activate a block once its predecessor's share reaches ``decoded_token_threshold``; draft every block in
    flight in one forward, which first writes the finished blocks before them to the cache (in order); then

    - a step that does not verify is D2F's step: every block commits its drafts above ``threshold``, a fully
      activated one at least its most confident draft;
    - ``s2d2`` routes on the span, the left-most run of masks after the cache frontier (it may cross blocks), and a
      verified step commits what the verification decides and nothing else. Later blocks wait for the steps the
      policy skips, so a verified step is exact: greedy S2D2 verifying every step is greedy AR, and never verifying
      is the D2F baseline.

    Shifted logits: a block's first token is decoded in AR mode when the block reaches the front, from the last row
    of the finished block before it, which that step's draft forward writes to the cache (as :func:`decode_steps`
    opens a block).
    """
    size = cfg.block_size
    router = routing.RouterState.initial(cfg)
    front, count = seq.first_block_start, 1  # the first block in flight; how many are in flight
    activated = {front}  # starts of the fully activated blocks
    stats = forwards.stats
    while front < seq.limit:
        last = seq.view(front + (count - 1) * size)
        if not seq.stopped and front + count * size < seq.limit and _decoded_share(last) >= cfg.block_add_threshold:
            count += 1
        for j in range(1, count):
            if _decoded_share(seq.view(front + (j - 1) * size)) >= cfg.decoded_token_threshold:
                activated.add(front + j * size)
        region = seq.view(front, count)
        writes_front = forwards.cache.length < front  # the draft writes the finished rows before the front block
        draft = yield from forwards.draft(seq, region, generator, num_blocks=count)
        tracer = forwards.tracer
        if tracer is not None:
            tracer.draft(region.start, region.masked_offsets(), draft.tokens, draft.confidence)
        if forwards.shifted and region.masked[0]:
            assert writes_front, "a shifted-logit block reaches the front in the step that caches its predecessor"
            region = seq.commit(region, {0: draft.tokens[0]})  # the row before is committed: AR mode
            if tracer is not None:
                tracer.commit(region.start, draft.tokens[0], "ar")
        span = region.span()
        commits: dict[int, int] = {}
        verdict = None
        if cfg.method == "s2d2" and span is not None:
            # (nothing is carried: pipelined blocks draft every block in flight in one forward)
            router, verdict, commits, _ = yield from forwards.route_and_verify(router, seq, region, region, span,
                                                                              draft, generator)
        # a verified step commits what the verification decided and nothing else (at least one token of the front
        # block, the span's first; with commit_confident also every other draft above the threshold); a step that
        # does not verify is D2F's
        for j in range(count) if verdict is None else ():
            lo, hi = j * size, min((j + 1) * size, region.end)
            candidates = [i for i in range(lo, hi) if region.masked[i]]
            need = 1 if front + j * size in activated else 0
            chosen = strategies.select("dynamic", candidates, draft.confidence, need, cfg.threshold)
            commits.update((i, draft.tokens[i]) for i in chosen)
            stats.fallback_tokens += len(chosen)
        if span is not None:
            router = routing.observe(router, len(commits), verified=verdict is not None)
        region = seq.commit(region, commits)
        if tracer is not None:
            _trace_commits(tracer, region.start, commits, {}, span, verdict)
            tracer.end_step(stats.steps, front)
        stats.steps += 1
        count = min(count, -(-(seq.limit - front) // size))  # a stop token ends the blocks after it
        while count and seq.view(front).num_masked == 0:  # finished front blocks leave flight, in order
            front, count = front + size, count - 1
            if stop_check is not None and not seq.stopped and stop_check(seq.generated()):
                seq.stop_at(front)
            count = max(count, 1) if front < seq.limit else 0
            activated.add(front)


def _decoded_share(block: BlockState) -> float:
    """Share of a block's decodable positions committed so far (1 for a block with none)."""
    return 1.0 - block.num_masked / block.end if block.end > 0 else 1.0
