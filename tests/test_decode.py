"""End-to-end invariants of the decoding loop on tiny random SDAR models (design.md, invariants 1, 2, 4, 5, 6)."""

from __future__ import annotations

import random

import pytest
import torch
from single_row import run_draft, run_verify

import s2d2
from s2d2 import DecodeConfig
from s2d2.engine.runner import decode

ALWAYS_VERIFY = dict(method="s2d2", policy="mask_span_length", min_span=1, cache_ver=True, temperature=0.0)


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(length)]  # byte tokens; no special ids


def run(model: s2d2.Model, ids: list[int], **cfg) -> s2d2.Generation:
    cfg.setdefault("stop_token_ids", ())
    return model.generate(ids, DecodeConfig(**cfg))[0]


# ------------------------------------------------------------------------------- invariant 2: lossless greedy
@pytest.mark.parametrize("block_size", [2, 4, 8, 16])
@pytest.mark.parametrize("draft_ver", [True, False])
def test_greedy_s2d2_verifying_every_step_equals_ar(random_models, block_size, draft_ver):
    for m_index, m in enumerate(random_models):
        for prompt_len in (1, 3, 5, 10):
            ids = prompt(prompt_len, seed=100 * m_index + prompt_len)
            ar = run(m, ids, method="ar", max_new_tokens=40)
            sd = run(m, ids, block_size=block_size, draft_ver=draft_ver, max_new_tokens=40, **ALWAYS_VERIFY)
            assert sd.token_ids == ar.token_ids, (m_index, prompt_len)
            assert len(ar.token_ids) == 40 and ar.finish_reason == "length"
            assert sd.stats.verify_forwards == sd.stats.steps == sd.stats.draft_forwards + sd.stats.fused_drafts  # verified every step
            assert sd.stats.fallback_tokens == 0


def test_lossless_greedy_holds_for_every_policy_that_never_skips(model):
    ids = prompt(6, seed=7)
    ar = run(model, ids, method="ar", max_new_tokens=24)
    never_skip = [
        dict(policy="score_threshold", score_type="difference_static", penalty=0.0, tau=0.0),  # paper config B
        dict(policy="score_hysteresis", score_type="difference_static", penalty=0.0, tau_on=-1.0, tau_off=-2.0),
    ]
    for extra in never_skip:
        cfg = {**ALWAYS_VERIFY, **extra, "block_size": 4, "max_new_tokens": 24}
        out = run(model, ids, **cfg)
        assert out.token_ids == ar.token_ids, extra
        assert out.stats.verify_forwards == out.stats.steps


def test_skip_confident_interpolates_between_dynamic_and_s2d2(model):
    ids = prompt(6, seed=5)
    base = dict(method="s2d2", block_size=8, max_new_tokens=40, policy="mask_span_length", min_span=1)
    never = run(model, ids, **base, threshold=0.0, skip_confident=True)  # every span clears 0: never verifies
    dynamic = run(model, ids, method="dynamic", block_size=8, max_new_tokens=40, threshold=0.0)
    assert never.token_ids == dynamic.token_ids and never.stats.verify_forwards == 0
    always = run(model, ids, **base, threshold=1.0, skip_confident=True)  # nothing clears 1: the policy decides
    assert always.token_ids == run(model, ids, **base, threshold=1.0).token_ids
    assert always.stats.verify_forwards == always.stats.steps


def test_lossless_greedy_needs_an_ar_consistent_cache(random_models):
    """Without cache_ver the verifier reads block-bidirectional K/V: an approximation, and it shows."""
    differs = 0
    for m in random_models:
        ids = prompt(5, seed=3)
        ar = run(m, ids, method="ar", max_new_tokens=32)
        sd = run(m, ids, **{**ALWAYS_VERIFY, "cache_ver": False}, block_size=4, max_new_tokens=32)
        differs += sd.token_ids != ar.token_ids
    assert differs > 0


