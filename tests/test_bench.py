"""`s2d2 bench`: same prompts for every setting, the three output files, speedups against AR, grid errors."""

from __future__ import annotations

import json

from s2d2.bench import Setting, default_grid, run_bench
from s2d2.cli import main


def test_bench_quick_writes_table_records_and_plot(random_model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--n", "3", "--model", str(random_model_dir), "--out", str(out),
                 "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == [s.name for s in default_grid(quick=True)]
    for r in records:
        assert r["n"] == 3 and 0.0 <= r["accuracy"] <= 1.0 and r["stats"]["num_prompts"] == 3
        for key in ("nfe_per_token", "tokens_per_forward", "tokens_per_s", "speedup_vs_ar", "verify_rate",
                    "mean_accepted_length", "loop_share"):
            assert key in r
    assert records[0]["speedup_vs_ar"] == 1.0 and records[0]["nfe_per_token"] == 1.0
    assert (out / "pareto.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| ar |" in table and "speedup vs AR" in table
    assert "| ar |" in capsys.readouterr().out


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
