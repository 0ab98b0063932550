"""Mutation check: plant small deliberate bugs, one at a time, and report which ones the test suite catches.

A developer tool, not part of CI. Each mutation below replaces one exact piece of source text in a temporary copy of
the repository (``src/``, ``tests/``, ``pyproject.toml``, the documents); the real tree is never written. The
unmutated suite runs first (the baseline) and the script aborts if it fails; then every mutation gets a fresh copy
of the same snapshot, its edit, and one ``pytest -q -x`` run with ``PYTHONPATH=<copy>/src``, so the copy's package
is imported instead of the editable install (checked before every run: ``s2d2.__file__`` must lie in the copy).

Usage (from the repository root)::

    .venv/bin/python scripts/mutate.py                       # full sweep: the fast set, the slow tests for survivors
    .venv/bin/python scripts/mutate.py --list                # the mutations, and whether each still applies
    .venv/bin/python scripts/mutate.py --only greedy_accept_one_more sampled_residual_wrong
    .venv/bin/python scripts/mutate.py --tests tests/test_verify.py -k sampled --timeout 300

Cost: each mutation first runs the fast set (``make check``, about 90 s on the 2-core development machine when it
has it to itself); a caught mutation usually stops much earlier (``-x``). A mutation the fast set misses runs the
slow tests too (about 5 minutes in all, after one slow baseline) before it counts as missed. Run one sweep at a
time, alone on the CPU; it runs one pytest process, never several in parallel.

Output: a Markdown table ``| mutation | what it plants | caught | first failing test |`` on stdout, where caught
is ``yes`` (a test failed or errored), ``NO`` (the suite passed: a hole in the tests), ``stale`` (the ``old``
text no longer occurs exactly once, so the mutation must be rewritten against the current code), ``timeout``,
``invalid`` (the mutated file does not compile: a bug in the mutation itself), or ``error`` (pytest exit 3, 4
or 5: no verdict). Progress goes to stderr. The
exit code is 0 whatever the table says (it is a report); 1 if the baseline fails, 2 on a setup error.

Adding a mutation: copy the exact current text into ``old`` (enough of it to be unique in the file) and write a
``new`` that changes behaviour, not just formatting; ``--list`` shows at once whether it applies.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# What pytest needs from the repository root; the optional ones are copied when present, in case pytest
# configuration moves out of pyproject.toml or a root conftest appears, the documents tests/test_docs.py checks
# and the scripts tests run (scripts/device_check.py).
REQUIRED = ("src", "tests", "pyproject.toml")
OPTIONAL = ("setup.cfg", "pytest.ini", "tox.ini", "conftest.py", "README.md", "docs", "Makefile", "benchmarks",
            "scripts")
# Bytecode and caches of the real tree must not travel: a stale .pyc could shadow a mutated source.
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")


@dataclass(frozen=True)
class Mutation:
    """One planted bug: replace ``old`` (which must occur exactly once) by ``new`` in ``src/s2d2/<file>``."""

    name: str
    description: str
    file: str
    old: str
    new: str


MUTATIONS: list[Mutation] = [
    Mutation(
        "verify_ignores_top_p",
        "the verifier's q is computed with top_p = 1.0 while p keeps top_p",
        "core/forwards.py",
        "q, p = scored.probs[:span.length], draft.probs[span.start:span.end]",
        "q, p = __import__('s2d2.core.sampling').core.sampling.token_probs(scored.logits[:span.length], "
        "cfg.temperature, cfg.top_k, 1.0), draft.probs[span.start:span.end]",
    ),
    Mutation(
        "draft_ver_ignored",
        "draft forwards always use draft_ver=False (committed block prefix attends bidirectionally)",
        "families/sdar.py",
        "mask = draft_mask(pending, block_size, first_mask, cache_ver, draft_ver, self.device,\n"
        "                          self._prompt_rows(cache_len, pending), num_blocks)\n"
        "        positions = range(cache_len, end)\n"
        "        return ForwardSpec(ids[cache_len:end], positions, mask, num_store=pending, logits_from=pending)",
        "mask = draft_mask(pending, block_size, first_mask, cache_ver, False, self.device,\n"
        "                          self._prompt_rows(cache_len, pending), num_blocks)\n"
        "        positions = range(cache_len, end)\n"
        "        return ForwardSpec(ids[cache_len:end], positions, mask, num_store=pending, logits_from=pending)",
    ),
    Mutation(
        "commit_confident_reaches_into_the_verdict",
        "commit_confident also overwrites the verified positions with confident drafts",
        "core/forwards.py",
        "    candidates = [i for i in masked if i not in commits]\n",
        "    candidates = list(masked)\n",
    ),
    Mutation(
        "prefix_cache_commits_the_correction_row",
        "a verification's prefix commit also keeps the row of the rejected draft (the correction's position)",
        "core/forwards.py",
        "            end = span.start + verdict.num_accepted\n",
        "            end = min(span.start + verdict.num_accepted + 1, span.end)\n",
    ),
    Mutation(
        "prefix_cache_stores_the_first_mask_row",
        "a prefix-caching draft stores one row past the committed prefix (a mask's K/V)",
        "families/sdar.py",
        "            store = block_start + first_mask - cache_len\n",
        "            store = min(block_start + first_mask + 1, end) - cache_len\n",
    ),
    Mutation(
        "fuse_draft_threshold_ignored",
        "every verification that may finish the block carries the next block's draft rows, whatever the threshold",
        "core/forwards.py",
        "                                     or _all_accepted_estimate(draft, span) >= cfg.fuse_draft_threshold)\n",
        "                                     or True)\n",
    ),
    Mutation(
        "shifted_prefix_cache_swallows_the_query_row",
        "a shifted-logit family caches a fully accepted span to its end, so no row predicts the next mask",
        "core/forwards.py",
        "            if self.shifted:  # ... but the last token before the first mask stays a query row: it predicts the mask\n",
        "            if False:\n",
    ),
    Mutation(
        "draft_p_distorted",
        "sampled acceptance gets p ** 0.9 (renormalised) instead of the draft's own distribution",
        "core/forwards.py",
        "            q, p = scored.probs[:span.length], draft.probs[span.start:span.end]\n",
        "            q, p = scored.probs[:span.length], draft.probs[span.start:span.end] ** 0.9\n"
        "            p = p / p.sum(dim=-1, keepdim=True)\n",
    ),
    Mutation(
        "rmsnorm_rounding_order",
        "RMSNorm scales by the weight before casting back (same in float32, rounds differently in bfloat16)",
        "models/decoder.py",
        "return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight",
        "return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight.float()).to(x.dtype)",
    ),
    Mutation(
        "greedy_accept_one_more",
        "greedy acceptance commits the draft, not the verifier's argmax, at the first mismatch",
        "core/verify.py",
        "            return Verdict(i, t)\n",
        "            return Verdict(i, d)\n",
    ),
    Mutation(
        "sampled_residual_wrong",
        "the first rejection is resampled from q instead of the residual max(0, q - p)",
        "core/verify.py",
        "residual = (q_f - p.index_select(0, at)).clamp_min(0.0)",
        "residual = q_f.clamp_min(0.0)",
    ),
    Mutation(
        "sampled_ratio_inverted",
        "sampled acceptance tests u against min(1, p/q) instead of min(1, q/p)",
        "core/verify.py",
        "ratio = torch.clamp(q_d / p_d, max=1.0)",
        "ratio = torch.clamp(p_d / q_d.clamp_min(1e-12), max=1.0)",
    ),
    Mutation(
        "stop_string_not_cut",
        "generate keeps the text after a stop string (tokens and finish_reason still cut)",
        "api.py",
        'text, finish_reason, stats.num_tokens = text[:cut], "stop", len(token_ids)',
        'text, finish_reason, stats.num_tokens = text, "stop", len(token_ids)',
    ),
    Mutation(
        "fused_draft_stale",
        "a fused next draft or AR token (and the cache commit) is kept even when a draft was rejected",
        "core/forwards.py",
        "        if verdict.num_accepted == span.length:\n            if finishes_block:",
        "        if True:\n            if finishes_block:",
    ),
    Mutation(
        "stats_fused_counted_as_forward",
        "a draft fused into a verify forward is also counted as a draft forward",
        "core/forwards.py",
        "                self.stats.fused_drafts += 1\n                self._trace_forward(\"fused_draft\")\n",
        "                self.stats.fused_drafts += 1\n                self.stats.draft_forwards += 1\n"
        "                self._trace_forward(\"fused_draft\")\n",
    ),
    Mutation(
        "top_k_off_by_one",
        "top-k filtering keeps top_k + 1 tokens",
        "core/sampling.py",
        "top = torch.topk(logits, max(ks), dim=-1)",
        "top = torch.topk(logits, min(max(ks) + 1, vocab), dim=-1)",
    ),
    Mutation(
        "cache_commit_extra",
        "a verify that finishes a block (fuse_draft) commits one cache slot more than the block",
        "core/forwards.py",
        "keep_to = block.start + block.size  # the finished block's causal K/V",
        "keep_to = block.start + block.size + 1  # the finished block's causal K/V",
    ),
    Mutation(
        "commit_mask_ignores_cache_ver",
        "a commit forward (no fuse_commit) writes block-causal K/V even with cache_ver",
        "families/sdar.py",
        "mask = commit_mask(n, block_size, cache_ver, self.device, self._prompt_rows(cache_len, n))",
        "mask = commit_mask(n, block_size, False, self.device, self._prompt_rows(cache_len, n))",
    ),
    Mutation(
        "dynamic_threshold_ge",
        "dynamic unmasking commits candidates with confidence >= threshold instead of > threshold",
        "core/strategies.py",
        "confident = [i for i in candidates if confidence[i] > threshold]",
        "confident = [i for i in candidates if confidence[i] >= threshold]",
    ),
    Mutation(
        "router_skip_confident_inverted",
        "skip_confident skips verification of unconfident spans instead of confident ones",
        "core/routing.py",
        "if cfg.skip_confident and span_is_confident(draft.confidence, span, cfg.threshold):",
        "if cfg.skip_confident and not span_is_confident(draft.confidence, span, cfg.threshold):",
    ),
    Mutation(
        "hysteresis_sticks",
        "the hysteresis state never turns off: after a low score it still needs only score >= tau_off, not > tau_on",
        "core/routing.py",
        "return decision, replace(state, hysteresis_on=decision)",
        "return decision, replace(state, hysteresis_on=state.hysteresis_on or decision)",
    ),
    Mutation(
        "ucb_ties_to_skip",
        "UCB breaks ties (e.g. two unpulled arms) towards skip instead of verify",
        "core/routing.py",
        "return 1 if scores[1] >= scores[0] else 0",
        "return 1 if scores[1] > scores[0] else 0",
    ),
    Mutation(
        "ucb_reward_ignores_cost",
        "UCB reward is tokens committed, not divided by the 2 forwards a verified step costs",
        "core/routing.py",
        "rewards[i] += num_committed / (2.0 if verified else 1.0)",
        "rewards[i] += float(num_committed)",
    ),
    Mutation(
        "chat_template_ignores_kwargs",
        "apply_chat_template does not pass extra keyword arguments to the template",
        "api.py",
        "**{**self.template_tokens, **template_kwargs}, messages=messages,",
        "**self.template_tokens, messages=messages,",
    ),
    Mutation(
        "generation_config_ignored",
        "generate ignores the checkpoint's generation_config.json sampling defaults",
        "api.py",
        "        cfg = cfg.with_generation_defaults(self.generation_defaults)\n",
        "",
    ),
    Mutation(
        "mask_token_allowed_in_prompts",
        "a prompt holding the mask token is decoded instead of refused",
        "api.py",
        "        if mask_id in prompt_ids:",
        "        if False:",
    ),
    Mutation(
        "unexpected_tensors_dropped",
        "checkpoint tensors the model does not use are dropped silently",
        "models/decoder.py",
        "        if unexpected:\n",
        "        if False:\n",
    ),
    Mutation(
        "slot_range_ignores_gaps",
        "an attention group reads its keys from consecutive slots even when its rows' slots have gaps",
        "models/batching.py",
        "slot_range=(slots[0], slots[0] + b) if contiguous else None",
        "slot_range=(slots[0], slots[0] + b)",
    ),
    Mutation(
        "packed_order_not_restored",
        "the engine hands packed logits back in attention-group order, not in the rows' order",
        "engine/runner.py",
        "        out[k] = part",
        "        out[len(out) - 1 - k] = part",
    ),
    Mutation(
        "batched_commit_wrong_slot",
        "a batched forward commits every row's stored K/V into the first row's slot",
        "engine/runner.py",
        "        cache.slot(slot).commit(spec.num_store)",
        "        cache.slot(slots[0]).commit(spec.num_store)",
    ),
    Mutation(
        "freed_slot_not_reset",
        "a request that takes a freed slot starts on the previous request's committed cache",
        "models/cache.py",
        "        self.batch.lengths[self.index] = 0",
        "        pass",
    ),
    Mutation(
        "shifted_draft_unshifted",
        "a Fast-dLLM v2 draft reads offset i from row i instead of row i-1",
        "families/fast_dllm.py",
        "            return ForwardSpec(ids[cache_len:end], positions, mask, num_store=pending, logits_from=pending - 1,\n"
        "                               logits_to=pending + size - 1)",
        "            return ForwardSpec(ids[cache_len:end], positions, mask, num_store=pending, logits_from=pending,\n"
        "                               logits_to=pending + size)",
    ),
    Mutation(
        "ar_token_always_greedy",
        "a block's opening AR token is its argmax even when sampling (the reference's behaviour)",
        "core/forwards.py",
        "        (drawn,) = yield HostRead((Draw(scored.probs[:1], uniforms(1, generator, scored.probs.device)),))\n"
        "        return drawn.tokens[0]",
        "        return int(scored.logits[0].argmax())",
    ),
    Mutation(
        "sub_blocks_ignored",
        "the decoding unit is always the whole block (sub_block_size has no effect)",
        "core/state.py",
        "        if sub_block_size is None or sub_block_size >= self.size:",
        "        if True:",
    ),
    Mutation(
        "choices_margin_wrong",
        "the batched stage reports top-1 plus top-2 as the margin the margin estimators read",
        "core/sampling.py",
        "(top2[:, 0] - top2[:, 1]).double()",
        "(top2[:, 0] + top2[:, 1]).double()",
    ),
    Mutation(
        "sequence_host_tokens_stale",
        "a commit leaves the sequence's tokens (what the algorithm reads and the next forward's rows come from) as they were",
        "core/state.py",
        "        self.tokens[block.start:block.start + block.size] = block.tokens\n",
        "",
    ),
    Mutation(
        "choices_rows_shifted",
        "each row of a packed batch gets the greedy choices of the rows one place further",
        "engine/runner.py",
        "        bounds[k], start = (start, start + count, specs[k].pad_front), start + count",
        "        bounds[k], start = (start + 1, start + 1 + count, specs[k].pad_front), start + count",
    ),
    Mutation(
        "row_seeds_shared",
        "every row of a generate call draws from the same seed instead of seed + i",
        "api.py",
        "return [row_seed(seed, j // choices, j % choices) for j in range(count)]",
        "return [row_seed(seed, 0, j % choices) for j in range(count)]",
    ),
    Mutation(
        "edits_reach_the_prompt",
        "token editing may also replace the prompt's tokens inside the first block",
        "core/loop.py",
        "    return {i: draft.tokens[i] for i in range(block.num_prompt, block.end)",
        "    return {i: draft.tokens[i] for i in range(0, block.end)",
    ),
    Mutation(
        "fused_commit_despite_editing",
        "a verification may commit a block's K/V while editing can still change the block",
        "core/forwards.py",
        "cfg.fuse_commit and cfg.editing_threshold is None",
        "cfg.fuse_commit",
    ),
    Mutation(
        "pipelined_verified_step_tops_up_every_block",
        "pipelined S2D2: after a verification every block in flight also commits as in a skipped step (the "
        "reference's top-up of fully activated blocks, and confident drafts)",
        "core/loop.py",
        "        for j in range(count) if verdict is None else ():",
        "        for j in range(count):",
    ),
    Mutation(
        "pipelined_add_rule_strict",
        "pipelining opens the next block only when the last one's share exceeds block_add_threshold (D2F: reaches)",
        "core/loop.py",
        "_decoded_share(last) >= cfg.block_add_threshold",
        "_decoded_share(last) > cfg.block_add_threshold",
    ),
    Mutation(
        "pipelined_activation_threshold",
        "pipelining activates a block on block_add_threshold instead of decoded_token_threshold",
        "core/loop.py",
        ">= cfg.decoded_token_threshold:",
        ">= cfg.block_add_threshold:",
    ),
    Mutation(
        "pipelined_blocks_survive_a_stop",
        "pipelining keeps the blocks after a committed stop token in flight",
        "core/loop.py",
        "        count = min(count, -(-(seq.limit - front) // size))",
        "        count = count",
    ),
    Mutation(
        "d2f_prompt_block_causal",
        "D2F: the prompt is prefilled block-causally instead of as one bidirectional chunk",
        "families/sdar.py",
        "        return pending if self.blocks_from_prompt_end and cache_len == 0 else 0",
        "        return 0",
    ),
    Mutation(
        "dp_seed_not_shifted",
        "data-parallel: a rank's seeded config is not shifted by its shard's start (row i draws from seed + local i)",
        "evaluation/distributed.py",
        "shard_cfg = cfg.replace(seed=cfg.seed + start) if cfg.seed is not None else cfg",
        "shard_cfg = cfg",
    ),
    Mutation(
        "dp_gathered_out_of_order",
        "data-parallel: the ranks' outputs are gathered in reverse rank order",
        "evaluation/distributed.py",
        "        return [g for part, _ in parts for g in part]",
        "        return [g for part, _ in reversed(parts) for g in part]",
    ),
    Mutation(
        "loglikelihood_reads_the_wrong_rows",
        "log-likelihoods read each continuation token from the row after its own",
        "api.py",
        "logp = torch.log_softmax(logits[:len(target)].float(), dim=-1)",
        "logp = torch.log_softmax(torch.roll(logits, -1, 0)[:len(target)].float(), dim=-1)",
    ),
    Mutation(
        "tune_budget_ignored",
        "tune counts every setting as within the accuracy budget",
        "evaluation/tune.py",
        'r["within_budget"] = r["accuracy"] >= ar_accuracy - max_drop / 100 - 1e-12',
        'r["within_budget"] = True',
    ),
    Mutation(
        "trace_correction_labelled_accepted",
        "traces label the verifier's correction as an accepted draft",
        "core/loop.py",
        "span.start <= offset < span.start + verdict.num_accepted\n",
        "span.start <= offset <= span.start + verdict.num_accepted\n",
    ),
    Mutation(
        "trace_fused_forwards_counted",
        "traces record a draft that rode along a verification as a forward of its own",
        "core/forwards.py",
        'self._trace_forward("fused_draft")',
        'self._trace_forward("draft")',
    ),
    Mutation(
        "length_buckets_unsorted",
        "length-bucketed training batches are cut from the pool without sorting it by length",
        "training/train.py",
        "pool = sorted(pool, key=lambda i: (len(examples[i].prompt) + len(examples[i].response), i))",
        "pool = list(pool)",
    ),
    Mutation(
        "length_buckets_pool_per_step",
        "every step of a bucket group draws its own pool (examples repeat and others are skipped)",
        "training/train.py",
        "pool_rng = np.random.default_rng([cfg.seed, step // k, 1])",
        "pool_rng = np.random.default_rng([cfg.seed, step, 1])",
    ),
    Mutation(
        "lm_eval_task_split_ignored",
        "the lm-eval generation tasks serve the test split whatever split their yaml names",
        "evaluation/lm_eval_tasks/s2d2_arith.py",
        'return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows(split)),',
        'return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows("test")),',
    ),
    Mutation(
        "train_compile_ignored",
        "s2d2 train --compile runs eager steps",
        "training/train.py",
        "    if cfg.compile:\n        model.compile()",
        "    if False:\n        model.compile()",
    ),
    Mutation(
        "wordy_reversed_pair_anywhere",
        "an against-time-order pair told in main clauses may be followed by more events ('Then ...' is ambiguous)",
        "evaluation/tasks/wordy.py",
        "rev_ok = sub_ok and i + 2 == len(cls)",
        "rev_ok = sub_ok",
    ),
    Mutation(
        "post_steps_one_too_many",
        "token editing runs max_post_steps + 1 editing-only steps (k must allow exactly k, 0 none)",
        "core/loop.py",
        "if not (edited and post_steps < cfg.max_post_steps):",
        "if not (edited and post_steps <= cfg.max_post_steps):",
    ),
    Mutation(
        "stream_holds_back_one_stop_character",
        "the stream holds back only a one-character start of a stop string, not every prefix",
        "serve/streaming.py",
        "for k in range(1, len(s)) if text[:safe]",
        "for k in range(1, min(len(s), 2)) if text[:safe]",
    ),
    Mutation(
        "loglikelihood_continuation_encoded_alone",
        "lm-eval log-likelihoods score the continuation encoded alone, not the tail of encode(context + continuation)",
        "evaluation/lm_eval.py",
        "        return head, whole[len(head):]",
        "        return head, self.model.encode(continuation)",
    ),
    Mutation(
        "trace_draft_positions_shifted",
        "a trace's draft positions are one to the right of the offsets drafted",
        "core/trace.py",
        '{"positions": [start + i for i in offsets]',
        '{"positions": [start + i + 1 for i in offsets]',
    ),
    Mutation(
        "packed_kernel_skips_the_residual",
        "the packed forward's dense block returns the MLP output without the residual stream",
        "models/decoder.py",
        "    return x + down(F.silu(gate) * up)",
        "    return down(F.silu(gate) * up)",
    ),
    Mutation(
        "non_streamed_disconnect_not_watched",
        "a non-streamed request whose client went away is not cancelled (decodes to its end)",
        "serve/app.py",
        "    for t in tickets:\n        worker.cancel(t)\n\n\nasync def _collect(",
        "    pass\n\n\nasync def _collect(",
    ),
    Mutation(
        "dead_engine_requests_hang",
        "an engine process that dies does not fail its in-flight requests",
        "serve/worker.py",
        "        for key in lost:\n            self._finish(key, EngineGone(f\"exit code {code}\"))",
        "        pass",
    ),
    Mutation(
        "api_key_not_checked",
        "a server started with an API key serves requests without one",
        "serve/app.py",
        "    if key is None:\n        return",
        "    if True:\n        return",
    ),
    Mutation(
        "quiet_request_loses_its_end",
        "the engine core drops the final event of a non-streamed request too",
        "serve/core.py",
        "(not event.finished and event.request_id in self.quiet)",
        "(event.request_id in self.quiet)",
    ),
    Mutation(
        "seed_bound_ignores_n",
        "a request's seed may be up to 2**63 - 1 whatever n (choice k's seed passes the bound)",
        "serve/protocol.py",
        "0 <= body.seed <= SEED_MAX - body.n",
        "0 <= body.seed <= SEED_MAX",
    ),
    Mutation(
        "checkpoint_map_kept_open",
        "the loader reads a whole safetensors file through one memory map (its pages stay resident beside the model)",
        "checkpoint.py",
        "self._read >= READ_BUDGET:",
        "self._read >= READ_BUDGET * 1_000_000:",
    ),
    Mutation(
        "own_buffers_never_released",
        "a long request's own K/V buffers outlive it",
        "models/cache.py",
        "        self.own.pop(index, None)",
        "        pass",
    ),
    Mutation(
        "own_rows_lose_their_keys",
        "a row with its own buffers writes zeros for its keys",
        "models/decoder.py",
        "                    keys[:, g.own_start:end] = k[g.rows].transpose(0, 1)",
        "                    keys[:, g.own_start:end] = 0",
    ),
    Mutation(
        "plan_ignores_the_margin",
        "batch size auto fills all the free memory, keeping nothing back",
        "engine/memory.py",
        "usable = int(free * (1 - MARGIN))",
        "usable = int(free)",
    ),
    Mutation(
        "long_request_never_waits",
        "a long request that could fit once other long requests end is refused instead of waiting",
        "engine/engine.py",
        "        if need <= free + held:",
        "        if False:",
    ),
    Mutation(
        "shared_weights_copied",
        "a decoder over a transformers model copies its weights instead of sharing them",
        "models/decoder.py",
        "setattr(module, attr, nn.Parameter(tensor.detach(), requires_grad=False))  # the same storage",
        "setattr(module, attr, nn.Parameter(tensor.detach().clone(), requires_grad=False))",
    ),
    Mutation(
        "split_parts_out_of_order",
        "a shared q/k/v or gate/up runs its parts in the checkpoint's name order, not the fused matrix's",
        "models/decoder.py",
        "for _, name in sorted(parts)]",
        "for _, name in sorted(parts, key=lambda part: part[1])]",
    ),
    Mutation(
        "sampled_reads_handed_to_the_wrong_rows",
        "the step's one transfer hands each sampled row the values another row asked for",
        "engine/engine.py",
        "            for row, result in zip(reading, results(values[len(tables):])):",
        "            for row, result in zip(reading, (lambda r: r[1:] + r[:1])(results(values[len(tables):]))):",
    ),
    Mutation(
        "sampled_first_rejection_from_the_end",
        "sampled acceptance takes the last rejected offset as the first",
        "core/verify.py",
        "    first = length.scatter_reduce(0, span, torch.where(rejected, offset, length[span]), \"amin\")",
        "    first = torch.full_like(length, -1).scatter_reduce(0, span, torch.where(rejected, offset, -1), \"amax\")\n"
        "    first = torch.where(first < 0, length, first)",
    ),
    Mutation(
        "sampled_carried_draft_redrawn_from_the_verifier",
        "a sampled verification's carried next draft is drawn from the verifier's rows, not the rows after the span",
        "core/forwards.py",
        "ahead_probs = None if ahead_rows is None else ahead_rows.probs",
        "ahead_probs = None if ahead_rows is None else scored.probs[:span.length].repeat(len(ahead_rows.probs), 1)"
        "[:len(ahead_rows.probs)]",
    ),
    Mutation(
        "filter_rows_take_the_first_rows_sampling",
        "the step's filter gives every row the first row's temperature / top-k / top-p",
        "core/sampling.py",
        "    if all(v == values[0] for v in values):\n        return float(values[0])",
        "    return float(values[0])",
    ),
    Mutation(
        "draw_takes_a_zero_probability_token",
        "the inverse-CDF draw takes the first token whose cumulative sum reaches u (a token of probability 0 can win)",
        "core/sampling.py",
        "return torch.searchsorted(cdf, at[:, None], right=True).squeeze(-1)",
        "return torch.searchsorted(cdf, at[:, None], right=False).squeeze(-1)",
    ),
    Mutation(
        "sampler_hands_rows_each_others_uniforms",
        "the step's sampler draws each row's tokens at uniforms another row took from its generator",
        "core/sampler.py",
        "u = torch.cat([d.u for d in draws]) if len(draws) > 1 else draws[0].u",
        "u = torch.cat([d.u for d in draws]).flip(0) if len(draws) > 1 else draws[0].u",
    ),
    Mutation(
        "sampled_probs_of_the_wrong_rows",
        "in a batch mixing greedy and sampled rows, a sampled row gets the distributions of other logit rows",
        "engine/engine.py",
        "        out[k] = pad_rows(probs[at:at + b - a], bounds[k][2])",
        "        out[k] = pad_rows(probs[a:b] if len(probs[a:b]) == b - a else probs[at:at + b - a], bounds[k][2])",
    ),
    Mutation(
        "to_device_blocks",
        "host values are copied to a CUDA device with a blocking copy from pageable memory (waits for the stream)",
        "transfer.py",
        "    return host.pin_memory().to(device, non_blocking=True)",
        "    return host.to(device)",
    ),
    Mutation(
        "estimator_reads_undeclared_feature",
        "the paper's estimator is declared to read the margin: the executor computes the margin, not the entropy it "
        "reads",
        "core/acceptance.py",
        '    "soft_entropy_negexp": frozenset({"entropy"}),',
        '    "soft_entropy_negexp": frozenset({"margin"}),',
    ),
    Mutation(
        "ucb_reads_no_features",
        "the UCB policy is taken to read no feature: its rows' entropies are never computed",
        "core/routing.py",
        '        return frozenset({"entropy"})',
        '        return frozenset()',
    ),
    Mutation(
        "commit_mask_rebuilt_per_row",
        "a commit forward's mask is a new tensor each time (not a cached one the step's rows share): its padded table "
        "is built again for every row, every step",
        "families/sdar.py",
        "        mask = commit_mask(n, block_size, cache_ver, self.device, self._prompt_rows(cache_len, n))",
        "        mask = draft_mask(n, block_size, 0, cache_ver, False, self.device, self._prompt_rows(cache_len, n))"
        "[:n, :n]",
    ),
    Mutation(
        "shared_experts_gate_and_up_swapped",
        "a shared MoE expert runs its up projection as the gate and the gate as up",
        "models/decoder.py",
        'kind = "down" if part is None else "gate" if part.start == 0 else "up"',
        'kind = "down" if part is None else "up" if part.start == 0 else "gate"',
    ),
    Mutation(
        "restart_never_pauses",
        "an engine that keeps dying is restarted at once every time (a restart loop)",
        "serve/worker.py",
        "        pause = RESTART_BACKOFF_S * 2 ** (self._quick_deaths - 2) if self._quick_deaths > 1 else 0.0",
        "        pause = 0.0",
    ),
    Mutation(
        "stream_interval_ignored",
        "the engine sends every step's progress at once whatever --stream-interval says",
        "serve/core.py",
        "        if final or not running or now - self.sent_at >= self.interval:",
        "        if True:",
    ),
    Mutation(
        "held_progress_loses_tokens",
        "two held progress events of a request keep only the later one's tokens",
        "serve/core.py",
        "return Event(first.request_id, first.new_token_ids + then.new_token_ids, trace_events=trace)",
        "return Event(first.request_id, then.new_token_ids, trace_events=trace)",
    ),
    Mutation(
        "redraft_routed_like_a_draft",
        "a redraft goes through the routing policy, which may commit its guesses unverified",
        "core/forwards.py",
        "        if draft.redraft:  # always verified",
        "        if False:  # always verified",
    ),
    Mutation(
        "sampled_redraft_keeps_the_old_p",
        "a sampled redraft is accepted against the replaced draft's distribution instead of the rows it was drawn from",
        "core/forwards.py",
        "torch.cat([draft.probs[:a], redraft.probs[after:], draft.probs[b:]])",
        "draft.probs",
    ),
    Mutation(
        "large_masks_cached",
        "every attention mask is cached, a long prompt's prefill mask too",
        "models/batching.py",
        "        if mask.numel() <= self.max_elements:",
        "        if True:",
    ),
]



@dataclass
class Result:
    mutation: Mutation
    caught: str  # yes / NO / stale / timeout / invalid / error
    detail: str  # first failing test, or why the mutation was not run
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ helpers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mutated_text(m: Mutation, source: str) -> tuple[str | None, str]:
    """The file's text with ``m`` applied, or None and why it does not apply (stale / invalid)."""
    if not m.old:
        return None, "placeholder: old/new not filled in yet"
    count = source.count(m.old)
    if count != 1:
        # Exactly once: zero means the code moved on, several means the edit would be ambiguous.
        return None, f"old text occurs {count} times in {m.file}"
    text = source.replace(m.old, m.new, 1)
    if text == source:
        return None, "new text equals old text"
    try:
        compile(text, m.file, "exec")
    except SyntaxError as e:
        return None, f"mutated {m.file} does not compile: {e.msg} (line {e.lineno})"
    return text, ""


