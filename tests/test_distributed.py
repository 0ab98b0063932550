"""Data-parallel eval and bench on torch.distributed: two CPU processes (gloo, loopback, launched by torchrun) give
exactly the accuracy, the per-problem records and the summed counters of one process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from s2d2.evaluation.distributed import shard_bounds

pytestmark = pytest.mark.slow  # torchrun processes

EXACT = ("num_prompts", "num_tokens", "prompt_tokens", "nfe", "draft_forwards", "verify_forwards", "fused_drafts",
         "steps", "proposed_tokens", "accepted_tokens", "corrected_tokens", "fallback_tokens",
         "accepted_per_position", "proposed_per_position")


def _run_module(module: str, args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in one process, or under ``torchrun --standalone --nproc-per-node N``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = (launcher if processes > 1 else [sys.executable]) + ["-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _why(done: subprocess.CompletedProcess) -> str:
    """A failed job's cause: the ranks' own error lines (torchrun's summary, last in stderr, does not name it)."""
    lines = done.stderr.splitlines()
    own = [line for line in lines if re.search(r"Error|error:|terminate|abort|Exception|Traceback", line)
           and "torch/distributed" not in line]
    return "\n".join(own[:40] + ["..."] + lines[-15:])


def _run(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    """The ``s2d2`` command (``python -m s2d2``), in one process or several."""
    return _run_module("s2d2", args, processes, cwd)


def test_shards_cover_every_item_once_in_order():
    for n in (0, 1, 5, 9, 64):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


@pytest.mark.parametrize("n, flags", [
    (9, ["--method", "s2d2"]),  # uneven shards
    (1, ["--method", "dynamic", "--threshold", "0.3"]),  # one rank has nothing to decode
    (7, ["--method", "s2d2", "--temperature", "0.8", "--seed", "3"]),  # sampled: row i draws from seed + i anywhere
])
def test_eval_on_two_processes_equals_one(random_model_dir, tmp_path, n, flags):
    results = {}
    for processes in (1, 2):
        samples = tmp_path / f"samples{processes}.jsonl"
        done = _run(["eval", "--model", str(random_model_dir), "--limit", str(n), "--max-new-tokens", "12",
                     "--batch-size", "3", "--json", "--samples", str(samples), *flags], processes, tmp_path)
        assert done.returncode == 0, _why(done)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1  # rank 0 alone prints
        results[processes] = (json.loads(lines[0]), samples.read_text())
    (one, one_samples), (two, two_samples) = results[1], results[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["accuracy"] == two["accuracy"] and one["accuracy_by_level"] == two["accuracy_by_level"]
    assert {k: one["stats"][k] for k in EXACT} == {k: two["stats"][k] for k in EXACT}
    assert one_samples == two_samples and len(one_samples.splitlines()) == n


def test_bench_on_two_processes_equals_one(random_model_dir, tmp_path):
    records = {}
    for processes in (1, 2):
        out = tmp_path / f"bench{processes}"
        done = _run(["bench", "--model", str(random_model_dir), "--quick", "--limit", "5",
                     "--no-progress", "--out", str(out)], processes, tmp_path)
        assert done.returncode == 0, _why(done)
        records[processes] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records[1]] == [r["name"] for r in records[2]]
    for a, b in zip(records[1], records[2]):
        assert (a["accuracy"], a["tokens_per_forward"], a["nfe_per_token"]) == \
            (b["accuracy"], b["tokens_per_forward"], b["nfe_per_token"])
        assert {k: a["stats"][k] for k in EXACT} == {k: b["stats"][k] for k in EXACT}


def test_the_batched_throughput_section_is_refused_under_torchrun(random_model_dir, tmp_path):
    done = _run(["bench", "--model", str(random_model_dir), "--quick", "--limit", "2", "--batch-sizes", "1", "2",
                 "--no-grid", "--out", str(tmp_path / "b")], 2, tmp_path)
    assert done.returncode != 0
    assert "--batch-sizes measures one process's batched engine; run it without torchrun." in done.stderr
    assert "s2d2/cli.py" not in done.stderr  # one sentence from every rank (torchrun then reports the failed job)


def test_lm_eval_on_two_processes_equals_one(random_model_dir, tmp_path):
    """lm-eval's own data parallelism (its evaluator shards documents by the model's rank and world size, which the
    s2d2 model takes from the launcher's RANK / WORLD_SIZE, as under ``accelerate launch``): a generation task and a
    multiple-choice (log-likelihood) task give the same logged responses and metrics as one process."""
    pytest.importorskip("lm_eval")
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"lm{processes}"
        done = _run_module("s2d2.lm_eval", ["--model", "s2d2", "--model_args",
                                            f"pretrained={random_model_dir},method=dynamic,block_size=4,threshold=0.5",
                                            "--tasks", "s2d2_arith,s2d2_arith_mc", "--limit", "5", "--device", "cpu",
                                            "--output_path", str(out), "--log_samples"], processes, tmp_path)
        assert done.returncode == 0, _why(done)
        results = json.loads(next(out.rglob("results*.json")).read_text())["results"]
        samples = {}
        for task in ("s2d2_arith", "s2d2_arith_mc"):
            (path,) = (p for p in out.rglob("samples_*.jsonl") if re.fullmatch(rf"samples_{task}_\d{{4}}-.*", p.name))
            # each request's first response (lm-eval pads a rank that has fewer requests by repeating its last one,
            # whose response list then grows)
            samples[task] = sorted((d["doc_id"], [r[0] for r in d["resps"]])
                                   for d in map(json.loads, path.read_text().splitlines()))
        outputs[processes] = (results, samples)
    (one, one_samples), (two, two_samples) = outputs[1], outputs[2]
    assert one_samples["s2d2_arith"] == two_samples["s2d2_arith"]
    # log-likelihoods: equal up to float rounding (each rank packs its own batches), greedy flags exactly
    mc_one, mc_two = one_samples["s2d2_arith_mc"], two_samples["s2d2_arith_mc"]
    assert [d for d, _ in mc_one] == [d for d, _ in mc_two] == list(range(5))
    for (_, a), (_, b) in zip(mc_one, mc_two):
        flat_a, flat_b = list(a), list(b)
        assert [x[1] for x in flat_a] == [x[1] for x in flat_b]
        assert [float(x[0]) for x in flat_a] == pytest.approx([float(x[0]) for x in flat_b], rel=1e-5)
    for task in ("s2d2_arith", "s2d2_arith_mc"):
        assert {k: v for k, v in one[task].items() if "stderr" not in k} == \
            {k: v for k, v in two[task].items() if "stderr" not in k}
