"""The family registry: each published model_type reaches its family, and what a family reads of config.json
beyond the architecture (the dtype it was trained in) comes from the family's own module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from s2d2.api import _resolve_dtype
from s2d2.errors import ModelLoadError
from s2d2.families import BY_MODEL_TYPE, FAMILIES, family_for
from s2d2.training.random_init import FAMILIES as RANDOM_FAMILIES
from s2d2.training.random_init import write_random_model


def test_every_family_is_registered_once_under_its_model_types():
    assert sorted(f.family for f in FAMILIES) == sorted(RANDOM_FAMILIES)
    assert {t: f.family for t, f in BY_MODEL_TYPE.items()} == {
        "sdar": "sdar", "qwen3": "sdar", "Fast_dLLM_Qwen": "fast_dllm_v2", "llada2_moe": "llada2",
        "llada": "d2f_llada", "Dream": "d2f_dream"}


@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_a_written_checkpoint_reaches_its_family(tmp_path: Path, family: str):
    import json

    path = write_random_model(tmp_path / family, family)
    assert family_for(json.loads((path / "config.json").read_text())).family == family


def test_an_unknown_model_type_is_one_sentence():
    with pytest.raises(ModelLoadError, match=r"^model_type 'gpt2' in x/config.json is not supported; supported: sdar"):
        family_for({"model_type": "gpt2"}, "x/config.json")


@pytest.mark.parametrize("config, want", [
    ({"model_type": "sdar", "torch_dtype": "bfloat16"}, torch.bfloat16),
    ({"model_type": "Fast_dLLM_Qwen", "dtype": "float16"}, torch.float16),
    ({"model_type": "llada", "precision": "amp_bf16"}, torch.bfloat16),  # LLaDA's OLMo config names a precision
    ({"model_type": "llada", "precision": "amp_bf16", "torch_dtype": "float16"}, torch.float16),
    ({"model_type": "sdar", "precision": "amp_bf16"}, torch.float32),  # only LLaDA's config means it so
    ({"model_type": "Dream"}, torch.float32),
])
def test_auto_dtype_is_the_checkpoints_training_dtype_on_an_accelerator(config, want, monkeypatch):
    assert _resolve_dtype("auto", config, torch.device("cuda"), Path("m")) == want
    # on a CPU the model's size decides, not the checkpoint (tests/test_memory.py); without native bf16, float32
    monkeypatch.setattr("s2d2.api.cpu_has_bf16", lambda: False)
    assert _resolve_dtype("auto", config, torch.device("cpu"), Path("m")) == torch.float32
