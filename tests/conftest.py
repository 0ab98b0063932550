"""Shared fixtures: tiny random models (SDAR, and every other family) written in HF format and loaded through the
public API."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import pytest

import s2d2
from s2d2.training.random_init import write_random_model


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random SDAR checkpoint (seed 0)."""
    return write_random_model(tmp_path_factory.mktemp("sdar-seed0"), seed=0)


@pytest.fixture(scope="session")
def random_models(tmp_path_factory: pytest.TempPathFactory) -> list[s2d2.Model]:
    """Three tiny random SDAR models (seeds 0, 1, 2), loaded."""
    return [s2d2.load(str(write_random_model(tmp_path_factory.mktemp(f"sdar-seed{seed}"), seed=seed)))
            for seed in range(3)]


@pytest.fixture(scope="session")
def model(random_models: list[s2d2.Model]) -> s2d2.Model:
    return random_models[0]


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory: pytest.TempPathFactory):
    """``family_dir(family, seed=0)``: a tiny random checkpoint of ``family`` in its published layout (written once)."""
    written: dict[tuple[str, int], object] = {}

    def get(family: str, seed: int = 0):
        if (family, seed) not in written:
            written[family, seed] = write_random_model(tmp_path_factory.mktemp(f"{family}-seed{seed}"), family,
                                                       seed=seed)
        return written[family, seed]

    return get


@pytest.fixture
def cli_generate_on_random(tmp_path, capsys):
    """``cli_generate_on_random(family, *flags)``: ``s2d2 init-random --family family`` into a fresh directory, then
    ``s2d2 generate "x" --model DIR --max-new-tokens 12 --json *flags``; both must exit 0. Returns the JSON."""
    import json

    from s2d2.cli import main

    def run(family: str, *flags: str) -> dict:
        out = tmp_path / family
        assert main(["init-random", "--family", family, "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["generate", "x", "--model", str(out), "--max-new-tokens", "12", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    return run


@pytest.fixture(scope="session")
def family_model(family_dir):
    """``family_model(family, seed=0)``: the :func:`family_dir` checkpoint, loaded (once)."""
    loaded: dict[tuple[str, int], s2d2.Model] = {}

    def get(family: str, seed: int = 0) -> s2d2.Model:
        if (family, seed) not in loaded:
            loaded[family, seed] = s2d2.load(str(family_dir(family, seed)))
        return loaded[family, seed]

    return get


@pytest.fixture(scope="session")
def device_check():
    """``scripts/device_check.py`` as a module (its checks, and the counters the engine tests share with it)."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
