"""generation_config.json's sampling defaults: the serving convention (fields a request leaves unset take the
checkpoint's values), ``generation_config="none"`` to ignore the file, and greedy measurement in eval/bench."""

from __future__ import annotations

import json
import shutil

import pytest

import s2d2
from s2d2 import DecodeConfig
from s2d2.checkpoint import read_generation_defaults
from s2d2.cli import main
from s2d2.evaluation.bench import Setting

PROMPT = [72, 101, 108, 108, 111, 32]
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9}
SAMPLING_DEFAULTS_OF_FILE = {"temperature": 0.7, "top_k": 5, "top_p": 0.9}


def _with_generation_config(src, dst, fields):
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return dst


@pytest.fixture(scope="module")
def sampling_dir(random_model_dir, tmp_path_factory):
    return _with_generation_config(random_model_dir, tmp_path_factory.mktemp("gc") / "m", SAMPLING)


@pytest.fixture(scope="module")
def sampling_model(sampling_dir) -> s2d2.Model:
    return s2d2.load(str(sampling_dir))


def _ids(model, cfg):
    return model.generate(PROMPT, cfg)[0].token_ids


def test_the_checkpoint_file_is_read_as_decode_config_fields(sampling_dir, random_model_dir, tmp_path):
    assert read_generation_defaults(sampling_dir) == {"temperature": 0.7, "top_k": 5, "top_p": 0.9}
    assert read_generation_defaults(random_model_dir) == {}  # no sampling keys: nothing, not transformers' top_k 50
    greedy = _with_generation_config(random_model_dir, tmp_path / "g", {**SAMPLING, "do_sample": False})
    assert read_generation_defaults(greedy) == {"temperature": 0.0}  # do_sample false means greedy, as in HF
    bad = _with_generation_config(random_model_dir, tmp_path / "b", {"temperature": -1})
    with pytest.raises(s2d2.ModelLoadError, match="generation_config.json holds an invalid sampling default"):
        s2d2.load(str(bad))


def test_unset_sampling_fields_take_the_checkpoint_defaults(sampling_model):
    explicit = DecodeConfig(method="s2d2", seed=3, max_new_tokens=24, stop_token_ids=(), **{
        k: v for k, v in SAMPLING.items() if k != "do_sample"}, generation_config="none")
    implicit = DecodeConfig(method="s2d2", seed=3, max_new_tokens=24, stop_token_ids=())
    greedy = DecodeConfig(method="s2d2", seed=3, max_new_tokens=24, stop_token_ids=(), generation_config="none")
    assert _ids(sampling_model, implicit) == _ids(sampling_model, explicit)
    assert _ids(sampling_model, implicit) != _ids(sampling_model, greedy)


def test_a_field_the_caller_sets_wins_over_the_file(sampling_model):
    base = dict(method="s2d2", seed=3, max_new_tokens=24, stop_token_ids=())
    got = _ids(sampling_model, DecodeConfig(**base, temperature=0.0))
    assert got == _ids(sampling_model, DecodeConfig(**base, generation_config="none"))
    # only top_k given: temperature and top_p still come from the file
    mixed = _ids(sampling_model, DecodeConfig(**base, top_k=2))
    assert mixed == _ids(sampling_model, DecodeConfig(**base, temperature=0.7, top_k=2, top_p=0.9,
                                                      generation_config="none"))


def test_config_tracks_which_sampling_fields_were_set():
    cfg = DecodeConfig(top_k=3)
    assert cfg.temperature == 0.0 and cfg.top_p == 1.0 and cfg.top_k == 3  # built-in defaults stay usable
    assert cfg.is_set("top_k") and not cfg.is_set("temperature")
    filled = cfg.with_generation_defaults({"temperature": 0.6, "top_k": 20, "top_p": 0.95})
    assert (filled.temperature, filled.top_k, filled.top_p) == (0.6, 3, 0.95)
    assert filled.replace(block_size=8).temperature == 0.6  # filled fields are set from then on
    assert cfg.replace(generation_config="none").with_generation_defaults({"temperature": 0.6}).temperature == 0.0


def test_cli_generate_follows_the_file_and_eval_measures_greedily(sampling_dir, capsys):
    args = ["--model", str(sampling_dir), "--max-new-tokens", "16", "--seed", "3", "--json", "--stop-token-ids"]
    assert main(["generate", "Hello", *args]) == 0
    sampled = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["generate", "Hello", *args, "--generation-config", "none"]) == 0
    greedy = json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["generate", "Hello", *args, "--temperature", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == greedy != sampled



def test_cli_eval_measures_greedily_unless_told(sampling_dir, monkeypatch, capsys):
    import s2d2.evaluation.evaluate

    seen = []
    real = s2d2.evaluation.evaluate.evaluate
    monkeypatch.setattr(s2d2.evaluation.evaluate, "evaluate", lambda m, cfg, *a, **k: seen.append(cfg) or real(m, cfg, *a, **k))
    args = ["eval", "--n", "1", "--model", str(sampling_dir), "--max-new-tokens", "4", "--json"]
    assert main(args) == 0 and main(args + ["--generation-config", "auto"]) == 0
    capsys.readouterr()
    assert seen[0].with_generation_defaults(SAMPLING_DEFAULTS_OF_FILE).temperature == 0.0
    assert seen[1].with_generation_defaults(SAMPLING_DEFAULTS_OF_FILE).temperature == 0.7


def test_bench_settings_are_greedy_unless_they_ask_for_sampling():
    assert Setting("a", {"method": "ar"}).config().generation_config == "none"
    assert Setting("a", {"method": "ar", "generation_config": "auto"}).config().generation_config == "auto"
