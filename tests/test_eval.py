"""`s2d2 eval`: accuracy with the summed decoding stats, and its errors."""

from __future__ import annotations

import json

import pytest

import s2d2
from s2d2.cli import main
from s2d2.config import DecodeConfig
from s2d2.evaluation.evaluate import evaluate
from s2d2.evaluation.tasks import arith


def test_eval_json_reports_accuracy_and_summed_stats(random_model_dir, capsys):
    """The JSON's accuracy and stats are exactly those of the same problems decoded one by one through the API:
    every counter is the sum over the per-problem generations and the rates are derived from those sums."""
    assert main(["eval", "--task", "arith", "--n", "3", "--model", str(random_model_dir), "--method", "dynamic",
                 "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    problems = arith.generate("test", 3, seed=0)
    outs = s2d2.load(str(random_model_dir)).generate(
        [p.prompt for p in problems], DecodeConfig(method="dynamic", max_new_tokens=8, generation_config="none"))
    assert result["task"] == "arith" and result["n"] == 3
    assert result["accuracy"] == sum(arith.is_correct(p, o.text) for p, o in zip(problems, outs)) / 3
    stats = result["stats"]
    assert stats["num_prompts"] == 3
    for key in ("num_tokens", "prompt_tokens", "prefill_forwards", "draft_forwards", "verify_forwards",
                "commit_forwards", "fused_drafts", "steps", "proposed_tokens", "accepted_tokens", "corrected_tokens",
                "fallback_tokens"):
        assert stats[key] == sum(getattr(o.stats, key) for o in outs), key
    assert stats["nfe"] == sum(o.stats.nfe for o in outs) > 0
    assert 0 < stats["num_tokens"] <= 24
    assert stats["tokens_per_forward"] == pytest.approx(stats["num_tokens"] / stats["nfe"], rel=1e-12)
    assert 0.0 < stats["forward_time_s"] <= stats["time_s"]
    assert stats["tokens_per_s"] == pytest.approx(stats["num_tokens"] / stats["time_s"], rel=1e-12)


def test_eval_samples_are_per_problem_and_independent_of_the_batch(random_model_dir, tmp_path, capsys):
    """--samples writes one record per problem whose text and counters are that problem's own generation (batch 1
    through the API), and the file is the same, record for record, at batch 1 and batch 3."""
    problems = arith.generate("test", 5, seed=0)
    alone = [s2d2.load(str(random_model_dir)).generate(
        p.prompt, DecodeConfig(method="s2d2", block_size=4, max_new_tokens=12, generation_config="none"))[0]
        for p in problems]
    files = []
    for batch in (1, 3):
        path = tmp_path / f"b{batch}.jsonl"
        assert main(["eval", "--task", "arith", "--n", "5", "--model", str(random_model_dir), "--method", "s2d2",
                     "--block-size", "4", "--max-new-tokens", "12", "--batch-size", str(batch), "--samples", str(path), "--json"]) == 0
        capsys.readouterr()
        files.append([json.loads(line) for line in path.read_text().splitlines()])
    assert files[0] == files[1]
    for i, (record, p, g) in enumerate(zip(files[0], problems, alone, strict=True)):
        assert record["index"] == i and record["level"] == p.level and record["answer"] == p.answer
        assert record["text"] == g.text and record["finish_reason"] == g.finish_reason
        assert record["correct"] == arith.is_correct(p, g.text)
        assert (record["nfe"], record["num_tokens"], record["verify_forwards"]) == (
            g.stats.nfe, g.stats.num_tokens, g.stats.verify_forwards)
        assert not any("time" in key for key in record)


def test_eval_scores_what_the_model_wrote(model, monkeypatch):
    """A model that always answers the right number scores 100%; one that never does scores 0%."""
    problems = arith.generate("test", 4, seed=0)
    answers = iter(problems)

    def fake_generate(prompts, cfg, batch_size=1, progress=False):
        return [s2d2.Generation(f" x. #### {next(answers).answer}", [], "stop", s2d2.DecodeStats()) for _ in prompts]

    monkeypatch.setattr(model, "generate", fake_generate)
    assert evaluate(model, s2d2.DecodeConfig(), n=4).accuracy == 1.0
    monkeypatch.setattr(model, "generate", lambda prompts, cfg, batch_size=1, progress=False: [
        s2d2.Generation("#### -1", [], "stop", s2d2.DecodeStats()) for _ in prompts])
    assert evaluate(model, s2d2.DecodeConfig(), n=4).accuracy == 0.0


@pytest.mark.parametrize("split", ["test", "generalisation"])
def test_eval_scores_the_wordy_task_on_its_own_problems(model, monkeypatch, split):
    """``--task wordy`` decodes the grammar task's problems of the split (its generalisation split included) and
    scores them with its checker: right answers score 100%."""
    from s2d2.evaluation.tasks import wordy

    problems = wordy.generate(split, 6, seed=0)
    seen = []

    def fake_generate(prompts, cfg, batch_size=1, progress=False):
        seen.extend(prompts)
        return [s2d2.Generation(f" x. #### {p.answer}", [], "stop", s2d2.DecodeStats()) for p in problems]

    monkeypatch.setattr(model, "generate", fake_generate)
    result = evaluate(model, s2d2.DecodeConfig(), task="wordy", n=6, split=split)
    assert seen == [p.prompt for p in problems] and result.accuracy == 1.0
    assert set(result.accuracy_by_level) == {p.level for p in problems}


def test_eval_rejects_bad_input(random_model_dir, capsys):
    assert main(["eval", "--task", "nope", "--n", "2", "--model", str(random_model_dir)]) == 2
    assert main(["eval", "--n", "0", "--model", str(random_model_dir)]) == 2
    assert main(["eval", "--n", "2", "--model", str(random_model_dir), "--samples", "/nonexistent/dir/s.jsonl"]) == 2
    assert main(["eval", "--n", "2", "--task", "arith", "--split", "generalisation",
                 "--model", str(random_model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("s2d2: error:") for line in err)
    assert "--samples" in err[2]
    assert err[3] == ("s2d2: error: task arith has the splits train, validation, test; got 'generalisation'.")


def test_eval_shows_progress_on_stderr_unless_asked_not_to(random_model_dir, capsys):
    """Long evaluations show a bar of decoded problems (stderr, so --json stays one object on stdout); the
    decode is the same with or without it."""
    argv = ["eval", "--task", "arith", "--n", "4", "--model", str(random_model_dir), "--method", "dynamic",
            "--max-new-tokens", "8", "--json"]
    assert main(argv) == 0
    shown = capsys.readouterr()
    assert "arith test" in shown.err and "4/4" in shown.err
    assert main([*argv, "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""
    drop = ("time_s", "forward_time_s", "tokens_per_s", "loop_time_share")
    a, b = json.loads(shown.out), json.loads(quiet.out)
    assert ({k: v for k, v in a["stats"].items() if k not in drop} == {k: v for k, v in b["stats"].items()
                                                                         if k not in drop})
    assert a["accuracy"] == b["accuracy"]
