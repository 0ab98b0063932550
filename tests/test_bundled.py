"""The bundled model: loads with no network, solves problems, and S2D2 on it is lossless."""

from __future__ import annotations

import pytest

import s2d2
from s2d2.api import bundled_model_dir
from s2d2.cli import main
from s2d2.evaluation.tasks import arith, wordy


@pytest.fixture(scope="module")
def bundled() -> s2d2.Model:
    return s2d2.load("bundled")


def test_bundled_model_ships_in_the_package_and_loads_offline(bundled, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {p.name for p in bundled_model_dir().iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in bundled_model_dir().iterdir()) < 30 * 2**20
    assert bundled.adapter.mask_id is not None and bundled.adapter.stop_ids


@pytest.mark.parametrize("task", ["arith", "wordy"])
def test_eval_on_twenty_problems(capsys, task):
    assert main(["eval", "--task", task, "--n", "20", "--method", "ar", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    # the first 20 test problems (AR, exact): arith 18 of 20, wordy 14 of 20 (500-problem figures: the model card)
    assert result["n"] == 20 and result["accuracy"] >= {"arith": 0.85, "wordy": 0.65}[task]
    stats = result["stats"]  # AR: one forward per token, plus one for each end-of-sequence token
    assert stats["num_tokens"] <= stats["nfe"] <= stats["num_tokens"] + 20


def test_a_newcomers_question_in_its_own_words(bundled):
    """The question of issue 18 (not written by either generator), and `make run`'s prompt, answered right by AR
    and by S2D2."""
    for question, answer in (("Tom has 5 apples and buys 7 more. How many apples does he have?", " 5+7=12. #### 12"),
                             ("Lily wants to read 60 pages. She reads 12 pages on Monday and 15 pages on Tuesday. "
                              "How many more pages does she need to read?", " 12+15=27. 60-27=33. #### 33")):
        for cfg in (s2d2.DecodeConfig(method="ar"), s2d2.DecodeConfig(method="s2d2", block_size=8)):
            assert bundled.generate(f"Q: {question}\nA:", cfg)[0].text == answer


def _mixed_prompts(seed: int) -> list[str]:
    """Six arith and six wordy test problems (mixed lengths)."""
    return [p.prompt for p in arith.generate("test", 6, seed=seed)] + [p.prompt for p in wordy.generate("test", 6,
                                                                                                        seed=seed)]


def test_greedy_s2d2_verifying_every_step_equals_ar_on_bundled_prompts(bundled):
    prompts = _mixed_prompts(seed=1)
    ar = bundled.generate(prompts, s2d2.DecodeConfig(method="ar"))
    # Exact figures of the bundled model (greedy decoding is deterministic): 308 tokens; AR takes 320 forwards (one
    # per token plus one per end-of-sequence), S2D2 B=4 takes 107 (16 drafts + 91 verifies, 0.33x AR) and B=16 takes
    # 105 (43 + 62, 0.33x AR). Re-pin these numbers if the bundled model is retrained.
    assert sum(o.stats.num_tokens for o in ar) == 308 and sum(o.stats.nfe for o in ar) == 320
    expected = {4: (107, 16, 91), 16: (105, 43, 62)}  # block size -> (NFE, draft forwards, verify forwards)
    for block_size in (4, 16):
        sd = bundled.generate(prompts, s2d2.DecodeConfig(method="s2d2", block_size=block_size,
                                                         policy="mask_span_length", min_span=1))
        assert [o.token_ids for o in sd] == [o.token_ids for o in ar]
        assert (sum(o.stats.nfe for o in sd), sum(o.stats.draft_forwards for o in sd),
                sum(o.stats.verify_forwards for o in sd)) == expected[block_size]


@pytest.mark.parametrize("cfg", [dict(method="ar"), dict(method="dynamic", block_size=4, threshold=0.9),
                                 dict(method="s2d2", block_size=8)], ids=["ar", "dynamic", "s2d2-A"])
def test_batched_equals_batch_1_on_bundled_prompts(bundled, cfg):
    """Invariant 7 on the shipped model: 12 problems (mixed lengths, early end-of-sequence) in one batch of 16."""
    prompts = _mixed_prompts(seed=2)
    config = s2d2.DecodeConfig(**cfg)
    one = bundled.generate(prompts, config, batch_size=1)
    many = bundled.generate(prompts, config, batch_size=16)
    assert [o.token_ids for o in many] == [o.token_ids for o in one]
    assert [o.stats.nfe for o in many] == [o.stats.nfe for o in one]
    assert len({len(o.token_ids) for o in one}) > 1  # rows finish at different steps