def check(m: Mutation, src_pkg: Path) -> tuple[str | None, str, str]:
    """``(mutated text, status, reason)``: status is "" when the mutation applies, else stale / invalid."""
    path = src_pkg / m.file
    if not path.is_file():
        return None, "stale", f"no file src/s2d2/{m.file}"
    text, why = mutated_text(m, path.read_text(encoding="utf-8"))
    if text is not None:
        return text, "", ""
    return None, "invalid" if "compile" in why else "stale", why


def snapshot(repo: Path, dest: Path) -> None:
    """Copy what pytest needs from ``repo`` to ``dest`` (taken once, so every run tests the same code even while
    others edit the real tree)."""
    dest.mkdir(parents=True)
    for name in REQUIRED + OPTIONAL:
        src = repo / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORE)
        elif src.is_file():
            shutil.copy2(src, dest / name)
        elif name in REQUIRED:
            raise SystemExit(f"mutate: {src} is missing; is --repo the repository root?")


def run_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy / "src")  # replaces, not prepends: an inherited path to the real src would win
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def assert_imports_copy(python: str, copy: Path) -> None:
    """Abort unless ``import s2d2`` in the copy's environment resolves to the copy, not the editable install."""
    proc = subprocess.run([python, "-c", "import s2d2; print(s2d2.__file__)"], cwd=copy, env=run_env(copy),
                          capture_output=True, text=True, timeout=300)
    where = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not where or not Path(where).resolve().is_relative_to(copy.resolve()):
        log(proc.stderr[-2000:])
        raise SystemExit(f"mutate: in the copy, s2d2 imports from {where or '(import failed)'}, not from {copy}; "
                         "aborting so that no result is reported for the wrong code.")


