"""DecodeConfig validation and the ``s2d2`` command line (in-process and as a real subprocess).

Design contract: a user error ends in one sentence on stderr and exit code 2, never a traceback; the library raises
a typed exception (ConfigError is an S2D2Error) with the same one-line sentence.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import json
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from s2d2.cli import build_parser, config_from_args, main
from s2d2.config import DecodeConfig
from s2d2.errors import ConfigError, S2D2Error
from s2d2.training.random_init import write_random_model

# ---------------------------------------------------------------------------------------------- DecodeConfig


def test_config_error_is_an_s2d2_error() -> None:
    assert issubclass(ConfigError, S2D2Error)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": -4}, "block_size"),
        ({"block_size": 2.0}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"steps": 5, "block_size": 4}, "steps"),
        ({"steps": 0}, "steps"),
        ({"method": "ar", "block_size": 4}, "block_size"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.01}, "threshold"),
        ({"tau_on": 0.0, "tau_off": 0.0}, "tau_on"),
        ({"tau_on": -2.0, "tau_off": -1.0}, "tau_on"),
        ({"method": "foo"}, "method"),
        ({"method": "AR"}, "method"),
        ({"policy": "always"}, "policy"),
        ({"estimator": "entropy"}, "estimator"),
        ({"score_type": "difference"}, "score_type"),
        ({"fallback": "sequential"}, "fallback"),
        ({"ucb_entropy_source": "block"}, "ucb_entropy_source"),
        ({"min_span": 0}, "min_span"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"ucb_span_bins": 0}, "ucb_span_bins"),
        ({"seed": -1}, "seed"),
        ({"penalty": -1.0}, "penalty"),
        ({"margin_threshold": 2.0}, "margin_threshold"),
        ({"stop_token_ids": (3, -1)}, "stop_token_ids"),
        ({"stop_token_ids": (3, "4")}, "stop_token_ids"),
        ({"stop_token_ids": (True,)}, "stop_token_ids"),
        ({"cache_ver": 1}, "cache_ver"),
        ({"draft_ver": "yes"}, "draft_ver"),
        ({"fuse_commit": 0}, "fuse_commit"),
        ({"cache_ver": None}, "cache_ver"),
    ],
)
def test_invalid_values_raise_one_line_config_error(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        DecodeConfig(**kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    assert needle in message  # the sentence names the offending option


@pytest.mark.parametrize("value", [7, 3.5])
def test_scalar_stop_token_ids_raise_config_error(value: object) -> None:
    # A user can write {"stop_token_ids": 7} (a JSON request, a config file): it must be a one-line ConfigError.
    with pytest.raises(ConfigError):
        DecodeConfig(stop_token_ids=value)
    with pytest.raises(ConfigError):
        DecodeConfig.from_dict({"stop_token_ids": value})


def test_replace_validates_again() -> None:
    with pytest.raises(ConfigError):
        DecodeConfig().replace(block_size=0)
    with pytest.raises(ConfigError):
        DecodeConfig(block_size=8).replace(steps=9)


def test_replace_derives_block_size_and_steps_again_unless_they_were_given() -> None:
    assert DecodeConfig().replace(method="ar") == DecodeConfig(method="ar")  # B = 1, not the s2d2 default 4
    assert DecodeConfig(method="ar").replace(method="dynamic").block_size == 4
    assert DecodeConfig(block_size=8).replace(block_size=16).steps == 16  # steps followed the block size
    assert DecodeConfig(block_size=8, steps=2).replace(block_size=16).steps == 2  # given: kept
    with pytest.raises(ConfigError):  # a block size given explicitly is kept, so this is still an error
        DecodeConfig(block_size=4).replace(method="ar")


def test_stop_strings_validate() -> None:
    assert DecodeConfig(stop=["\n", "Q:"]).stop == ("\n", "Q:")
    assert DecodeConfig(stop="##").stop == ("##",)
    assert DecodeConfig(stop=[]).stop is None
    for bad in ([""], [3], 5):
        with pytest.raises(ConfigError, match="stop must be"):
            DecodeConfig(stop=bad)
    assert build_parser().parse_args(["generate", "x", "--stop", "####", "."]).stop == ["####", "."]


def test_defaults_resolve() -> None:
    cfg = DecodeConfig()
    assert (cfg.method, cfg.block_size, cfg.steps) == ("s2d2", 4, 4)
    ar = DecodeConfig(method="ar")
    assert (ar.block_size, ar.steps) == (1, 1)
    assert DecodeConfig(method="ar", block_size=1).block_size == 1
    assert DecodeConfig(block_size=8).steps == 8
    assert DecodeConfig(block_size=8, steps=2).steps == 2
    assert DecodeConfig(method="dynamic").block_size == 4
    assert cfg.greedy is True and DecodeConfig(temperature=0.7).greedy is False
    assert cfg.stop_token_ids is None


def test_boundary_values_are_accepted() -> None:
    DecodeConfig(top_p=1.0, threshold=0.0, temperature=0.0, top_k=0, seed=0)
    DecodeConfig(threshold=1.0, top_p=1e-6, block_size=4, steps=4, tau_on=-0.999, tau_off=-1.0)


def test_stop_token_ids_become_a_tuple() -> None:
    assert DecodeConfig(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert DecodeConfig(stop_token_ids=()).stop_token_ids == ()


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError) as info:
        DecodeConfig.from_dict({"block_size": 8, "blocksize": 8})
    assert "blocksize" in str(info.value) and "\n" not in str(info.value)


def test_from_dict_validates_values() -> None:
    with pytest.raises(ConfigError):
        DecodeConfig.from_dict({"block_size": 0})


def test_to_dict_round_trips() -> None:
    cfg = DecodeConfig(method="s2d2", block_size=8, steps=4, policy="score_hysteresis", tau_on=1.0, tau_off=-5.0,
                       estimator="hard_margin_threshold", score_type="difference_dynamic", penalty=2.0,
                       temperature=0.7, top_k=5, top_p=0.9, seed=3, stop_token_ids=(3, 4), cache_ver=False)
    d = cfg.to_dict()
    assert d["stop_token_ids"] == [3, 4]
    assert set(d) == {f.name for f in fields(DecodeConfig) if f.init}
    assert DecodeConfig.from_dict(d) == cfg
    assert DecodeConfig.from_dict(json.loads(json.dumps(d))) == cfg  # through plain JSON too
    assert DecodeConfig.from_dict(DecodeConfig().to_dict()) == DecodeConfig()


# ------------------------------------------------------------------------------------------ flags -> config


def test_flags_round_trip_into_decode_config() -> None:
    ns = build_parser().parse_args(["generate", "x", "--no-cache-ver", "--block-size", "8", "--policy",
                                    "score_hysteresis", "--tau-on", "1", "--tau-off", "-5", "--stop-token-ids", "3",
                                    "4"])
    cfg = config_from_args(ns)
    assert cfg == DecodeConfig(cache_ver=False, block_size=8, policy="score_hysteresis", tau_on=1.0, tau_off=-5.0,
                               stop_token_ids=(3, 4))
    defaults = DecodeConfig()
    changed = {"cache_ver", "block_size", "steps", "policy", "tau_on", "tau_off", "stop_token_ids", "_derived"}
    for f in fields(DecodeConfig):
        if f.name not in changed:
            assert getattr(cfg, f.name) == getattr(defaults, f.name), f.name
    assert cfg.steps == 8  # defaults to the block size given on the command line
    assert cfg.draft_ver is True and cfg.tau == 0.0


def test_no_flags_give_the_default_config() -> None:
    assert config_from_args(build_parser().parse_args(["generate", "x"])) == DecodeConfig()


def test_every_config_field_has_a_flag() -> None:
    ns = build_parser().parse_args(["generate", "x"])
    for f in fields(DecodeConfig):
        assert hasattr(ns, f.name) or not f.init, f.name


def test_more_flags() -> None:
    ns = build_parser().parse_args(["generate", "x", "--method", "ar", "--temperature", "0.5", "--top-k", "3",
                                    "--top-p", "0.9", "--seed", "7", "--draft-ver", "--no-fuse-commit",
                                    "--ucb-entropy-source", "masked", "--min-span", "2", "--max-new-tokens", "9"])
    cfg = config_from_args(ns)
    assert (cfg.method, cfg.block_size, cfg.steps) == ("ar", 1, 1)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed) == (0.5, 3, 0.9, 7)
    assert (cfg.draft_ver, cfg.fuse_commit, cfg.cache_ver) == (True, False, True)
    assert (cfg.ucb_entropy_source, cfg.min_span, cfg.max_new_tokens) == ("masked", 2, 9)


# ------------------------------------------------------------------------------------------------- CLI runs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("cli-model"), seed=0)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_user_error(code: int, out: str, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("s2d2"), err
    assert out == ""


def _check_generation_json(data: dict, max_new_tokens: int) -> None:
    assert set(data) >= {"text", "token_ids", "finish_reason", "stats"}
    assert isinstance(data["text"], str)
    ids = data["token_ids"]
    assert all(isinstance(t, int) for t in ids)
    stats = data["stats"]
    for key in ("nfe", "num_tokens", "tokens_per_forward", "draft_forwards", "verify_forwards", "accepted_tokens",
                "time_s", "tokens_per_s"):
        assert key in stats, key
    assert data["finish_reason"] in ("stop", "length")
    assert stats["num_tokens"] == len(ids)
    if data["finish_reason"] == "length":
        assert len(ids) == max_new_tokens
    else:
        assert len(ids) < max_new_tokens
    # AR with the fused commit: one draft forward per committed token (the stop token, if any, costs one more)
    committed = len(ids) + (data["finish_reason"] == "stop")
    assert stats["draft_forwards"] == committed
    assert stats["nfe"] == committed
    assert stats["verify_forwards"] == 0 and stats["accepted_tokens"] == 0
    assert stats["tokens_per_forward"] == pytest.approx(len(ids) / committed)
    assert stats["time_s"] > 0
    assert stats["tokens_per_s"] == pytest.approx(len(ids) / stats["time_s"])


@pytest.fixture(scope="module")
def ar_json(model_dir: Path) -> dict:
    """In-process ``s2d2 generate "x" --method ar --temperature 0 --json --max-new-tokens 16``."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["generate", "x", "--model", str(model_dir), "--method", "ar", "--temperature", "0", "--json",
                     "--max-new-tokens", "16"])
    assert code == 0, err.getvalue()
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1  # one JSON object, nothing else on stdout
    return json.loads(lines[0])