def test_stop_token_ends_generation_at_the_same_place(model):
    ids = prompt(5, seed=11)
    free = run(model, ids, method="ar", max_new_tokens=30)
    stop = free.token_ids[12]
    first = free.token_ids.index(stop)
    ar = run(model, ids, method="ar", max_new_tokens=30, stop_token_ids=(stop,))
    sd = run(model, ids, **ALWAYS_VERIFY, block_size=8, max_new_tokens=30, stop_token_ids=(stop,))
    assert ar.token_ids == free.token_ids[:first] == sd.token_ids
    assert ar.finish_reason == sd.finish_reason == "stop"
    assert ar.stats.draft_forwards == first + 1  # nothing decoded past the stop token


@pytest.mark.parametrize("cfg", [dict(method="ar"), dict(ALWAYS_VERIFY, block_size=8),
                                 dict(method="dynamic", block_size=4, threshold=0.5)])
def test_stop_strings_cut_the_text_and_end_decoding_with_their_block(model, cfg):
    ids = prompt(5, seed=11)
    free = run(model, ids, max_new_tokens=48, **cfg)
    text = free.text
    stop = next(c for c in text[len(text) // 3:] if c.isascii() and c.isprintable() and c != " ")
    cut = text.find(stop)
    out = run(model, ids, max_new_tokens=48, stop=[stop, "never-generated-string"], **cfg)
    assert out.text == text[:cut] and out.finish_reason == "stop"
    assert stop in model.decode(out.token_ids) and stop not in model.decode(out.token_ids[:-1])
    assert out.token_ids == free.token_ids[:len(out.token_ids)] and out.stats.num_tokens == len(out.token_ids)
    # decoding ended with the block holding the stop string: no draft past it
    b = DecodeConfig(**cfg).block_size
    blocks_needed = -(-(len(ids) + len(out.token_ids)) // b) - len(ids) // b
    assert out.stats.draft_forwards <= blocks_needed * b and out.stats.draft_forwards < free.stats.draft_forwards


def test_max_new_tokens_is_exact_for_every_method(model):
    ids = prompt(3, seed=5)
    for cfg in (dict(method="ar"), dict(method="static", block_size=8, steps=4),
                dict(method="dynamic", block_size=8, threshold=0.1), dict(ALWAYS_VERIFY, block_size=16)):
        for n in (1, 7, 13):
            out = run(model, ids, max_new_tokens=n, **cfg)
            assert len(out.token_ids) == n, (cfg, n)


# ----------------------------------------------------------------------------- invariant 4: never verify
@pytest.mark.parametrize("block_size,steps,threshold", [(4, 4, 0.1), (8, 8, 0.05), (8, 4, 0.2), (16, 8, 0.1)])
def test_never_verifying_s2d2_is_exactly_dynamic(model, block_size, steps, threshold):
    ids = prompt(7, seed=block_size)
    common = dict(block_size=block_size, steps=steps, threshold=threshold, max_new_tokens=48)
    dynamic = run(model, ids, method="dynamic", **common)
    for never in (dict(policy="mask_span_length", min_span=block_size + 1),
                  dict(policy="score_threshold", tau=1e8)):
        s2d2_run = run(model, ids, method="s2d2", **never, **common)
        assert s2d2_run.token_ids == dynamic.token_ids
        assert s2d2_run.stats.nfe == dynamic.stats.nfe
        assert s2d2_run.stats.verify_forwards == 0
    assert dynamic.stats.draft_forwards < 48  # the threshold committed several tokens in some steps


def test_static_commits_exactly_the_quota(model):
    out = run(model, prompt(4, seed=2), method="static", block_size=8, steps=2, max_new_tokens=32)
    assert out.stats.draft_forwards == 8  # 4 blocks x 2 steps, 4 tokens a step
    assert out.stats.nfe == 8


# ---------------------------------------------------------------------------------- fused == unfused
@pytest.mark.parametrize("cfg", [dict(method="ar"), dict(method="dynamic", threshold=0.1, block_size=4),
                                 dict(ALWAYS_VERIFY, block_size=4), dict(ALWAYS_VERIFY, block_size=8, cache_ver=False)])
def test_fused_commit_gives_the_same_tokens_with_fewer_forwards(model, cfg):
    ids = prompt(9, seed=4)
    fused = run(model, ids, max_new_tokens=30, **cfg)
    unfused = run(model, ids, max_new_tokens=30, fuse_commit=False, **cfg)
    assert fused.token_ids == unfused.token_ids
    b = DecodeConfig(**{k: v for k, v in cfg.items()}).block_size
    first_block = 9 // b * b
    blocks = len(range(first_block, 9 + 30, b))
    # unfused: a prefill forward (if the prompt has a whole block), and a commit forward before every later block
    assert unfused.stats.prefill_forwards == (1 if first_block > 0 else 0)
    assert unfused.stats.commit_forwards == blocks - 1
    # each draft that rode along a verify (fuse_draft, off without fuse_commit) is one more forward unfused
    assert unfused.stats.nfe == fused.stats.nfe + fused.stats.fused_drafts + unfused.stats.prefill_forwards + blocks - 1
    assert fused.stats.prefill_forwards == fused.stats.commit_forwards == 0


@pytest.mark.parametrize("block_size", [2, 4, 8, 16])
@pytest.mark.parametrize("policy", [dict(ALWAYS_VERIFY), dict(method="s2d2"), dict(method="s2d2", threshold=0.3)])
def test_fused_draft_gives_the_same_tokens_with_fewer_forwards(random_models, block_size, policy):
    for m in random_models:
        for length in (1, 5, 10):
            ids = prompt(length, seed=length + block_size)
            fused = run(m, ids, max_new_tokens=40, block_size=block_size, **policy)
            plain = run(m, ids, max_new_tokens=40, block_size=block_size, fuse_draft=False, **policy)
            assert fused.token_ids == plain.token_ids
            assert fused.stats.verify_forwards == plain.stats.verify_forwards
            assert fused.stats.draft_forwards + fused.stats.fused_drafts == plain.stats.draft_forwards
            assert fused.stats.steps == plain.stats.steps == fused.stats.draft_forwards + fused.stats.fused_drafts
            assert plain.stats.fused_drafts == 0


def test_fuse_draft_threshold_changes_no_token_only_which_verifications_carry_the_next_draft():
    """The next block's rows ride along only when the span's draft confidences multiply to the threshold; tokens are
    the same whatever it is, and a higher threshold trades fused drafts for fewer rows."""
    from s2d2.evaluation.tasks import arith

    m = s2d2.load("bundled")
    prompts = [p.prompt for p in arith.generate("test", 20, seed=0)]
    runs = [m.generate(prompts, DecodeConfig(method="s2d2", block_size=8, penalty=0.0, fuse_draft_threshold=t))
            for t in (0.0, 0.5, 1.0)]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]] == [o.token_ids for o in runs[2]]
    fused = [sum(o.stats.fused_drafts for o in r) for r in runs]
    rows = [sum(o.stats.query_rows for o in r) for r in runs]
    assert fused[0] > fused[1] > 0 and rows[0] > rows[1]  # some spans were confident enough, some not
    assert fused[2] <= fused[1] and rows[2] <= rows[1]
    with pytest.raises(s2d2.ConfigError, match="fuse_draft_threshold must be a number in"):
        DecodeConfig(fuse_draft_threshold=1.5)


def test_fused_draft_saves_forwards_on_a_trained_model_and_needs_cache_ver():
    m = s2d2.load("bundled")
    p = "Q: Tom has 5 apples and gets 7 more. How many apples does he have?\nA:"
    out = m.generate(p, method="s2d2", block_size=4)[0]
    assert out.stats.fused_drafts > 0 and out.stats.nfe == out.stats.draft_forwards + out.stats.verify_forwards
    for off in (dict(cache_ver=False, draft_ver=False), dict(fuse_commit=False)):  # the block's K/V would differ
        assert m.generate(p, method="s2d2", block_size=4, **off)[0].stats.fused_drafts == 0


def test_fused_draft_leaves_the_same_committed_cache(model):
    """Cache purity: the K/V a fused verify commits equal those the next draft forward would have written."""
    ids = prompt(7, seed=2)
    caches = []
    for fuse in (True, False):
        c = model.adapter.new_cache(64)
        cfg = DecodeConfig(**ALWAYS_VERIFY, block_size=4, max_new_tokens=24, fuse_draft=fuse, stop_token_ids=())
        _, _, stats = decode(model.adapter, ids, cfg, c)
        caches.append((stats.fused_drafts, c.length, [k[:, :c.length].clone() for k in c.keys],
                       [v[:, :c.length].clone() for v in c.values]))
    (n_fused, len_f, kf, vf), (_, len_p, kp, vp) = caches
    assert n_fused > 0
    n = min(len_f, len_p)
    assert n >= 7 + 12
    for a, b in zip(kf + vf, kp + vp):
        assert torch.allclose(a[:, :n], b[:, :n], atol=1e-5)


def test_ar_costs_one_forward_per_token_and_the_reference_ar_two(model):
    ids = prompt(4, seed=9)
    fused = run(model, ids, method="ar", max_new_tokens=20)
    unfused = run(model, ids, method="ar", max_new_tokens=20, fuse_commit=False)
    assert fused.stats.nfe == 20
    assert unfused.stats.nfe == 1 + 20 + 19  # prefill, 20 predictions, a store before each later one


# -------------------------------------------------------------- invariants 1, 5, 6: cache and verifier forwards
def _fresh_prefix_cache(model: s2d2.Model, ids: torch.Tensor, block_start: int):
    """A cache holding ids[:block_start], written causally through a draft forward (as the loop does)."""
    cache = model.adapter.new_cache(128)
    run_draft(model.adapter, ids, cache, block_start, 4, 0, cache_ver=True, draft_ver=True)
    assert cache.length == block_start
    return cache


def _uncached_logits(model: s2d2.Model, tokens: list[int], mask: torch.Tensor) -> torch.Tensor:
    cache = model.adapter.new_cache(len(tokens) + 4)
    out = model.adapter.model(torch.tensor(tokens), torch.arange(len(tokens)), cache, mask)
    return out.index_fill_(-1, model.adapter.banned_ids, float("-inf"))


def test_draft_and_verify_leave_the_cache_unchanged(model):
    adapter = model.adapter
    ids = torch.tensor(prompt(12, seed=1) + [adapter.mask_id] * 4)
    cache = _fresh_prefix_cache(model, ids, 12)
    snapshot = [(k[:, :12].clone(), v[:, :12].clone()) for k, v in zip(cache.keys, cache.values)]
    run_draft(adapter, ids, cache, 12, 4, 0, cache_ver=True, draft_ver=True)
    run_verify(adapter, [5, 6, 7, 8], cache, 12, 12)
    run_verify(adapter, [5, 6, 7, 8], cache, 12, 14)
    assert cache.length == 12
    for (k0, v0), k, v in zip(snapshot, cache.keys, cache.values):
        assert torch.equal(k0, k[:, :12]) and torch.equal(v0, v[:, :12])


def test_verify_rows_equal_causal_forwards_of_prefix_and_drafts(model):
    """Invariant 5: the 2L row for span position i == a causal forward of [prefix, drafts < i, MASK at i]."""
    adapter = model.adapter
    prefix = prompt(8, seed=21)
    filled = [40, 41, 42, 43, 44, 45, 46, 47]  # block of 8 at position 8: committed 40, 41, then a drafted span
    ids = torch.tensor(prefix + [adapter.mask_id] * 8)
    cache = _fresh_prefix_cache(model, ids, 8)
    got = run_verify(adapter, filled, cache, 8, 10)  # span = offsets 2..7
    assert got.shape[0] == 6
    for k in range(6):
        tokens = prefix + filled[: 2 + k] + [adapter.mask_id]
        n = len(tokens)
        want = _uncached_logits(model, tokens, torch.ones(n, n, dtype=torch.bool).tril())[-1]
        assert torch.allclose(got[k], want, atol=1e-4), k
        assert int(got[k].argmax()) == int(want.argmax())
    # positions after the span and other drafts must not matter: change filled beyond position i
    again = run_verify(adapter, filled[:4] + [1, 2, 3, 4], cache, 8, 10)
    assert torch.allclose(again[:3], got[:3], atol=1e-5)


def test_next_block_rows_of_a_verify_equal_the_next_draft_forward(model):
    """A verify whose span ends the block drafts the next block exactly as a draft forward would after the block
    is committed, and leaves the block's causal K/V in the scratch slots after the cache."""
    adapter = model.adapter
    prefix = prompt(8, seed=22)
    filled = [40, 41, 42, 43]  # block at 8..11: committed 40, then drafts 41-43
    ids = torch.tensor(prefix + filled + [adapter.mask_id] * 4)
    cache = _fresh_prefix_cache(model, ids, 8)
    got = run_verify(adapter, filled, cache, 8, 9, next_block=4)
    assert got.shape[0] == 3 + 4 and cache.length == 8
    alone = run_verify(adapter, filled, cache, 8, 9)
    assert torch.allclose(got[:3], alone, atol=1e-5)  # the span rows do not see the next block's rows
    cache.commit(4)  # what the loop does when every draft is accepted
    fused_kv = [k[:, :12].clone() for k in cache.keys]
    want_cache = _fresh_prefix_cache(model, ids, 8)
    want = run_draft(adapter, ids, want_cache, 12, 4, 0, cache_ver=True, draft_ver=True)  # writes 8..11 causally
    assert torch.allclose(got[3:], want, atol=1e-5)
    for a, b in zip(fused_kv, want_cache.keys):
        assert torch.allclose(a, b[:, :12], atol=1e-5)


# ------------------------------------------------------------------------------------------ API behaviour
def test_sampling_is_reproducible_with_a_seed_and_greedy_ignores_it(model):
    ids = prompt(5, seed=3)
    a = run(model, ids, method="s2d2", temperature=1.0, seed=1, max_new_tokens=24, block_size=4)
    b = run(model, ids, method="s2d2", temperature=1.0, seed=1, max_new_tokens=24, block_size=4)
    c = run(model, ids, method="s2d2", temperature=1.0, seed=2, max_new_tokens=24, block_size=4)
    assert a.token_ids == b.token_ids != c.token_ids
    g1 = run(model, ids, method="s2d2", seed=1, max_new_tokens=24)
    g2 = run(model, ids, method="s2d2", seed=2, max_new_tokens=24)
    assert g1.token_ids == g2.token_ids


def test_never_emits_mask_or_vocabulary_padding(model):
    vocab = model.tokenizer.get_vocab_size(with_added_tokens=True)
    for out in model.generate([prompt(4, seed=s) for s in range(4)],
                              DecodeConfig(method="dynamic", temperature=1.5, threshold=0.1, seed=0,
                                           max_new_tokens=40, stop_token_ids=())):
        assert model.adapter.mask_id not in out.token_ids
        assert max(out.token_ids) < vocab


def test_stats_add_up(model, monkeypatch):
    """Every counter equals what an independent trace of the forwards and verdicts counts, exactly."""
    import s2d2.core.forwards

    adapter = model.adapter
    calls = {"draft": 0, "verify": 0}
    verdicts = []
    for kind in calls:  # every forward, batched or not, is built by the adapter's spec methods
        real = getattr(adapter, f"{kind}_spec")

        def counted(*args, _real=real, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(adapter, f"{kind}_spec", counted)
    real_accept = s2d2.core.forwards.accept_greedy
    monkeypatch.setattr(s2d2.core.forwards, "accept_greedy",
                        lambda drafted, logits, relax=None, argmax=None: verdicts.append(
                            (len(drafted), real_accept(drafted, logits, relax, argmax))) or verdicts[-1][1])
    out = run(model, prompt(6, seed=6), method="s2d2", policy="mask_span_length", min_span=2, block_size=8,
              threshold=0.2, max_new_tokens=40)
    s = out.stats
    assert s.draft_forwards == calls["draft"] and s.verify_forwards == calls["verify"] == len(verdicts) > 0
    assert s.nfe == calls["draft"] + calls["verify"] and s.prefill_forwards == s.commit_forwards == 0
    assert s.num_tokens == 40 and s.prompt_tokens == 6 and s.num_prompts == 1
    assert s.steps == s.draft_forwards + s.fused_drafts
    assert s.proposed_tokens == sum(n for n, _ in verdicts)
    assert s.accepted_tokens == sum(v.num_accepted for _, v in verdicts)
    assert s.corrected_tokens == sum(v.correction is not None for _, v in verdicts)
    longest = max(n for n, _ in verdicts)
    assert s.proposed_per_position == [sum(n > i for n, _ in verdicts) for i in range(longest)]
    assert s.accepted_per_position == [sum(v.num_accepted > i for _, v in verdicts) for i in range(longest)]
    # positions 6..45 are decoded (the prompt's 6 tokens open block 0, the limit 46 ends block 5 at offset 6), and
    # each was committed exactly once, by a verification or by the fallback
    assert s.accepted_tokens + s.corrected_tokens + s.fallback_tokens == 40
    d = s.to_dict()
    assert d["tokens_per_forward"] == 40 / s.nfe
    assert d["mean_accepted_length"] == (s.accepted_tokens + s.corrected_tokens) / s.verify_forwards
    assert d["acceptance_rate"] == s.accepted_tokens / s.proposed_tokens
    assert d["tokens_per_s"] == 40 / s.time_s and d["loop_time_share"] == 1.0 - s.forward_time_s / s.time_s
    assert 0.0 < s.forward_time_s < s.time_s


def test_prompt_ids_outside_the_vocabulary_are_an_input_error(model):
    with pytest.raises(s2d2.InputError):
        model.generate([5, 100000], DecodeConfig(max_new_tokens=2))
    with pytest.raises(s2d2.InputError):
        model.generate([[]], DecodeConfig(max_new_tokens=2))


# ------------------------------------------------------------------------------- token editing's post-step limit
def _flip_flop_drafts(prompt_ids: list[int], cfg: DecodeConfig, post_steps: int) -> list[tuple[int, int]]:
    """Drive the loop with draft logits that always want to flip a committed generated token (0 <-> 1, confidence
    ~1), so every step edits; returns (block start, masks left) for every draft forward asked for."""
    from s2d2.core.loop import decode_steps
    from s2d2.core.requests import DraftRequest, FamilyTraits, Scored
    from s2d2.models.cache import KVCache

    vocab, mask = 4, 3
    cfg = cfg.replace(editing_threshold=0.5, max_post_steps=post_steps)
    steps = decode_steps(prompt_ids, cfg, KVCache(0, 1, 1, 64),
                         FamilyTraits(mask, ()))
    drafts, logits = [], None
    while True:
        try:
            request = steps.send(None if logits is None else Scored.of(logits))
        except StopIteration:
            return drafts
        assert isinstance(request, DraftRequest)
        block = request.ids[request.block_start:request.block_start + request.block_size]
        drafts.append((request.block_start, block.count(mask)))
        logits = torch.full((request.block_size, vocab), -20.0)
        for i, token in enumerate(block):
            logits[i, 0 if token in (mask, 1) else 1] = 20.0  # a mask drafts 0; a committed token drafts its flip


@pytest.mark.parametrize("post_steps", [0, 1, 3])
def test_max_post_steps_allows_exactly_that_many_editing_only_steps(post_steps):
    """A block whose masks are gone runs exactly ``max_post_steps`` editing-only steps while edits keep firing
    (0: none), then the next block starts."""
    cfg = DecodeConfig(method="static", block_size=2, steps=2, max_new_tokens=4, stop_token_ids=(),
                       generation_config="none", cache_ver=False, fuse_commit=True, prefix_cache=False)
    drafts = _flip_flop_drafts([2, 2], cfg, post_steps)
    for start in (2, 4):
        masks_left = [left for block, left in drafts if block == start]
        # two unmasking steps (one token each), then the editing-only steps on the full block
        assert masks_left == [2, 1] + [0] * post_steps
