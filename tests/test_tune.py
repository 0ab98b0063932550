"""``s2d2 tune`` and config files: the choice follows the budget and the objective, the written file loads through
``--config`` in generate / eval / bench / serve and lm-eval's ``config=``, and bad files are one sentence."""

from __future__ import annotations

import json

import pytest

import s2d2
from s2d2 import DecodeConfig
from s2d2.cli import build_parser, config_from_args, main
from s2d2.errors import ConfigError
from s2d2.evaluation.bench import Setting
from s2d2.evaluation.tune import search_space, tune, verification


def test_the_choice_follows_the_budget_and_the_objective(model, monkeypatch):
    """Three settings on 10 prompts whose correctness is scripted per setting: the winner is the highest tokens per
    forward among those within max_drop points of AR, and AR itself when none is."""
    prompts = [f"p{i}" for i in range(10)]
    space = [Setting("fast-wrong", dict(method="dynamic", block_size=8, threshold=0.1)),
             Setting("mid", dict(method="s2d2", block_size=8)),
             Setting("slow-right", dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1))]
    right = {"ar": 10, "fast-wrong": 6, "mid": 9, "slow-right": 10}  # prompts each setting gets right
    current = {}
    real = s2d2.Model.generate

    def generate(self, items, cfg, batch_size=64, **kw):
        current["name"] = next((s.name for s in space if s.config() == cfg), "ar")
        return real(self, items, cfg.replace(max_new_tokens=8), batch_size=batch_size, **kw)

    monkeypatch.setattr(s2d2.Model, "generate", generate)
    checker = lambda i, text: i < right[current["name"]]  # noqa: E731
    result = tune(model, prompts, checker, space, max_drop=10.0)
    by_name = {r["name"]: r for r in result.records}
    assert result.ar_accuracy == 1.0 and result.records[0]["name"] == "ar"
    assert [by_name[n]["within_budget"] for n in ("fast-wrong", "mid", "slow-right")] == [False, True, True]
    within = [r for r in result.records[1:] if r["within_budget"]]
    assert result.winner is max(within, key=lambda r: (r["tokens_per_forward"], r["accuracy"]))
    strict = tune(model, prompts, checker, space, max_drop=0.0)
    assert strict.winner["name"] == "slow-right"  # the only one with AR's accuracy
    right["slow-right"] = 9
    assert tune(model, prompts, checker, space, max_drop=0.0).winner["name"] == "ar"  # none within budget
    with pytest.raises(ConfigError, match="objective must be one of"):
        tune(model, prompts, checker, space, objective="speed")


def test_the_default_search_space_covers_policies_estimators_blocks_and_the_gate():
    space = search_space()
    fields = [s.fields for s in space]
    assert len({s.name for s in space}) == len(space)
    assert {f.get("policy", "score_threshold") for f in fields if f["method"] == "s2d2"} == {
        "score_threshold", "mask_span_length", "score_hysteresis", "contextual_bandit_ucb"}
    assert {f.get("estimator") for f in fields} >= {None, "hard_margin_threshold"}
    assert {f["block_size"] for f in fields} == {4, 8, 16} and {f.get("skip_confident") for f in fields} >= {True}
    assert {f.get("relax") for f in fields} >= {1.0} and {f.get("commit_confident") for f in fields} >= {True}
    assert sum(f.get("redraft") is not None for f in fields) == 9  # configuration A with redrafts, every B and t
    for f in fields:
        DecodeConfig(**f)  # every setting is valid
    exact = search_space(exact_only=True)
    assert 0 < len(exact) < len(space) and all(verification(s.fields) == "exact" for s in exact)
    assert (len(space), len(exact)) == (144, 117)  # the counts the README states
    assert {verification(f) for f in fields} == {"none", "exact", "not exact (relax)", "not exact (commit_confident)"}


def test_the_inexact_knobs_are_named():
    assert DecodeConfig(method="s2d2").inexact_knobs == ()
    assert DecodeConfig(method="s2d2", relax=0.5, commit_confident=True).inexact_knobs == ("relax", "commit_confident")
    assert DecodeConfig(method="s2d2", ratio_threshold=0.5, ratio_tempering=0.5).inexact_knobs == (
        "ratio_tempering", "ratio_threshold")
    assert DecodeConfig(method="dynamic").inexact_knobs == ()  # nothing is verified