def test_generate_json_in_process(ar_json: dict) -> None:
    _check_generation_json(ar_json, 16)


@pytest.mark.slow  # a CLI subprocess
def test_generate_json_subprocess_matches_in_process(model_dir: Path, ar_json: dict) -> None:
    # A real process, through the module's __main__ guard; greedy AR is deterministic, and decoding 4 tokens
    # gives the first 4 of the 16 decoded above.
    proc = subprocess.run(
        [sys.executable, "-m", "s2d2.cli", "generate", "x", "--model", str(model_dir), "--method", "ar",
         "--temperature", "0", "--json", "--max-new-tokens", "4"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    data = json.loads(proc.stdout)
    _check_generation_json(data, 4)
    assert data["token_ids"] == ar_json["token_ids"][: len(data["token_ids"])]


@pytest.mark.slow  # a CLI subprocess
def test_console_script_user_error_subprocess(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("s2d2")
    argv = [str(script)] if script.is_file() else [sys.executable, "-m", "s2d2.cli"]
    proc = subprocess.run(argv + ["generate", "x", "--model", str(tmp_path / "absent"), "--block-size", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("s2d2")
    assert "block_size" in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--block-size", "0"], "block_size"),
        (["--steps", "9", "--block-size", "4"], "steps"),
        (["--method", "foo"], "--method"),
        (["--policy", "always"], "--policy"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--block-size", "two"], "--block-size"),
        (["--tau-on", "-2", "--tau-off", "-1"], "tau_on"),
        (["--method", "ar", "--block-size", "4"], "block_size"),
        (["--stop-token-ids", "3", "-1"], "stop_token_ids"),
    ],
)
def test_generate_bad_flags_exit_2(flags: list[str], needle: str, model_dir: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["generate", "x", "--model", str(model_dir), *flags], capsys)
    _assert_user_error(code, out, err)
    assert needle in err


def test_no_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    _assert_user_error(*_run([], capsys))


def test_empty_prompt(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["generate", "", "--model", str(model_dir)], capsys)
    _assert_user_error(code, out, err)
    assert "empty" in err


def test_prompt_plus_max_new_tokens_exceeds_context(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["generate", "x", "--model", str(model_dir), "--max-new-tokens", "100000"], capsys)
    _assert_user_error(code, out, err)
    assert "2048" in err  # the model's context (max_position_embeddings) is named


def test_missing_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["generate", "x", "--model", str(tmp_path / "no-such-model")], capsys)
    _assert_user_error(code, out, err)
    assert "no-such-model" in err


def test_model_dir_with_invalid_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    code, out, err = _run(["generate", "x", "--model", str(tmp_path)], capsys)
    _assert_user_error(code, out, err)
    assert "config.json" in err


def test_model_dir_with_only_pickle_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a real pickle")
    code, out, err = _run(["generate", "x", "--model", str(tmp_path)], capsys)
    _assert_user_error(code, out, err)


def test_model_dir_with_pickle_weights_beside_a_valid_config(model_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not a real pickle")
    code, out, err = _run(["generate", "x", "--model", str(tmp_path)], capsys)
    _assert_user_error(code, out, err)
    assert "pytorch_model.bin" in err and "safetensors" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available on this machine")
def test_device_cuda_without_cuda(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["generate", "x", "--model", str(model_dir), "--device", "cuda"], capsys)
    _assert_user_error(code, out, err)
    assert "cuda" in err


def test_invalid_device(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["generate", "x", "--model", str(model_dir), "--device", "gpu0"], capsys)
    _assert_user_error(code, out, err)
    assert "gpu0" in err


def test_bad_dtype(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["generate", "x", "--model", str(model_dir), "--dtype", "float8"], capsys)
    _assert_user_error(code, out, err)
    assert "float8" in err


def test_init_random_unknown_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["init-random", "--family", "unknown", "--out", str(tmp_path / "m")], capsys)
    _assert_user_error(code, out, err)
    assert "unknown" in err
    assert not (tmp_path / "m" / "config.json").exists()


def test_init_random_unsupported_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["init-random", "--family", "gpt2", "--out", str(tmp_path / "m")], capsys)
    _assert_user_error(code, out, err)
    assert "gpt2" in err and "d2f_dream" in err
    assert not (tmp_path / "m" / "config.json").exists()


def test_init_random_negative_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["init-random", "--family", "sdar", "--out", str(tmp_path / "m"), "--seed", "-1"], capsys)
    _assert_user_error(code, out, err)


def test_init_random_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "m"
    code, out, err = _run(["init-random", "--family", "sdar", "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()
    before = (out_dir / "model.safetensors").read_bytes()

    code, out, err = _run(["init-random", "--family", "sdar", "--out", str(out_dir), "--seed", "1"], capsys)
    _assert_user_error(code, out, err)
    assert "--force" in err
    assert (out_dir / "model.safetensors").read_bytes() == before  # untouched

    code, out, err = _run(["init-random", "--family", "sdar", "--out", str(out_dir), "--seed", "1", "--force"], capsys)
    assert code == 0, err
    assert (out_dir / "model.safetensors").read_bytes() != before  # a different seed, written over it


def test_init_random_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    code, out, err = _run(["init-random", "--family", "sdar", "--out", str(target)], capsys)
    _assert_user_error(code, out, err)


@pytest.mark.parametrize("name", ["temperature", "ucb_beta", "tau"])
def test_infinite_values_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError):
        DecodeConfig(**{name: float("inf")})


def test_the_command_line_parses_before_it_imports_torch() -> None:
    # `s2d2 --help` and flag errors answer at once; torch (over a second to import) loads only for a command's work
    code = ("import sys; from s2d2.cli import build_parser; build_parser().format_help(); import s2d2; "
            "s2d2.DecodeConfig; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_threads_flag_sets_torchs_threads(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    try:
        assert main(["generate", "x", "--model", str(model_dir), "--max-new-tokens", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert main(["generate", "x", "--model", str(model_dir), "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_the_stats_line_names_only_what_the_method_did(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = {}
    for method, flags in (("ar", []), ("dynamic", []), ("s2d2", ["--policy", "mask_span_length", "--min-span", "1"])):
        assert main(["generate", "x", "--model", str(model_dir), "--method", method, "--max-new-tokens", "8",
                     *flags]) == 0
        lines[method] = capsys.readouterr().err.strip().splitlines()[-1]
    assert lines["ar"].startswith("[ar] ") and "verif" not in lines["ar"] and "draft" not in lines["ar"]
    assert "verif" not in lines["dynamic"] and "accepted" not in lines["dynamic"]
    assert "(draft " in lines["s2d2"] and "verification accepted" in lines["s2d2"] and " of " in lines["s2d2"]


def test_threads_default_to_the_idle_cores() -> None:
    from s2d2.cli import auto_threads, idle_cores

    assert auto_threads(2, idle=2.0) == 2 and auto_threads(2, idle=1.2) == 1 and auto_threads(2, idle=0.0) == 1
    assert auto_threads(8, idle=5.6) == 6 and auto_threads(4, idle=7.9) == 4  # never more than torch's choice
    if idle_cores(0.01) is None:
        pytest.skip("no /proc/stat here: the default is torch's own choice")
    cores = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)  # they have started
        busy = idle_cores(0.2)
    finally:
        for p in spinners:
            p.kill()
    assert busy is not None and busy < 0.5 and auto_threads(cores, idle=busy) == 1  # every core taken: one thread