_FAIL_LINE = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$")


def first_failure(output: str) -> str:
    """The first ``FAILED``/``ERROR`` node id of pytest's short summary (``-rfE``)."""
    for line in output.splitlines():
        m = _FAIL_LINE.match(line.strip())
        if m:
            return m.group(1)
    return ""


# The fast set (``make check``) first; a mutation it misses gets the slow tests too before it counts as missed.
FAST, SLOW = "not slow and not gpu", "slow and not gpu"


def run_pytest(python: str, copy: Path, basetemp: Path, tests: list[str], keyword: str | None,
               timeout: float, markers: str = FAST) -> tuple[int | None, str, float]:
    """One pytest run in ``copy`` over the tests ``markers`` selects; returns (exit code or None on timeout,
    output, seconds)."""
    cmd = [python, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
           "-m", markers]
    if keyword:
        cmd += ["-k", keyword]
    cmd += tests
    t0 = time.monotonic()
    # A session of its own, so that a timeout ends pytest together with the subprocesses some tests start.
    proc = subprocess.Popen(cmd, cwd=copy, env=run_env(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        return None, out or "", time.monotonic() - t0
    except BaseException:  # Ctrl-C: never leave our pytest (and what it started) running
        _kill_group(proc)
        proc.communicate()
        raise


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the process group led by ``proc`` (the one this script started; it is its own session leader)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def fresh_copy(snap: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(snap, dest)
    return dest


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(results: list[Result]) -> str:
    lines = ["| mutation | what it plants | caught | first failing test |", "|---|---|---|---|"]
    for r in results:
        detail = f"`{r.detail}`" if r.caught == "yes" and r.detail and not r.detail.startswith("(") else r.detail
        lines.append(f"| `{r.mutation.name}` | {cell(r.mutation.description)} | {r.caught} | {cell(detail)} |")
    live = [r for r in results if r.caught not in ("stale", "invalid")]
    caught = sum(r.caught == "yes" for r in results)
    counts = {k: sum(r.caught == k for r in results) for k in ("NO", "timeout", "stale", "invalid", "error")}
    rest = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    lines.append("")
    lines.append(f"Total: {caught} of {len(live)} applied mutations caught ({len(results)} listed"
                 f"{'; ' + rest if rest else ''}).")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    default_repo = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=default_repo, help=f"repository root (default {default_repo})")
    ap.add_argument("--list", action="store_true", help="list the mutations and whether each applies; run nothing")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    ap.add_argument("--tests", nargs="+", metavar="PATH", default=[],
                    help="test files or node ids, relative to the repo root (default: the configured testpaths)")
    ap.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression (baseline uses it too)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    ap.add_argument("--python", default=sys.executable, help="interpreter with pytest and the dependencies "
                                                             "(default: the one running this script)")
    args = ap.parse_args(argv)
    repo: Path = args.repo.resolve()

    names = [m.name for m in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    selected = MUTATIONS
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            ap.error(f"unknown mutation(s): {', '.join(unknown)}; see --list")
        selected = [m for m in MUTATIONS if m.name in args.only]

    if args.list:
        pkg = repo / "src" / "s2d2"
        print("| mutation | file | applies | what it plants |\n|---|---|---|---|")
        for m in selected:
            _, status, why = check(m, pkg)
            print(f"| `{m.name}` | {m.file} | {'yes' if not status else f'{status}: {cell(why)}'} "
                  f"| {cell(m.description)} |")
        return 0

    for t in args.tests:
        if not (repo / t.split("::")[0]).exists():
            ap.error(f"no such test path in {repo}: {t}")

    with tempfile.TemporaryDirectory(prefix="s2d2-mutate-") as tmp_name:
        tmp = Path(tmp_name)
        snap = tmp / "snapshot"
        log(f"mutate: copying {repo} -> {snap}")
        snapshot(repo, snap)
        pkg = snap / "src" / "s2d2"
        work = tmp / "work"

        what = " ".join(args.tests) or "the configured testpaths"
        log(f"mutate: baseline ({what}{', -k ' + args.keyword if args.keyword else ''}) ...")
        fresh_copy(snap, work)
        assert_imports_copy(args.python, work)
        rc, out, secs = run_pytest(args.python, work, tmp / "basetemp-baseline", args.tests, args.keyword,
                                   args.timeout)
        if rc != 0:
            log(out[-4000:])
            why = "timed out" if rc is None else "selected no tests" if rc == 5 else f"failed (pytest exit {rc})"
            log(f"mutate: the baseline {why}; "
                "no mutation results would mean anything. Aborting.")
            return 1
        summary = out.strip().splitlines()[-1] if out.strip() else ""
        log(f"mutate: baseline passed in {secs:.0f} s ({summary})")
        slow_baseline: bool | None = None  # run once, when the first mutation survives the fast set

        results: list[Result] = []
        for n, m in enumerate(selected, 1):
            prefix = f"mutate: [{n}/{len(selected)}] {m.name}"
            text, status, why = check(m, pkg)
            if text is None:
                log(f"{prefix}: {status} ({why})")
                results.append(Result(m, status, why))
                continue
            fresh_copy(snap, work)
            (work / "src" / "s2d2" / m.file).write_text(text, encoding="utf-8")
            assert_imports_copy(args.python, work)
            log(f"{prefix}: running ...")
            rc, out, secs = run_pytest(args.python, work, tmp / f"basetemp-{n}", args.tests, args.keyword,
                                       args.timeout)
            tier = ""
            if rc == 0:  # missed by the fast set: the slow tests decide, once their own baseline passed
                if slow_baseline is None:
                    clean = fresh_copy(snap, tmp / "slow-baseline")
                    s_rc, s_out, s_secs = run_pytest(args.python, clean, tmp / "basetemp-slow", args.tests,
                                                     args.keyword, args.timeout, SLOW)
                    slow_baseline = s_rc in (0, 5)  # 5: the selection holds no slow test
                    log(f"mutate: slow baseline {'passed' if slow_baseline else 'FAILED'} in {s_secs:.0f} s")
                    if not slow_baseline:
                        log(s_out[-2000:])
                if slow_baseline:
                    rc, out, more = run_pytest(args.python, work, tmp / f"basetemp-{n}-slow", args.tests,
                                               args.keyword, args.timeout, SLOW)
                    secs += more
                    rc, tier = (0, "") if rc == 5 else (rc, " (slow set)")
            if rc is None:
                r = Result(m, "timeout", f"(no result after {args.timeout:.0f} s)", secs)
            elif rc == 0:
                r = Result(m, "NO", "", secs)
            elif rc in (1, 2):  # 1: a test failed; 2: collection/import error or interrupted by -x on an error
                r = Result(m, "yes", (first_failure(out) or f"(pytest exit {rc}, no test named)") + tier, secs)
            else:  # 3 internal error, 4 usage error, 5 nothing collected: not a verdict on the mutation
                r = Result(m, "error", f"(pytest exit {rc})", secs)
                log(out[-2000:])
            log(f"{prefix}: {r.caught} {r.detail} ({secs:.0f} s)")
            results.append(r)
        shutil.rmtree(work, ignore_errors=True)

    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
