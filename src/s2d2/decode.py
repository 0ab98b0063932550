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

The loop (:func:`decode_steps`) is a generator that *asks* for each forward (``logits = yield DraftRequest(...)``)
instead of running it, so the same per-row algorithm runs alone (:func:`decode`, the adapter's single-row forwards)
or as one row of the batched engine (:mod:`s2d2.engine`), which schedules and never decides.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from s2d2 import routing, strategies
from s2d2.adapters.base import FamilyAdapter
from s2d2.batching import ForwardSpec
from s2d2.cache import KVCache
from s2d2.config import DecodeConfig
from s2d2.sampling import choose_tokens, token_probs
from s2d2.state import BlockState, Draft, Sequence, Span
from s2d2.stats import DecodeStats
from s2d2.trace import Tracer
from s2d2.verify import Verdict, accept_greedy, accept_sampled


class CacheView(Protocol):
    """What a row's decoding needs of its cache: the committed length, and committing or forgetting tokens
    (a :class:`~s2d2.cache.KVCache`, or one slot of the engine's batch cache)."""

    @property
    def length(self) -> int: ...

    def commit(self, num_tokens: int) -> None: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class DraftRequest:
    """A row asks for a diffusion-mode forward over its block (first writing its pending committed tokens)."""

    ids: torch.Tensor  # the row's whole sequence
    block_start: int
    block_size: int
    first_mask: int
    cache_ver: bool
    draft_ver: bool
    num_blocks: int = 1  # pipelined decoding: the blocks in flight, from block_start
    # also write the K/V of the block's committed prefix (offsets before first_mask): the rows after it only remain
    cache_prefix: bool = False


@dataclass(frozen=True)
class VerifyRequest:
    """A row asks for an AR-mode (2L) forward scoring its span, optionally drafting the next block."""

    filled: list[int]
    block_start: int
    span_start: int
    next_block: int


@dataclass(frozen=True)
class CommitRequest:
    """A row asks for a forward of its own that writes its pending K/V (only without ``fuse_commit``)."""

    ids: torch.Tensor
    end: int
    block_size: int
    cache_ver: bool


@dataclass(frozen=True)
class FinalizeRequest:
    """Shifted-logit families: a row asks for the forward that writes a finished block's (or the prompt's) K/V and
    predicts the next block's first token from its last row."""

    ids: torch.Tensor
    end: int
    block_size: int
    cache_ver: bool


ForwardRequest = DraftRequest | VerifyRequest | CommitRequest | FinalizeRequest
# A row's decoding as a generator: it yields the forward it needs next, is sent that forward's logits (None for a
# commit), and returns (generated ids, finish reason, stats) when done.
RowSteps = Generator[ForwardRequest, "torch.Tensor | None", "tuple[list[int], str, DecodeStats]"]


@dataclass
class RowState:
    """What the driver of :func:`decode_steps` may read while the row runs: its stats (the driver adds forward
    time) and its sequence (committed tokens so far, for streaming)."""

    stats: DecodeStats = field(default_factory=DecodeStats)
    seq: Sequence | None = None
    trace: Tracer | None = None  # set by the driver to record a step trace (s2d2.trace); None: no tracing work


def decode_steps(prompt_ids: list[int], cfg: DecodeConfig, cache: CacheView, mask_id: int,
                 stop_ids: Iterable[int], device: torch.device, generator: torch.Generator | None = None,
                 stop_check: Callable[[list[int]], bool] | None = None,
                 state: RowState | None = None, shifted_logits: bool = False,
                 blocks_from_prompt_end: bool = False) -> RowSteps:
    """Decode one prompt, asking for each forward instead of running it: the algorithm, free of scheduling.

    The caller (:func:`decode` for one row, :class:`s2d2.engine.Engine` for a batch) executes each yielded
    :data:`ForwardRequest` against ``cache`` (the row's own committed K/V) and sends back its logits.
    ``stop_check(generated_ids)`` runs after each finished block; True ends decoding there (stop strings).
    Forward time is the caller's to add to ``state.stats.forward_time_s``. With ``shifted_logits`` (the adapter's
    family reads token t from row t-1), each block opens with its first token decoded in AR mode, from the row
    before it (:meth:`_Forwards.open_block`). With ``blocks_from_prompt_end`` (D2F) blocks start at the prompt's end
    instead of at absolute multiples of the block size.
    """
    t0 = time.perf_counter()
    state = state if state is not None else RowState()
    stats = state.stats
    stats.prompt_tokens = len(prompt_ids)
    tracer = state.trace
    forwards = _Forwards(cache, cfg, stats, shifted_logits, tracer)
    seq = state.seq = Sequence(prompt_ids, cfg.block_size, cfg.max_new_tokens, mask_id,
                               stop_ids if cfg.stop_token_ids is None else cfg.stop_token_ids, device,
                               blocks_from_prompt_end)
    base = "static" if cfg.method in ("ar", "static") else "dynamic" if cfg.method == "dynamic" else cfg.fallback
    quotas = strategies.step_quotas(cfg.block_size, cfg.steps)
    router = routing.RouterState.initial(cfg)
    cache.reset()
    if tracer is not None:
        tracer.header(prompt_tokens=len(prompt_ids), block_size=cfg.block_size, method=cfg.method,
                      policy=cfg.policy if cfg.method == "s2d2" else None, threshold=cfg.threshold,
                      pipelined=cfg.block_add_threshold is not None)
    if cfg.block_add_threshold is not None:
        yield from _decode_pipelined(seq, cfg, forwards, generator, stop_check)
    for block in seq.blocks() if cfg.block_add_threshold is None else ():
        if shifted_logits and block.masked[0] and block.end > 0:
            token = yield from forwards.open_block(seq, block, generator)
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
            draft = yield from forwards.draft(seq, block, generator)
            if tracer is not None:
                tracer.draft(block.start, unit.masked_offsets(), draft.tokens, draft.confidence)
            edits = _edits(block, draft, cfg.editing_threshold) if cfg.editing_threshold is not None else {}
            edited = bool(edits)
            stats.edits += len(edits)
            commits: dict[int, int] = dict(edits)
            verdict = None
            if cfg.method == "s2d2" and span is not None:
                # the verifier reads the edited prefix
                router, verdict, verified = yield from forwards.route_and_verify(
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
                _trace_commits(tracer, block.start, commits, edits, span, verdict)
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
                   verdict: Verdict | None) -> None:
    """Record a step's commits with how each came about (the trace schema's ``how``)."""
    for offset, token in sorted(commits.items()):
        how = "fallback"
        if offset in edits:
            how = "edit"
        elif verdict is not None and span is not None and (
                span.start <= offset < span.start + verdict.num_accepted
                or any(span.start + j == offset for j, _ in verdict.extra)):
            how = "accepted"
        elif verdict is not None and span is not None and offset == span.start + verdict.num_accepted:
            how = "corrected"
        tracer.commit(start + offset, token, how)


def _confident_rest(masked: Iterable[int], commits: dict[int, int], draft: Draft, threshold: float) -> dict[int, int]:
    """``commit_confident``: the masks a verification left whose drafts clear ``threshold`` (the dynamic rule's
    commits, without its quota), to commit beside the verdict."""
    candidates = [i for i in masked if i not in commits]
    return {i: draft.tokens[i] for i in strategies.select_dynamic(candidates, draft.confidence, 0, threshold)}


def _all_accepted_estimate(draft: Draft, span: Span) -> float:
    """The drafter's own estimate that verification accepts every draft of ``span``: the product of their
    confidences (``fuse_draft_threshold`` compares it)."""
    return math.prod(draft.confidence[span.start:span.end])


def _edits(block: BlockState, draft: Draft, threshold: float) -> dict[int, int]:
    """LLaDA2.1's self-correction: committed generated tokens of the block (never the prompt, never past a stop) whose
    draft now differs with confidence above ``threshold``, and the token to put there."""
    return {i: draft.tokens[i] for i in range(block.num_prompt, block.end)
            if not block.masked[i] and draft.tokens[i] != block.tokens[i] and draft.confidence[i] > threshold}


def _decode_pipelined(seq: Sequence, cfg: DecodeConfig, forwards: _Forwards, generator: torch.Generator | None,
                      stop_check: Callable[[list[int]], bool] | None) -> Generator[ForwardRequest, torch.Tensor | None,
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
            router, verdict, commits = yield from forwards.route_and_verify(router, seq, region, region, span, draft,
                                                                           generator)
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


@torch.inference_mode()
def decode(adapter: FamilyAdapter, prompt_ids: list[int], cfg: DecodeConfig, cache: KVCache,
           generator: torch.Generator | None = None, stop_check: Callable[[list[int]], bool] | None = None,
           tracer: Tracer | None = None) -> tuple[list[int], str, DecodeStats]:
    """Decode one prompt with the adapter's single-row forwards; returns the generated ids (stop token excluded),
    ``"stop"``/``"length"`` and stats. ``stop_check`` as in :func:`decode_steps`; ``tracer`` records a trace."""
    state = RowState(trace=tracer)
    steps = decode_steps(prompt_ids, cfg, cache, adapter.mask_id, adapter.stop_ids, adapter.device, generator,
                         stop_check, state, adapter.shifted_logits, adapter.blocks_from_prompt_end)
    timer = ForwardTimer(adapter.device)
    logits = None
    while True:
        try:
            request = steps.send(logits)
        except StopIteration as done:
            return done.value
        spec = request_spec(adapter, request, cache.length)
        with timer:
            logits = run_request(adapter, request, cache, spec)
        state.stats.forward_time_s += timer.elapsed
        state.stats.query_rows += spec.num_rows
        if tracer is not None:
            tracer.forward_done(spec.num_rows, timer.elapsed)


def request_spec(adapter: FamilyAdapter, request: ForwardRequest, cache_len: int) -> ForwardSpec:
    """The rows and mask of a request against a cache holding ``cache_len`` committed tokens (the batched engine's
    form of every forward)."""
    if isinstance(request, DraftRequest):
        return adapter.draft_spec(request.ids, cache_len, request.block_start, request.block_size, request.first_mask,
                                  cache_ver=request.cache_ver, draft_ver=request.draft_ver, num_blocks=request.num_blocks,
                                  cache_prefix=request.cache_prefix)
    if isinstance(request, VerifyRequest):
        return adapter.verify_spec(request.filled, cache_len, request.block_start, request.span_start,
                                   request.next_block)
    if isinstance(request, FinalizeRequest):
        return adapter.finalize_spec(request.ids, cache_len, request.end, request.block_size,
                                     cache_ver=request.cache_ver)
    return adapter.commit_spec(request.ids, cache_len, request.end, request.block_size, cache_ver=request.cache_ver)


def run_request(adapter: FamilyAdapter, request: ForwardRequest, cache: KVCache,
                spec: ForwardSpec | None = None) -> torch.Tensor | None:
    """Execute one row's request (its ``spec``, if already built) with the adapter's single-row forward; returns
    its logits (None for a commit)."""
    logits = adapter.run(spec if spec is not None else request_spec(adapter, request, cache.length), cache)
    return None if isinstance(request, CommitRequest) else logits


class ForwardTimer:
    """Wall time of a forward (CUDA is synchronised around it, so the time is the device's, not the launch's)."""

    def __init__(self, device: torch.device) -> None:
        self._sync = device.type == "cuda"
        self.elapsed = 0.0

    def __enter__(self) -> ForwardTimer:
        if self._sync:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sync:
            torch.cuda.synchronize()
        self.elapsed = time.perf_counter() - self._t0


class _Forwards:
    """The row's forwards as requests: builds each one, counts it, and turns its logits into a draft or a verdict."""

    def __init__(self, cache: CacheView, cfg: DecodeConfig, stats: DecodeStats, shifted_logits: bool = False,
                 tracer: Tracer | None = None) -> None:
        self.cache, self.cfg, self.stats, self.shifted, self.tracer = cache, cfg, stats, shifted_logits, tracer
        self.relax = cfg.relaxation()  # neutral: the acceptance functions run their exact rule
        # a block's K/V may enter the cache early only if no edit can change it afterwards
        self._fuse_draft = (cfg.fuse_draft and cfg.cache_ver and cfg.fuse_commit and cfg.editing_threshold is None
                            and cfg.block_add_threshold is None)
        # Prefix caching: with the AR-consistent cache a committed token's causal K/V depend only on the tokens to
        # its left, so once the block's left-most committed run grows they are final. Drafts (draft_ver: those rows
        # are causal) and verifications (their first half is causal) compute them anyway and keep them.
        # (Like fuse_commit, whose cost model it extends: without it, as in the reference, K/V get forwards of their own.)
        self._cache_prefix = (cfg.prefix_cache and cfg.cache_ver and cfg.draft_ver and cfg.fuse_commit
                              and cfg.editing_threshold is None)
        # A draft made by the verify forward that finished the previous block (aligned logits) or the current
        # sub-block (shifted logits, with draft_ver), keyed by the (block start, first mask) it is the draft of
        self._next_draft: tuple[tuple[int, int], torch.Tensor] | None = None
        # Shifted logits: (block start, row) from the verify forward that finished the previous block, the row that
        # predicts the block's first token
        self._next_token: tuple[int, torch.Tensor] | None = None

    def _trace_forward(self, kind: str) -> None:
        if self.tracer is not None:
            self.tracer.forward(kind)

    def _count_cache_write(self) -> None:
        """Count a forward of its own that writes committed K/V: the prompt's (prefill) or a finished block's."""
        if self.cache.length == 0:
            self.stats.prefill_forwards += 1
        else:
            self.stats.commit_forwards += 1

    def open_block(self, seq: Sequence, block: BlockState,
                   generator: torch.Generator | None) -> Generator[ForwardRequest, torch.Tensor | None, int]:
        """Shifted logits: the block's first token, decoded in AR mode from the row before it (drawn with the
        decoding temperature). That row comes from the verification that finished the previous block, or from a
        forward writing the previous block (or the prompt) to the cache and predicting from its last row."""
        cfg = self.cfg
        fused, self._next_token = self._next_token, None
        if fused is not None and fused[0] == block.start:
            logits = fused[1]
            self.stats.fused_drafts += 1
            self._trace_forward("fused_token")
        else:
            self._count_cache_write()
            self._trace_forward("finalize")
            logits = yield FinalizeRequest(seq.ids, block.start, cfg.block_size, cfg.cache_ver)
        probs = token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        return int(choose_tokens(probs, cfg.greedy, generator)[0])

    def draft(self, seq: Sequence, block: BlockState, generator: torch.Generator | None,
              num_blocks: int = 1) -> Generator[ForwardRequest, torch.Tensor | None, Draft]:
        """One diffusion-mode forward over the block (or the ``num_blocks`` blocks in flight that ``block`` spans);
        tokens drawn at every offset.

        The forward first writes the pending K/V (prompt or previous blocks); without ``fuse_commit`` they get a
        forward of their own instead, as in the reference code.
        """
        cfg = self.cfg
        fused, self._next_draft = self._next_draft, None
        if fused is not None and fused[0] == (block.start, block.first_mask):
            logits = fused[1]  # drafted by the verify forward that finished the previous block or sub-block
            self.stats.fused_drafts += 1
            self._trace_forward("fused_draft")
        else:
            if not cfg.fuse_commit and self.cache.length < block.start:
                self._count_cache_write()
                self._trace_forward("commit")
                yield CommitRequest(seq.ids, block.start, cfg.block_size, cfg.cache_ver)
            self._trace_forward("draft")
            logits = yield DraftRequest(seq.ids, block.start, block.size // num_blocks, block.first_mask,
                                        cfg.cache_ver, cfg.draft_ver, num_blocks, self._cache_prefix)
            self.stats.draft_forwards += 1
        probs = token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        tokens = choose_tokens(probs, cfg.greedy, generator)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
        return Draft(tuple(tokens.tolist()), tuple(confidence.tolist()), probs)

    def route_and_verify(self, router: routing.RouterState, seq: Sequence, block: BlockState, unit: BlockState,
                         span: Span, draft: Draft, generator: torch.Generator | None
                         ) -> Generator[ForwardRequest, torch.Tensor | None,
                                        tuple[routing.RouterState, Verdict | None, dict[int, int]]]:
        """One S2D2 routing decision on the span of ``unit`` and, if it says so, the verification: returns the next
        router state, the verdict (None when not verified) and the commits it decides (``offset: token``): the
        verifier's, and with ``commit_confident`` the unit's other masks whose drafts clear the threshold."""
        verify_now, router = routing.route(router, unit, span, draft, self.cfg)
        if self.tracer is not None:
            self.tracer.route(verify_now, (block.start + span.start, block.start + span.end),
                              routing.explain(router, unit, span, draft, self.cfg))
        if not verify_now:
            return router, None, {}
        verdict = yield from self.verify(seq, block, unit, span, draft, generator)
        commits = dict(zip(span.offsets(), verdict.tokens(list(draft.tokens[span.start:span.end]))))
        commits.update((span.start + j, token) for j, token in verdict.extra)
        if self.cfg.commit_confident:
            confident = _confident_rest(unit.masked_offsets(), commits, draft, self.cfg.threshold)
            commits.update(confident)
            self.stats.fallback_tokens += len(confident)
        return router, verdict, commits

    def verify(self, seq: Sequence, block: BlockState, unit: BlockState, span: Span, draft: Draft,
               generator: torch.Generator | None) -> Generator[ForwardRequest, torch.Tensor | None, Verdict]:
        """One AR-mode forward scoring the span's drafts, then speculative acceptance.

        With ``fuse_draft``, a span that runs to the end of a full block (so acceptance may finish it) also gets
        the next block's draft rows; if every draft is accepted, the block's K/V written by this forward are
        committed to the cache and the next draft is kept, so the next block starts without a forward. Shifted
        logits: the span's last row predicts the next block's first token instead, and (with ``draft_ver``) a span
        that ends its sub-block inside the block brings the rest of the block as draft rows, the next draft.
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
        logits = yield VerifyRequest(filled, block.start, block.start + span.start, ahead)
        logits, next_logits = logits[:span.length], logits[span.length:]
        self.stats.verify_forwards += 1
        if cfg.greedy:
            verdict = accept_greedy(drafted, logits, self.relax)
        else:
            q = token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
            p = draft.probs[span.start:span.end]
            verdict = accept_sampled(drafted, p, q, generator, self.relax)
        if self.tracer is not None:
            self.tracer.verdict(span.length, verdict.num_accepted, verdict.correction)
        self.stats.observe_verification(span.length, verdict.num_accepted, verdict.correction is not None)
        if self._cache_prefix:  # the accepted drafts' (first-half) rows are their final causal K/V
            end = span.start + verdict.num_accepted
            if self.shifted:  # ... but the last token before the first mask stays a query row: it predicts the mask
                end = min(end, span.end - 1)
            self.cache.commit(block.start + end - self.cache.length)
        if verdict.num_accepted == span.length:
            if finishes_block:
                # the causal K/V of the finished block, as fuse_commit writes them
                self.cache.commit(block.start + block.size - self.cache.length)
                if self.shifted:
                    self._next_token = (block.start + block.size, next_logits)
                else:
                    self._next_draft = ((block.start + block.size, 0), next_logits)
            elif finishes_unit:
                # offsets span.end.. read from the span's last row and the draft rows but the last; the committed
                # offsets before them get placeholder rows, as a draft's own are never read either
                rows = next_logits[:-1]
                self._next_draft = ((block.start, span.end), torch.cat([rows[:1].expand(span.end, -1), rows]))
        return verdict
