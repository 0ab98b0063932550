"""Relaxed acceptance (off by default): typical acceptance, ratio tempering and the ratio threshold on hand-built
logit tables, the one-dial mapping, and bit-identical exact acceptance at the neutral setting."""

from __future__ import annotations

import math

import pytest
import torch

from s2d2 import DecodeConfig
from s2d2.config import RELAX_MAX_EPSILON, Relaxation
from s2d2.core.sampling import uniforms
from s2d2.core.verify import Verdict, accept_greedy, accept_sampled
from s2d2.errors import ConfigError


def _logits(rows: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly the given probability rows."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


# three span positions over a 3-token vocabulary; drafts 0, 1, 1
Q = [[0.7, 0.2, 0.1], [0.6, 0.35, 0.05], [0.1, 0.85, 0.05]]
DRAFTED = [0, 1, 1]


def test_greedy_typical_acceptance_by_hand():
    """Position 1: q(d) = 0.35 against min(eps, delta * exp(-H)) with H = 0.8237 nats: 0.2404 for eps 0.3, delta
    sqrt(0.3), so typical acceptance takes the draft that exact greedy rejects; position 2 is the argmax anyway."""
    entropy = -sum(x * math.log(x) for x in Q[1])
    bound = min(0.3, math.sqrt(0.3) * math.exp(-entropy))
    assert entropy == pytest.approx(0.8237, abs=1e-4) and bound == pytest.approx(0.2404, abs=1e-4) and 0.35 > bound
    assert accept_greedy(DRAFTED, _logits(Q)) == Verdict(1, 0)
    assert accept_greedy(DRAFTED, _logits(Q), Relaxation(0.3, math.sqrt(0.3))) == Verdict(3, None)
    # a bound above 0.35 (delta 1: exp(-H) = 0.439) rejects it again
    assert accept_greedy(DRAFTED, _logits(Q), Relaxation(0.5, 1.0)) == Verdict(1, 0)


def test_greedy_ratio_threshold_commits_later_drafts_after_a_rejection():
    """After the rejection at position 1, position 2's draft has q(d) / max q = 1 >= 0.9: committed too."""
    assert accept_greedy(DRAFTED, _logits(Q), Relaxation(ratio_threshold=0.9)) == Verdict(1, 0, ((2, 1),))
    low = [[0.7, 0.2, 0.1], [0.6, 0.35, 0.05], [0.5, 0.45, 0.05]]  # ratio 0.9 at position 2
    assert accept_greedy(DRAFTED, _logits(low), Relaxation(ratio_threshold=0.95)) == Verdict(1, 0)
    assert accept_greedy(DRAFTED, _logits(low), Relaxation(ratio_threshold=0.89)) == Verdict(1, 0, ((2, 1),))


def _u(seed: int, n: int) -> list[float]:
    """The uniforms a verification of ``n`` drafts seeded with ``seed`` tests them with (its first ``n``)."""
    return uniforms(n + 1, torch.Generator().manual_seed(seed), torch.device("cpu"))[:n].tolist()


def test_sampled_ratio_tempering_by_hand():
    """q(d) / p(d) = 0.25 at one position: exact acceptance takes u < 0.25, tempering with gamma 0.5 u < 0.5. For a
    seed whose u lies between, exact rejects (and resamples from the residual) and tempered accepts."""
    p = torch.tensor([[0.8, 0.1, 0.1]])
    q = torch.tensor([[0.2, 0.4, 0.4]])
    seed = next(s for s in range(100) if 0.25 <= _u(s, 1)[0] < 0.5)
    exact = accept_sampled([0], p, q, torch.Generator().manual_seed(seed))
    tempered = accept_sampled([0], p, q, torch.Generator().manual_seed(seed), Relaxation(ratio_tempering=0.5))
    assert exact.num_accepted == 0 and exact.correction in (1, 2)  # the residual max(0, q - p) has no mass on 0
    assert tempered == Verdict(1, None)
    below = next(s for s in range(100) if _u(s, 1)[0] >= 0.5)
    assert accept_sampled([0], p, q, torch.Generator().manual_seed(below), Relaxation(ratio_tempering=0.5)) \
        .num_accepted == 0


def test_sampled_typical_acceptance_and_threshold_by_hand():
    """Two positions drafting token 0 with p = 0.9 and q = 0.09 (ratio 0.1, rejected for u >= 0.1). H(q) = 0.3025
    nats, so with delta 0.05 the typical bound is min(0.3, 0.05 * 0.739) = 0.037 < 0.09: both accepted; with delta
    0.5 the bound is 0.3 > 0.09: rejected as exactly. A ratio threshold of 0.1 commits the second after the first is
    rejected (and resampled)."""
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    q = torch.tensor([[0.09, 0.91], [0.09, 0.91]])
    seed = next(s for s in range(100) if min(_u(s, 2)) >= 0.1)
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    entropy = -(0.09 * math.log(0.09) + 0.91 * math.log(0.91))
    assert entropy == pytest.approx(0.3025, abs=1e-4)
    assert min(0.3, 0.05 * math.exp(-entropy)) < 0.09 < min(0.3, 0.5 * math.exp(-entropy))
    assert accept_sampled([0, 0], p, q, gen()) == Verdict(0, 1)  # exact: the residual is all on token 1
    assert accept_sampled([0, 0], p, q, gen(), Relaxation(0.3, 0.05)) == Verdict(2, None)
    assert accept_sampled([0, 0], p, q, gen(), Relaxation(0.3, 0.5)) == Verdict(0, 1)
    assert accept_sampled([0, 0], p, q, gen(), Relaxation(ratio_threshold=0.1)) == Verdict(0, 1, ((1, 0),))


def test_the_dial_maps_onto_typical_acceptance_and_expert_fields_win():
    assert DecodeConfig().relaxation().neutral
    r = DecodeConfig(relax=0.5).relaxation()
    assert r.typical_epsilon == pytest.approx(RELAX_MAX_EPSILON * 0.5) and r.typical_delta == pytest.approx(
        math.sqrt(RELAX_MAX_EPSILON * 0.5))
    r = DecodeConfig(relax=0.5, typical_epsilon=0.1, typical_delta=0.2, ratio_threshold=0.5).relaxation()
    assert (r.typical_epsilon, r.typical_delta, r.ratio_threshold) == (0.1, 0.2, 0.5)
    for bad in (dict(relax=1.5), dict(ratio_tempering=0.0), dict(ratio_threshold=0.0), dict(typical_epsilon=-1)):
        with pytest.raises(ConfigError):
            DecodeConfig(**bad)


def test_greedy_tempering_is_refused_in_one_sentence(model):
    with pytest.raises(ConfigError, match="ratio_tempering applies to sampled decoding"):
        model.generate("ab", DecodeConfig(ratio_tempering=0.5, generation_config="none"))


@pytest.mark.parametrize("sampled", [False, True])
def test_the_neutral_setting_is_bit_identical_to_exact_acceptance(model, sampled):
    base = dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1, max_new_tokens=24,
                stop_token_ids=(), generation_config="none", seed=5, temperature=0.8 if sampled else 0.0)
    prompts = [[72, 101, 108, 108, 111], list(range(40, 56))]
    exact = model.generate(prompts, DecodeConfig(**base))
    neutral = model.generate(prompts, DecodeConfig(**base, relax=0.0, ratio_tempering=1.0, ratio_threshold=None))
    assert [(o.token_ids, o.stats.to_dict()["accepted_tokens"]) for o in exact] == \
        [(o.token_ids, o.stats.to_dict()["accepted_tokens"]) for o in neutral]


