"""The lm-eval integration: model_args parsing, request handling, and an offline end-to-end run of s2d2_arith."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

import s2d2  # noqa: E402
import s2d2.evaluation.lm_eval  # noqa: E402
from s2d2.config import DecodeConfig  # noqa: E402
from s2d2.errors import ConfigError  # noqa: E402
from s2d2.evaluation.lm_eval import S2D2LM, TASKS_DIR, decode_config_from_model_args  # noqa: E402


def test_model_args_reach_every_decode_config_field():
    cfg = decode_config_from_model_args({"method": "s2d2", "block_size": 8, "policy": "score_hysteresis",
                                         "tau_on": 1, "tau_off": -2.5, "cache_ver": False, "seed": None,
                                         "stop_token_ids": "3 4", "stop": "####"})
    assert cfg == DecodeConfig(method="s2d2", block_size=8, policy="score_hysteresis", tau_on=1.0, tau_off=-2.5,
                               cache_ver=False, stop_token_ids=(3, 4), stop=("####",))
    assert decode_config_from_model_args({"stop_token_ids": 7}).stop_token_ids == (7,)
    assert decode_config_from_model_args({}) == DecodeConfig()
    with pytest.raises(ConfigError, match="unknown decoding option 'blocksize'"):
        decode_config_from_model_args({"blocksize": 8})
    with pytest.raises(ConfigError, match="stop_token_ids must be space-separated int"):
        decode_config_from_model_args({"stop_token_ids": "a b"})
    with pytest.raises(ConfigError, match="threshold"):
        decode_config_from_model_args({"threshold": 2.0})


@pytest.fixture(scope="module", params=["sdar", "fast_dllm_v2", "llada2", "d2f_llada", "d2f_dream"])
def lm(request, random_model_dir, family_dir) -> S2D2LM:
    """The plugin on each family (the family comes from the directory's config.json); the D2F families with their
    LoRA adapter and pipelined blocks, as model_args give them."""
    path = random_model_dir if request.param == "sdar" else family_dir(request.param)
    d2f = dict(adapter=str(path / "lora"), block_add_threshold=0.5) if request.param.startswith("d2f") else {}
    return S2D2LM(pretrained=str(path), device=None, method="dynamic",
                  block_size=4, threshold=0.5, max_new_tokens=40, stop_token_ids="", **d2f)


def test_request_settings_override_model_args(lm):
    cfg = lm._config_for({"until": ["\n\n", "Q:"], "max_gen_toks": 17, "do_sample": False, "temperature": 0.9})
    assert cfg == lm.config.replace(stop=("\n\n", "Q:"), max_new_tokens=17, temperature=0.0)
    assert lm._config_for({"until": "END", "do_sample": True, "temperature": 0.7}).temperature == 0.7
    assert lm._config_for({}) == lm.config


def test_generate_until_equals_the_api_with_stop_strings(lm):
    prompts = [lm.model.decode([65 + i, 66, 67, 68 + i]) for i in range(3)]
    free = lm.model.generate(prompts, lm.config)
    stops = [next(c for c in g.text[5:] if c != "\ufffd") for g in free]  # a whole character, not a byte piece
    requests = [Instance("generate_until", {}, (p, {"until": [s], "max_gen_toks": 40}), i)
                for i, (p, s) in enumerate(zip(prompts, stops))]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert got == [g.text[:g.text.find(s)] for g, s in zip(free, stops)]
    assert lm.stats.num_tokens > 0 and lm.stats.nfe > 0  # decoding stats are kept for the log line


@torch.inference_mode()
def direct_ar_logprobs(model: s2d2.Model, ids: list[int], first: int) -> tuple[float, bool]:
    """log P(ids[first:] | ids[:first]) token by token, each conditional from its own uncached causal forward: a
    mask at position t after ids[:t] (aligned logits), or the last row of ids[:t] (shifted logits)."""
    adapter = model.adapter
    total, greedy = 0.0, True
    for t in range(first, len(ids)):
        tokens = ids[:t] + ([] if adapter.shifted_logits else [adapter.mask_id])
        n = len(tokens)
        logits = adapter.model(torch.tensor(tokens), torch.arange(n), adapter.new_cache(n),
                               torch.ones(n, n, dtype=torch.bool).tril())[-1]
        logp = torch.log_softmax(logits.index_fill(-1, adapter.banned_ids, float("-inf")), dim=-1)
        total += float(logp[ids[t]])
        greedy = greedy and int(logp.argmax()) == ids[t]
    return total, greedy


def test_loglikelihood_equals_ar_mode_logits_computed_directly(lm):
    pairs = [("Q: 2+3", " = 5"), ("ab", "cd ef"), ("x ", "yz"), ("", "hello")]  # trailing space; empty context
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for batch_size in (1, 3):
        lm.batch_size = batch_size
        got = lm.loglikelihood(requests)
        for (context, continuation), (logp, greedy) in zip(pairs, got):
            head, tail = lm._encode_pair(context, continuation)
            assert head + tail == (lm.model.encode(context + continuation) if context else
                                   [lm.model.adapter.stop_ids[0]] + lm.model.encode(continuation))
            expected, expected_greedy = direct_ar_logprobs(lm.model, head + tail, len(head))
            assert logp == pytest.approx(expected, abs=1e-3) and logp < 0 and greedy == expected_greedy
    lm.batch_size = 1
    # the model's own greedy AR continuation is greedy, and no other is
    context = lm.model.encode("Q: 7")
    ar = lm.model.generate(context, DecodeConfig(method="ar", max_new_tokens=4, stop_token_ids=(),
                                                 generation_config="none"))[0].token_ids
    other = ar[:-1] + [(ar[-1] + 1) % 200]
    (_, is_greedy), (_, not_greedy) = lm.model.loglikelihoods([(context, ar), (context, other)])
    assert is_greedy and not not_greedy


def test_continuation_is_the_tail_of_the_whole_encoding_on_a_tokenizer_with_merges():
    """lm-eval's HF model scores ``encode(context + continuation)[len(encode(context)):]`` given ``encode(context)``;
    on a tokenizer whose merges cross the boundary (the bundled model's BPE: "apple" + "s ..." merges into
    "apples") that differs from encoding the continuation alone, and s2d2 must score what lm-eval scores."""
    model = s2d2.load("bundled")
    lm = S2D2LM.wrap(model)
    context, continuation = "How many apple", "s does he have?"
    head, whole = model.encode(context), model.encode(context + continuation)
    assert head + model.encode(continuation) != whole  # the merge crosses the boundary: the split matters here
    assert lm._encode_pair(context, continuation) == (head, whole[len(head):])
    ((logp, greedy),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    expected, expected_greedy = direct_ar_logprobs(model, head + whole[len(head):], len(head))
    assert logp == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy


def test_loglikelihood_rolling_scores_every_token_once(lm, monkeypatch):
    text = "the quick brown fox jumps over the lazy dog"
    tokens = lm.model.encode(text)
    (whole,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert whole == pytest.approx(lm.model.loglikelihoods([([lm.model.adapter.stop_ids[0]], tokens)])[0][0], abs=1e-3)
    scored = []
    real = lm.model.loglikelihoods
    monkeypatch.setattr(lm.model, "loglikelihoods",
                        lambda pairs, batch_size: scored.extend(len(c) for _, c in pairs) or real(pairs, batch_size))
    monkeypatch.setattr(lm.model.adapter, "max_positions", 8)  # force several windows
    (windowed,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert sum(scored) == len(tokens) and len(scored) > 1 and windowed < 0


@pytest.mark.slow  # an lm-eval subprocess
def test_multiple_choice_task_offline_on_the_bundled_model(tmp_path: Path):
    """``--tasks s2d2_arith_mc``: lm-eval's accuracy equals the share of problems whose true solution gets the
    highest Model.loglikelihoods score, computed here; the bundled model picks the true final answer."""
    from s2d2.evaluation.lm_eval_tasks.s2d2_arith import load_choices

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "s2d2.lm_eval", "--model", "s2d2", "--batch_size", "8", "--tasks",
           "s2d2_arith_mc", "--limit", "20", "--device", "cpu", "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    acc = json.loads(next(tmp_path.rglob("results*.json")).read_text())["results"]["s2d2_arith_mc"]["acc,none"]
    model = s2d2.load("bundled")
    docs = load_choices(20)["test"]
    right = 0
    for doc in docs:
        context = model.encode(doc["prompt"])
        scores = model.loglikelihoods([(context, model.encode(doc["prompt"] + " " + c)[len(context):])
                                       for c in doc["choices"]])
        right += max(range(len(scores)), key=lambda k: scores[k][0]) == doc["label"]
    assert acc == pytest.approx(right / 20) and acc >= 0.9


def test_cuda_default_falls_back_to_cpu_without_cuda(random_model_dir, monkeypatch):
    lm = S2D2LM(pretrained=str(random_model_dir), device="cuda:0")  # lm-eval's default when --device is unset
    if torch.cuda.is_available():
        assert lm.model.device.type == "cuda"  # a CUDA device is there: it is used
    else:
        assert lm.model.device == torch.device("cpu")
        assert next(lm.model.adapter.model.parameters()).device == torch.device("cpu")
    # the other branch too, whatever this machine has: the device asked for reaches s2d2.load, cuda:0 kept where
    # CUDA is available and replaced by cpu where it is not
    for available, expected in ((True, "cuda:0"), (False, "cpu")):
        asked = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        monkeypatch.setattr(s2d2.evaluation.lm_eval, "load", lambda pretrained, device, dtype, adapter=None,
                            compile=False: asked.append(device) or lm.model)
        S2D2LM(pretrained=str(random_model_dir), device="cuda:0")
        assert asked == [expected]


def test_task_files_ship_in_the_package():
    assert {p.name for p in TASKS_DIR.iterdir()} >= {"s2d2_arith.yaml", "s2d2_arith.py", "s2d2_wordy.yaml",
                                                      "s2d2_wordy_generalisation.yaml"}


@pytest.mark.parametrize("name, task, split", [("s2d2_arith", "arith", "test"), ("s2d2_wordy", "wordy", "test"),
                                               ("s2d2_wordy_generalisation", "wordy", "generalisation")])
def test_generation_tasks_hold_the_splits_s2d2_eval_decodes(name, task, split):
    """Each task's data, built from its yaml's metadata as lm-eval does, is the first problems of the task's split
    in `s2d2 eval`'s order (test) and of its validation split (validation)."""
    import yaml

    from s2d2.evaluation.lm_eval_tasks.s2d2_arith import load
    from s2d2.evaluation.tasks import task_module

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)  # the !function tag: not needed here
    config = yaml.load((TASKS_DIR / f"{name}.yaml").read_text(), Loader=_Loader)
    assert config["task"] == name
    data = load(**{**config["metadata"], "num_problems": 4})
    module = task_module(task)
    for ds_split, want in (("test", split), ("validation", "validation")):
        problems = module.generate(want, 4, seed=0)
        assert [r["prompt"] for r in data[ds_split]] == [p.prompt for p in problems]
        assert [r["answer"] for r in data[ds_split]] == [str(p.answer) for p in problems]


