"""Redrafts from the verifier (issue 32, item 1): after a rejection, the verifier's rows for the span positions
after the correction are the next draft there, instead of a diffusion-mode forward. Lossless: a redraft is always
verified, so greedy S2D2 verifying every step stays AR token for token (every family), with and without the
routing policy; batched equals batch 1, greedy and sampled; fewer forwards on the bundled model; refused where it
cannot apply. The sampled distribution is tested in test_sampled_acceptance_power.py."""

from __future__ import annotations

import random

import pytest

import s2d2
from s2d2 import ConfigError, DecodeConfig
from s2d2.engine.engine import Engine
from s2d2.engine.runner import decode

FAMILIES = ("sdar", "fast_dllm_v2", "llada2", "d2f_llada", "d2f_dream")


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(200) for _ in range(rng.randrange(2, 20))] for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_s2d2_with_redrafts_is_ar_on_every_family(family_model, family):
    model = family_model(family)
    base = dict(max_new_tokens=24, stop_token_ids=(), generation_config="none")
    redrafts = 0
    for prompt in _prompts(6, seed=3):
        ar = model.generate(prompt, DecodeConfig(method="ar", **base))[0].token_ids
        for block in (4, 8):
            cfg = DecodeConfig(method="s2d2", block_size=block, policy="mask_span_length", min_span=1, redraft=0.0,
                               **base)
            out = model.generate(prompt, cfg)[0]
            assert out.token_ids == ar, (family, block, prompt)
            redrafts += out.stats.redrafts
    assert redrafts > 0, family  # the random models reject often: redrafts really ran


@pytest.mark.parametrize("family", ["sdar", "fast_dllm_v2"])
def test_redrafts_batched_equal_batch_1(family_model, family):
    model = family_model(family)
    cfg = model.resolve_config(DecodeConfig(method="s2d2", block_size=8, policy="mask_span_length", min_span=1,
                                            redraft=0.0, max_new_tokens=24, stop_token_ids=(),
                                            generation_config="none"))
    batch = _prompts(5, seed=9)
    alone = [decode(model.adapter, p, cfg, model.adapter.new_cache(256)) for p in batch]
    engine = Engine(model.adapter, 5)
    ids = [engine.add(p, cfg) for p in batch]
    done = {}
    while not engine.idle:
        done.update({e.request_id: e for e in engine.step() if e.finished})
    for rid, (tokens, _, stats) in zip(ids, alone):
        assert done[rid].token_ids == tokens
        assert (done[rid].stats.nfe, done[rid].stats.redrafts) == (stats.nfe, stats.redrafts)
    assert sum(s.redrafts for _, _, s in alone) > 0


def test_sampled_redrafts_depend_only_on_their_seed(family_model):
    """Sampled: a redraft's tokens are drawn from the verifier's rows in the verification's one read; a row's draws
    depend on its seed alone, so batched equals batch 1 (the distribution itself: test_sampled_acceptance_power)."""
    model = family_model("sdar")
    cfg = DecodeConfig(method="s2d2", block_size=8, policy="mask_span_length", min_span=1, redraft=0.0,
                       temperature=0.9, top_p=0.95, seed=5, max_new_tokens=24, stop_token_ids=(),
                       generation_config="none")
    batch = _prompts(5, seed=4)
    one = model.generate(batch, cfg, batch_size=1)
    assert [o.token_ids for o in one] == [o.token_ids for o in model.generate(batch, cfg, batch_size=5)]
    assert sum(o.stats.redrafts for o in one) > 0


def test_redrafts_save_forwards_on_the_bundled_model_and_keep_ar_s_tokens():
    """The bundled model's wordy problems, configuration A (the score policy, which may skip a verification) and
    verifying every step: with redrafts every output is still AR's (a redraft is never committed unverified) and the
    forwards are fewer."""
    from s2d2.evaluation.tasks import wordy

    model = s2d2.load("bundled")
    prompts = [p.prompt for p in wordy.generate("test", 24, seed=0)]
    ar = [o.token_ids for o in model.generate(prompts, method="ar")]
    for fields in (dict(), dict(policy="mask_span_length", min_span=1)):
        plain = model.generate(prompts, method="s2d2", block_size=16, **fields)
        redrafted = model.generate(prompts, method="s2d2", block_size=16, redraft=0.9, **fields)
        assert [o.token_ids for o in plain] == ar == [o.token_ids for o in redrafted], fields
        assert sum(o.stats.redrafts for o in redrafted) > 0
        assert sum(o.stats.nfe for o in redrafted) < sum(o.stats.nfe for o in plain), fields


@pytest.mark.parametrize("fields, message", [
    (dict(method="dynamic", redraft=0.5), "redraft applies to method s2d2"),
    (dict(method="ar", redraft=0.5), "redraft applies to method s2d2"),
    (dict(method="s2d2", block_add_threshold=0.5, redraft=0.5), "cannot be combined with block_add_threshold"),
    (dict(method="s2d2", redraft=1.5), "redraft"),
])
def test_where_redrafts_cannot_apply_is_one_sentence(fields, message):
    with pytest.raises(ConfigError, match=message) as err:
        DecodeConfig(**fields)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")