def test_relaxation_changes_what_a_random_model_commits(model):
    """On a random model (drafts often rejected) the dial at 1 accepts more drafts than exact acceptance."""
    base = dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1, max_new_tokens=32,
                stop_token_ids=(), generation_config="none")
    prompts = [[72, 101, 108, 108, 111], list(range(40, 56)), [3, 250, 9]]
    exact = sum(o.stats.accepted_tokens for o in model.generate(prompts, DecodeConfig(**base)))
    relaxed = sum(o.stats.accepted_tokens for o in model.generate(prompts, DecodeConfig(**base, relax=1.0,
                                                                                          ratio_threshold=0.05)))
    assert relaxed > exact


@pytest.mark.parametrize("pipelined", [False, True])
def test_commit_confident_commits_exactly_the_confident_rest_of_a_verified_step(model, pipelined):
    """The reference's always_check_high_confidence: a verified step also commits every other mask whose draft
    clears the threshold (its draft token, labelled fallback); without the knob a verified step (B = S) commits the
    verdict alone. Read off the step traces; the threshold sits at the random model's median confidence."""
    base = dict(method="s2d2", block_size=8, policy="mask_span_length", min_span=1, max_new_tokens=32,
                stop_token_ids=(), generation_config="none",
                block_add_threshold=0.25 if pipelined else None)
    prompts = [[72, 101, 108, 108, 111], list(range(40, 56)), [3, 250, 9]]
    plain = model.generate(prompts[0], DecodeConfig(**base), trace=True)[0].trace
    confidences = sorted(c for e in plain[1:-1] if "draft" in e for c in e["draft"]["confidence"])
    threshold = confidences[len(confidences) // 2]
    checked = 0
    for knob in (False, True):
        cfg = DecodeConfig(**base, threshold=threshold, commit_confident=knob)
        for out in model.generate(prompts, cfg, trace=True):
            for step in (e for e in out.trace[1:-1] if e.get("route", {}).get("verify")):
                draft = dict(zip(step["draft"]["positions"], zip(step["draft"]["tokens"], step["draft"]["confidence"])))
                verdict = {c["pos"] for c in step["commits"] if c["how"] in ("accepted", "corrected")}
                rest = {c["pos"]: c["token"] for c in step["commits"] if c["how"] == "fallback"}
                expected = {p: t for p, (t, conf) in draft.items() if p not in verdict and conf > threshold}
                assert rest == (expected if knob else {})
                corrected = [c["token"] for c in step["commits"] if c["how"] == "corrected"]
                assert corrected == ([] if step["verify"]["correction"] is None else [step["verify"]["correction"]])
                checked += len(expected)
    assert checked > 0  # confident drafts beside verifications occurred, so the rule was exercised
