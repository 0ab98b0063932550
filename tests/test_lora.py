"""peft LoRA adapters merged at load (`load(..., adapter=DIR)`, `--adapter DIR`): W + alpha / r * B @ A, checked
against the update computed here in float64, and every unsupported adapter refused in one sentence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import s2d2
from s2d2.checkpoint import load_weights
from s2d2.cli import main
from s2d2.errors import ModelLoadError

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")


def write_adapter(out: Path, base: dict[str, torch.Tensor], r: int = 4, alpha: float = 8.0, seed: int = 0,
                  **config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft-format LoRA adapter on TARGETS of every layer; returns {base weight name: (A, B)}."""
    gen = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    layers = sorted({int(k.split(".")[2]) for k in base if k.startswith("model.layers.")})
    for i in layers:
        for t in TARGETS:
            name = f"model.layers.{i}.{t}"
            out_dim, in_dim = base[name + ".weight"].shape
            a = 0.3 * torch.randn(r, in_dim, generator=gen)
            b = 0.3 * torch.randn(out_dim, r, generator=gen)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            pairs[name + ".weight"] = (a, b)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({t.split(".")[-1] for t in TARGETS}), "fan_in_fan_out": False,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, **config}))
    return pairs


def test_merged_weights_are_base_plus_the_low_rank_update(random_model_dir, tmp_path):
    base = load_weights(random_model_dir)
    pairs = write_adapter(tmp_path / "lora", base)
    merged = s2d2.load(str(random_model_dir), adapter=str(tmp_path / "lora"))
    plain = s2d2.load(str(random_model_dir))
    ours = merged.adapter.model.hf_state_dict()
    for name, tensor in base.items():
        expected = tensor.double()
        if name in pairs:
            a, b = pairs[name]
            expected = expected + 2.0 * (b.double() @ a.double())  # alpha / r = 8 / 4
        torch.testing.assert_close(ours[name].double(), expected, rtol=1e-6, atol=1e-5)
    ids = torch.arange(10)
    with torch.no_grad():
        logits = [m.adapter.model(ids, ids, m.adapter.new_cache(10), torch.ones(10, 10, dtype=torch.bool).tril())
                  for m in (merged, plain)]
    assert (logits[0] - logits[1]).abs().max() > 0.1  # the adapter changes the model


def test_a_zero_update_changes_nothing_and_rslora_scales_by_sqrt_r(random_model_dir, tmp_path):
    base = load_weights(random_model_dir)
    pairs = write_adapter(tmp_path / "rs", base, r=4, alpha=8.0, use_rslora=True)
    ours = s2d2.load(str(random_model_dir), adapter=str(tmp_path / "rs")).adapter.model.hf_state_dict()
    name = next(iter(pairs))
    a, b = pairs[name]
    expected = base[name].double() + 8.0 / math.sqrt(4) * (b.double() @ a.double())
    torch.testing.assert_close(ours[name].double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (dict(use_dora=True), "use_dora"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(bias="all"), "bias"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="IA3"), "LoRA"),
    (dict(r=0), "r >= 1"),
])
def test_unsupported_adapters_are_refused_in_one_sentence(random_model_dir, tmp_path, edit, message):
    write_adapter(tmp_path / "a", load_weights(random_model_dir), **edit)
    with pytest.raises(ModelLoadError, match=message) as err:
        s2d2.load(str(random_model_dir), adapter=str(tmp_path / "a"))
    assert "\n" not in str(err.value)


def test_an_unknown_target_module_is_refused(random_model_dir, tmp_path):
    base = load_weights(random_model_dir)
    write_adapter(tmp_path / "a", base)
    path = tmp_path / "a" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["base_model.model.model.layers.0.self_attn.attn_out.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.layers.0.self_attn.attn_out.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, str(path))
    with pytest.raises(ModelLoadError, match="'attn_out'"):
        s2d2.load(str(random_model_dir), adapter=str(tmp_path / "a"))
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        s2d2.load(str(random_model_dir), adapter=str(tmp_path))  # not an adapter directory


def test_cli_generate_with_an_adapter(random_model_dir, tmp_path, capsys):
    write_adapter(tmp_path / "lora", load_weights(random_model_dir))
    for method in ("ar", "dynamic", "s2d2"):
        assert main(["generate", "x", "--model", str(random_model_dir), "--adapter", str(tmp_path / "lora"),
                     "--method", method, "--max-new-tokens", "8", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["stats"]["nfe"] > 0
    assert main(["generate", "x", "--model", str(random_model_dir), "--adapter", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