def test_tune_writes_a_config_that_every_command_loads(random_model_dir, tmp_path, capsys):
    out, report = tmp_path / "tuned.json", tmp_path / "records.jsonl"
    assert main(["tune", "--model", str(random_model_dir), "--quick", "--limit", "6", "--out", str(out),
                 "--report", str(report), "--max-accuracy-drop", "100"]) == 0
    shown = capsys.readouterr()
    printed = shown.out
    fields = json.loads(out.read_text())
    records = [json.loads(line) for line in report.read_text().splitlines()]
    # the exact pass reports its progress on stderr, one step per setting scored (AR first)
    assert "tune: exact pass: 100%" in shown.err and f"{len(records)}/{len(records)}" in shown.err
    chosen = max(records[1:], key=lambda r: (r["tokens_per_forward"], r["accuracy"]))  # all within a 100-point budget
    assert fields == chosen["config"] and "**(chosen)**" in printed and str(out) in printed
    # --config: the file's fields, flags given on the command line win
    ns = build_parser().parse_args(["generate", "x", "--config", str(out), "--threshold", "0.5"])
    assert config_from_args(ns) == DecodeConfig(**{**fields, "threshold": 0.5})
    for command in (["generate", "x", "--max-new-tokens", "4"], ["eval", "--limit", "2", "--max-new-tokens", "4"]):
        assert main([*command, "--model", str(random_model_dir), "--config", str(out), "--json"]) == 0
    json.loads(capsys.readouterr().out.splitlines()[-1])
    bench_out = tmp_path / "bench"
    assert main(["bench", "--model", str(random_model_dir), "--quick", "--limit", "2", "--repeats", "1", "--no-progress",
                 "--config", str(out), "--out", str(bench_out)]) == 0
    names = [json.loads(line)["name"] for line in (bench_out / "results.jsonl").read_text().splitlines()]
    assert f"config {out}" in names
    # lm-eval's config= model argument
    pytest.importorskip("lm_eval")
    from s2d2.evaluation.lm_eval import S2D2LM

    lm = S2D2LM(pretrained=str(random_model_dir), config=str(out), threshold=0.3)
    assert lm.config == DecodeConfig(**{**fields, "threshold": 0.3, "generation_config": "none"})


@pytest.mark.parametrize("content, message", [
    ("{not json", "config file {} is not valid JSON"),
    ("[1, 2]", "config file {} must hold a JSON object of decoding options."),
    ('{"blocksize": 8}', "config file {}: unknown decoding option 'blocksize'"),
    ('{"threshold": 3}', "config file {}: threshold must be a number in"),
])
def test_bad_config_files_are_one_sentence(tmp_path, capsys, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    assert main(["generate", "x", "--model", "bundled", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message.format(path) in err and err.count("\n") == 1
    with pytest.raises(ConfigError):
        DecodeConfig.file_fields(str(tmp_path / "missing.json"))


@pytest.mark.slow  # lm-eval's evaluator over every setting
def test_tune_on_an_lm_eval_task_scores_its_validation_split(tmp_path, capsys):
    """``--task lm-eval:s2d2_arith``: every setting runs lm-eval's evaluator on the task's validation documents, so
    its accuracy is what ``s2d2 eval --split validation`` gives for the same setting with the task's generation
    settings (until newline / "Q:", 64 tokens)."""
    pytest.importorskip("lm_eval")
    from s2d2.evaluation.evaluate import evaluate

    report = tmp_path / "records.jsonl"
    assert main(["tune", "--task", "lm-eval:s2d2_arith", "--quick", "--limit", "8", "--out", str(tmp_path / "t.json"),
                 "--report", str(report)]) == 0
    records = [json.loads(line) for line in report.read_text().splitlines()]
    model = s2d2.load("bundled")
    for r in records:
        cfg = DecodeConfig(**{**r["config"], "generation_config": "none", "stop": ("\n", "Q:"), "max_new_tokens": 64})
        assert r["accuracy"] == pytest.approx(evaluate(model, cfg, n=8, split="validation").accuracy), r["name"]
    assert main(["tune", "--task", "lm-eval:s2d2_arith_mc", "--quick", "--limit", "2",
                 "--out", str(tmp_path / "u.json")]) == 2
    assert "is a multiple_choice task" in capsys.readouterr().err
    assert main(["tune", "--task", "lm-eval:no_such_task", "--quick", "--limit", "2",
                 "--out", str(tmp_path / "v.json")]) == 2
    assert "lm-eval knows no task 'no_such_task'" in capsys.readouterr().err
