"""`s2d2 eval`: accuracy with the summed decoding stats, and its errors."""

from __future__ import annotations

import json

import s2d2
from s2d2.cli import main
from s2d2.evaluate import evaluate
from s2d2.tasks import arith


def test_eval_json_reports_accuracy_and_summed_stats(random_model_dir, capsys):
    assert main(["eval", "--task", "arith", "--n", "3", "--model", str(random_model_dir), "--method", "dynamic",
                 "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    stats = result["stats"]
    assert stats["num_prompts"] == 3 and stats["num_tokens"] <= 24
    for key in ("nfe", "num_tokens", "time_s", "tokens_per_forward", "draft_forwards", "verify_forwards"):
        assert key in stats


def test_eval_scores_what_the_model_wrote(model, monkeypatch):
    """A model that always answers the right number scores 100%; one that never does scores 0%."""
    problems = arith.generate("test", 4, seed=0)
    answers = iter(problems)

    def fake_generate(prompts, cfg):
        return [s2d2.Generation(f" x. #### {next(answers).answer}", [], "stop", s2d2.DecodeStats()) for _ in prompts]

    monkeypatch.setattr(model, "generate", fake_generate)
    assert evaluate(model, s2d2.DecodeConfig(), n=4).accuracy == 1.0
    monkeypatch.setattr(model, "generate", lambda prompts, cfg: [
        s2d2.Generation("#### -1", [], "stop", s2d2.DecodeStats()) for _ in prompts])
    assert evaluate(model, s2d2.DecodeConfig(), n=4).accuracy == 0.0


def test_eval_rejects_bad_input(random_model_dir, capsys):
    assert main(["eval", "--task", "nope", "--n", "2", "--model", str(random_model_dir)]) == 2
    assert main(["eval", "--n", "0", "--model", str(random_model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("s2d2: error:") for line in err)
