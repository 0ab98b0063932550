"""`s2d2 bench`: same prompts for every setting, the three output files, speedups against AR, grid errors."""

from __future__ import annotations

import json

import s2d2
from s2d2.cli import main
from s2d2.evaluation.bench import Setting, default_grid, dominating, run_bench
from s2d2.evaluation.tasks import arith

_COUNTERS = ("num_tokens", "prompt_tokens", "prefill_forwards", "draft_forwards", "verify_forwards", "commit_forwards",
             "fused_drafts", "steps", "proposed_tokens", "accepted_tokens", "corrected_tokens", "fallback_tokens",
             "query_rows")


def test_bench_quick_writes_table_records_and_plot(random_model_dir, tmp_path, capsys):
    """Every record's exact figures equal an independent API run of its setting on the same prompts, its rates are
    derived from its own stats (one round with --quick, so time figures are that round's), and the table shows them."""
    out = tmp_path / "bench"
    assert main(["bench", "--task", "arith", "--quick", "--n", "3", "--model", str(random_model_dir),
                 "--out", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    grid = default_grid(quick=True)
    assert [r["name"] for r in records] == [s.name for s in grid]
    problems = arith.generate("test", 3, seed=0)
    model = s2d2.load(str(random_model_dir))
    ar = records[0]
    assert ar["method"] == "ar"
    for setting, r in zip(grid, records):
        outs = model.generate([p.prompt for p in problems], setting.config())
        st = r["stats"]
        assert r["method"] == setting.fields["method"] and r["config"] == setting.fields and r["repeats"] == 1
        assert r["n"] == 3 and st["num_prompts"] == 3
        assert r["accuracy"] == sum(arith.is_correct(p, o.text) for p, o in zip(problems, outs)) / 3
        for key in _COUNTERS:
            assert st[key] == sum(getattr(o.stats, key) for o in outs), (setting.name, key)
        assert st["nfe"] == sum(o.stats.nfe for o in outs) > 0 and st["num_tokens"] > 0 and st["steps"] > 0
        assert r["nfe_per_token"] == st["nfe"] / st["num_tokens"]
        assert r["tokens_per_forward"] == st["num_tokens"] / st["nfe"]
        assert r["rows_per_forward"] == st["query_rows"] / st["nfe"] and st["query_rows"] >= st["nfe"]
        assert r["verify_rate"] == st["verify_forwards"] / st["steps"]
        assert r["mean_accepted_length"] == ((st["accepted_tokens"] + st["corrected_tokens"]) / st["verify_forwards"]
                                             if st["verify_forwards"] else 0.0)
        # one round: the medians are that round's figures, the stats summed over its prompts
        assert r["time_s"] == st["time_s"] > 0
        assert r["tokens_per_s"] == st["num_tokens"] / r["time_s"]
        assert r["speedup_vs_ar"] == ar["time_s"] / r["time_s"]
        assert 0.0 <= r["loop_share"] < 1.0 and r["loop_share"] == 1.0 - st["forward_time_s"] / st["time_s"]
    assert ar["speedup_vs_ar"] == 1.0 and ar["nfe_per_token"] == 1.0 and ar["verify_rate"] == 0.0
    assert records[2]["stats"]["verify_forwards"] > 0  # the s2d2 setting verifies: verify_rate is really exercised
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "pareto_tpf.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    rows = [f"| {r['name']} | {r['accuracy']:.1%} | {r['nfe_per_token']:.3f} | {r['tokens_per_forward']:.2f} | "
            f"{r['rows_per_forward']:.1f} | {r['tokens_per_s']:.0f} | {r['speedup_vs_ar']:.2f}x | {r['verify_rate']:.2f} | "
            f"{r['mean_accepted_length']:.2f} | {r['loop_share']:.1%} |" for r in records]
    head = [f"# {random_model_dir} on arith (3 test problems, 1 round)", "",
            "| setting | accuracy | NFE / token | tokens / forward | rows / forward | tokens / s | speedup vs AR | "
            "verify rate | mean accepted | loop share |", "|---|---|---|---|---|---|---|---|---|---|", *rows]
    lines = table.splitlines()
    assert lines[:len(head)] == head
    # then the dominance section: one row for the grid's one dynamic setting
    assert lines[len(head) + 1] == "## Dynamic settings and the S2D2 setting that dominates each"
    dyn, ours = records[1], records[2]
    dominated = ours["accuracy"] >= dyn["accuracy"] and ours["tokens_per_forward"] >= dyn["tokens_per_forward"]
    assert lines[-1].startswith(f"| {dyn['name']} | {dyn['accuracy']:.1%} | {dyn['tokens_per_forward']:.2f} | "
                                f"{ours['name'] if dominated else 'none'} |")
    assert capsys.readouterr().out == table + "\n"  # print() adds a newline after the file's own


def test_every_setting_sees_the_same_prompts_in_each_round(model):
    seen: dict[str, list] = {}
    real = model.generate

    def spy(prompts, cfg=None, **kw):
        seen.setdefault(cfg.method, []).append(list(prompts))
        return real(prompts, cfg, **kw)

    model.generate = spy
    try:
        grid = [Setting("ar", dict(method="ar", max_new_tokens=4)),
                Setting("dyn", dict(method="dynamic", max_new_tokens=4))]
        records = run_bench(model, ["Q: a\nA:", "Q: b\nA:"], lambda i, t: True, grid, repeats=2, progress=False)
    finally:
        del model.generate
    assert seen["dynamic"] == [["Q: a\nA:", "Q: b\nA:"]] * 2
    assert seen["ar"][1:] == [["Q: a\nA:", "Q: b\nA:"]] * 2  # after the warm-up call
    assert [r["accuracy"] for r in records] == [1.0, 1.0]


def test_bench_grid_errors(random_model_dir, tmp_path, capsys):
    no_ar = tmp_path / "grid.json"
    no_ar.write_text(json.dumps([{"name": "d", "config": {"method": "dynamic"}}]))
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    wrong_field = tmp_path / "wrong.json"
    wrong_field.write_text(json.dumps([{"name": "a", "config": {"method": "ar", "blok_size": 2}}]))
    for grid in (no_ar, bad, wrong_field, tmp_path / "missing.json"):
        assert main(["bench", "--model", str(random_model_dir), "--grid", str(grid), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("s2d2: error:") for line in err)


def test_dominating_picks_the_fastest_s2d2_setting_with_at_least_both_figures():
    def rec(name, method, acc, tpf):
        return {"name": name, "method": method, "accuracy": acc, "tokens_per_forward": tpf}

    records = [rec("ar", "ar", 0.95, 1.0), rec("dyn fast", "dynamic", 0.45, 5.8), rec("dyn exact tie", "dynamic", 0.9, 4.0),
               rec("dyn slow", "dynamic", 0.93, 3.0), rec("s slow", "s2d2", 0.95, 3.5), rec("s tie", "s2d2", 0.9, 4.0),
               rec("s fast wrong", "s2d2", 0.40, 6.0), rec("s tie fast", "s2d2", 0.92, 4.0)]
    got = {d["name"]: None if r is None else r["name"] for d, r in dominating(records)}
    # equal figures dominate (at least both); of two at 4.0 the more accurate; 5.8 at 45% has no S2D2 counterpart
    assert got == {"dyn fast": None, "dyn exact tie": "s tie fast", "dyn slow": "s slow"}


def test_bench_decodes_the_asked_task_and_split(random_model_dir, tmp_path, capsys):
    """`--task wordy --split generalisation` benchmarks that split's problems (the AR record's accuracy is the
    checker's verdict on them); a split the task lacks is one sentence and exit code 2."""
    from s2d2.evaluation.tasks import wordy

    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--n", "2", "--repeats", "1", "--task", "wordy", "--split", "generalisation",
                 "--model", str(random_model_dir), "--out", str(out), "--no-progress"]) == 0
    ar = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    problems = wordy.generate("generalisation", 2, seed=0)
    outs = s2d2.load(str(random_model_dir)).generate([p.prompt for p in problems], s2d2.DecodeConfig(method="ar"))
    assert ar["method"] == "ar" and ar["stats"]["num_tokens"] == sum(o.stats.num_tokens for o in outs)
    assert ar["accuracy"] == sum(wordy.is_correct(p, o.text) for p, o in zip(problems, outs)) / 2
    assert "2 generalisation problems" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(["bench", "--task", "arith", "--quick", "--split", "generalisation", "--model",
                 str(random_model_dir), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == ("s2d2: error: task arith has the splits train, validation, test; "
                                              "got 'generalisation'.")


def test_the_progress_bar_names_a_throughput_cell_in_words(capsys):
    from s2d2.evaluation.bench import _shuffled_rounds

    runs = _shuffled_rounds([("ar", 4), ("s2d2", 16)], lambda cell: cell[1], 2, 0, "throughput")
    assert runs == {("ar", 4): [4, 4], ("s2d2", 16): [16, 16]}
    err = capsys.readouterr().err
    assert "throughput" in err and ("ar at batch 4" in err or "s2d2 at batch 16" in err) and "('" not in err
