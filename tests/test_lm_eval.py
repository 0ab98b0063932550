"""The lm-eval integration: model_args parsing, request handling, and an offline end-to-end run of s2d2_arith."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

import s2d2  # noqa: E402
from s2d2.config import DecodeConfig  # noqa: E402
from s2d2.errors import ConfigError  # noqa: E402
from s2d2.lm_eval import S2D2LM, TASKS_DIR, decode_config_from_model_args  # noqa: E402


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


@pytest.fixture(scope="module")
def lm(random_model_dir) -> S2D2LM:
    return S2D2LM(pretrained=str(random_model_dir), device=None, method="dynamic",
                  block_size=4, threshold=0.5, max_new_tokens=40, stop_token_ids="")


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


def test_loglikelihood_is_refused_with_a_clear_error(lm):
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood([])


def test_cuda_default_falls_back_to_cpu_without_cuda(random_model_dir):
    lm = S2D2LM(pretrained=str(random_model_dir), device="cuda:0")  # lm-eval's default when --device is unset
    assert lm.model.device.type in ("cpu", "cuda")


def test_task_files_ship_in_the_package():
    assert {p.name for p in TASKS_DIR.iterdir()} >= {"s2d2_arith.yaml", "s2d2_arith.py"}


def test_lm_eval_runs_s2d2_arith_offline_and_agrees_with_s2d2_eval(tmp_path: Path):
    """``python -m s2d2.lm_eval --model s2d2 --tasks s2d2_arith --limit 4``: lm-eval's score on the bundled
    model equals ``s2d2 eval`` on the same problems with the same decoding."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "s2d2.lm_eval", "--model", "s2d2", "--model_args", "method=s2d2,block_size=8",
           "--tasks", "s2d2_arith", "--limit", "4", "--device", "cpu", "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(next(tmp_path.rglob("results*.json")).read_text())["results"]["s2d2_arith"]
    from s2d2.evaluate import evaluate

    expected = evaluate(s2d2.load("bundled"), DecodeConfig(method="s2d2", block_size=8, max_new_tokens=64), n=4)
    assert results["exact_match,strict-match"] == pytest.approx(expected.accuracy)
    assert "tokens/forward" in proc.stderr + proc.stdout  # the decoding stats line


def test_bad_model_args_end_in_one_sentence_and_exit_2(capsys):
    from s2d2.lm_eval import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "s2d2", "--model_args", "blocksize=8", "--tasks", "s2d2_arith", "--limit", "1",
              "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "unknown decoding option 'blocksize'" in capsys.readouterr().err