_STATS_LINE = re.compile(r"s2d2 decoding so far: (\d+) tokens, NFE (\d+),")


def _run_lm_eval(model_args: str, out: Path) -> tuple[dict, list[dict], tuple[int, int]]:
    """One offline lm-eval run of s2d2_arith on the bundled model (5 problems, samples logged): the task's results,
    the logged samples by doc_id, and the (tokens, NFE) of the last decoding-stats line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "s2d2.lm_eval", "--model", "s2d2", "--model_args", model_args, "--tasks",
           "s2d2_arith", "--limit", "5", "--device", "cpu", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(next(out.rglob("results*.json")).read_text())["results"]["s2d2_arith"]
    (samples_file,) = out.rglob("samples_s2d2_arith_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda d: d["doc_id"])
    stats_lines = _STATS_LINE.findall(proc.stderr + proc.stdout)
    assert stats_lines, "no decoding-stats line in lm-eval's output"
    tokens, nfe = stats_lines[-1]
    return results, samples, (int(tokens), int(nfe))


@pytest.mark.slow  # an lm-eval subprocess
def test_lm_eval_runs_s2d2_arith_offline_and_agrees_with_s2d2_eval(tmp_path: Path):
    """``python -m s2d2.lm_eval --model s2d2 --tasks s2d2_arith --limit 5 --log_samples``: every raw response is
    ``Model.generate``'s text for that problem with ``--model_args`` plus the task's generation settings, the logged
    stats are their sums, the score agrees with ``s2d2 eval``, and other ``--model_args`` give other outputs."""
    from s2d2.evaluation.evaluate import evaluate
    from s2d2.evaluation.tasks import arith

    problems = arith.generate("test", 5, seed=0)
    model = s2d2.load("bundled")
    # the task's generation_kwargs (s2d2_arith.yaml): until ["\n", "Q:"], max_gen_toks 64, greedy
    task_settings = dict(stop=("\n", "Q:"), max_new_tokens=64, temperature=0.0)
    seen = []
    for model_args, cfg in (("method=s2d2,block_size=8", DecodeConfig(method="s2d2", block_size=8, **task_settings)),
                            ("method=dynamic,block_size=8,threshold=0.1",
                             DecodeConfig(method="dynamic", block_size=8, threshold=0.1, **task_settings))):
        results, samples, (tokens, nfe) = _run_lm_eval(model_args, tmp_path / model_args.replace(",", "_"))
        expected = model.generate([p.prompt for p in problems], cfg)
        assert [d["doc_id"] for d in samples] == list(range(5))
        for d, p, g in zip(samples, problems, expected):
            assert d["arguments"]["gen_args_0"]["arg_0"] == p.prompt
            assert d["arguments"]["gen_args_0"]["arg_1"] == {"until": ["\n", "Q:"], "max_gen_toks": 64,
                                                             "do_sample": False, "temperature": 0.0}
            assert d["resps"] == [[g.text]], (model_args, d["doc_id"])
            assert d["exact_match"] == float(arith.is_correct(p, g.text))
        assert (tokens, nfe) == (sum(g.stats.num_tokens for g in expected), sum(g.stats.nfe for g in expected))
        correct = [arith.is_correct(p, g.text) for p, g in zip(problems, expected)]
        assert results["exact_match,strict-match"] == pytest.approx(sum(correct) / 5)
        seen.append(([d["resps"] for d in samples], nfe, results["exact_match,strict-match"]))
    assert seen[0][:2] != seen[1][:2]  # the responses (or at least their cost) depend on --model_args
    # s2d2 eval on the same problems with the same decoding scores the same
    assert seen[0][2] == pytest.approx(evaluate(model, DecodeConfig(method="s2d2", block_size=8, max_new_tokens=64),
                                                n=5).accuracy)


def test_compile_model_arg_compiles_and_warms_up(random_model_dir, monkeypatch):
    loaded, warmed = [], []
    real = s2d2.load(str(random_model_dir))
    monkeypatch.setattr(real, "warm_up", lambda: warmed.append(True) or 0.5)
    monkeypatch.setattr(s2d2.evaluation.lm_eval, "load", lambda pretrained, device, dtype, adapter=None, compile=False:
                        loaded.append(compile) or real)
    S2D2LM(pretrained=str(random_model_dir), compile=True)
    S2D2LM(pretrained=str(random_model_dir))
    assert loaded == [True, False] and warmed == [True]  # warmed up only when compiled
    with pytest.raises(ConfigError, match="compile must be true or false"):
        S2D2LM(pretrained=str(random_model_dir), compile="yes")


@pytest.mark.slow  # lm-eval's own command line
def test_bad_model_args_end_in_one_sentence_and_exit_2(capsys):
    from s2d2.evaluation.lm_eval import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "s2d2", "--model_args", "blocksize=8", "--tasks", "s2d2_arith", "--limit", "1",
              "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "unknown decoding option 'blocksize'" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--device=cuda:1"]])
def test_cuda_asked_for_without_a_gpu_is_an_error_as_in_the_s2d2_cli(flags, monkeypatch, capsys):
    import lm_eval.__main__

    from s2d2.evaluation.lm_eval import main

    ran = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: ran.append(True))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "s2d2", "--tasks", "s2d2_arith", "--limit", "1", *flags])
    assert exit_info.value.code == 2 and not ran
    assert "no CUDA device is available (use --device cpu)" in capsys.readouterr().err


def test_no_device_flag_means_the_cpu_without_a_gpu(monkeypatch):
    import lm_eval.__main__

    from s2d2.evaluation.lm_eval import main

    argv = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: argv.append(list(sys.argv)))
    main(["--model", "s2d2", "--tasks", "s2d2_arith"])  # lm-eval would pass cuda:0 and the model would warn
    assert argv[0][argv[0].index("--device") + 1] == "cpu"
