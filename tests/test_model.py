"""The native Qwen3 decoder against transformers, its KV cache, and loading checkpoints (random ones, on CPU)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: tests never touch the network

import json
import pickle
import time
from pathlib import Path

import pytest
import torch
from hf_reference import qwen3_config
from safetensors.torch import load_file, save_file

from s2d2.checkpoint import (
    SpecialIds,
    load_tokenizer,
    load_weights,
    read_chat_template,
    read_config,
    read_special_ids,
    resolve_model_dir,
)
from s2d2.errors import ConfigError, ModelLoadError
from s2d2.models.decoder import Decoder, DecoderConfig
from s2d2.training.random_init import CHAT_TEMPLATE, FAMILIES, write_random_model

SEQ_LEN = 20
BLOCK = 4


# ------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("sdar"), seed=0)


def load_ours(path: Path) -> Decoder:
    model = Decoder(DecoderConfig.from_hf(read_config(path), qk_norm=True, qkv_bias=False))
    model.load_hf_state_dict(load_weights(path))
    return model.eval()


def load_hf(path: Path):
    """transformers' own Qwen3ForCausalLM with the same config fields and weights (eager attention, float32)."""
    from transformers import Qwen3ForCausalLM

    cfg = read_config(path)
    hf_config = qwen3_config(cfg)
    hf_config._attn_implementation = "eager"
    model = Qwen3ForCausalLM(hf_config).to(torch.float32).eval()
    result = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == (["lm_head.weight"] if cfg["tie_word_embeddings"] else [])
    return model


def tokens(seed: int = 1, n: int = SEQ_LEN, vocab: int = 260) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def causal_mask(n: int) -> torch.Tensor:
    return torch.ones(n, n).tril().bool()


def block_causal_mask(n: int, block: int = BLOCK) -> torch.Tensor:
    pos = torch.arange(n)
    return (pos[:, None] // block) >= (pos[None, :] // block)


@torch.no_grad()
def ours_logits(model: Decoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(ids, torch.arange(len(ids)), model.new_cache(64), mask)


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # A float additive mask: eager attention adds a bool mask to the scores instead of masking (cpu-notes).
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[None, None]
    out = model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None], attention_mask=additive,
                use_cache=False)
    return out.logits[0].float()


def assert_one_sentence(err: pytest.ExceptionInfo) -> None:
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith("."), msg


# ------------------------------------------------------------------------------------ against transformers


@pytest.mark.parametrize("mask_fn", [causal_mask, block_causal_mask], ids=["causal", "block_causal"])
def test_logits_match_transformers(model_dir: Path, mask_fn) -> None:
    ids, mask = tokens(), mask_fn(SEQ_LEN)
    ours, theirs = ours_logits(load_ours(model_dir), ids, mask), hf_logits(load_hf(model_dir), ids, mask)
    assert ours.shape == theirs.shape == (SEQ_LEN, 264)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_block_mask_changes_logits(model_dir: Path) -> None:
    """Guards the test above: the two masks must give different logits, or it would compare nothing new."""
    model, ids = load_ours(model_dir), tokens()
    diff = (ours_logits(model, ids, causal_mask(SEQ_LEN)) - ours_logits(model, ids, block_causal_mask(SEQ_LEN)))
    assert diff.abs().max().item() > 1e-2


def test_tied_embeddings_match_transformers(tmp_path: Path) -> None:
    path = write_random_model(tmp_path, seed=3, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_weights(path)
    ids, mask = tokens(seed=2), block_causal_mask(SEQ_LEN)
    diff = ours_logits(load_ours(path), ids, mask) - hf_logits(load_hf(path), ids, mask)
    assert diff.abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------------ KV cache


@torch.no_grad()
def test_cached_forward_equals_uncached_and_keeps_cache_pure(model_dir: Path) -> None:
    model, ids = load_ours(model_dir), tokens()
    pos, full_mask = torch.arange(SEQ_LEN), causal_mask(SEQ_LEN)
    full = model(ids, pos, model.new_cache(64), full_mask)

    cache = model.new_cache(64)
    model(ids[:12], pos[:12], cache, full_mask[:12, :12], num_store=12)
    assert cache.length == 12
    committed = [(k[:, :12].clone(), v[:, :12].clone()) for k, v in zip(cache.keys, cache.values)]

    tail = model(ids[12:], pos[12:], cache, full_mask[12:, :], num_store=0)
    assert tail.shape == (8, 264)
    assert (tail - full[12:]).abs().max().item() <= 1e-5
    assert cache.length == 12
    for (k0, v0), k1, v1 in zip(committed, cache.keys, cache.values):
        assert torch.equal(k0, k1[:, :12]) and torch.equal(v0, v1[:, :12])

    again = model(ids[12:], pos[12:], cache, full_mask[12:, :], num_store=0)  # the scratch rows left no trace
    assert torch.equal(again, tail)


@torch.no_grad()
def test_logits_from_returns_only_requested_rows(model_dir: Path) -> None:
    model, ids, mask = load_ours(model_dir), tokens(), block_causal_mask(SEQ_LEN)
    full = ours_logits(model, ids, mask)
    part = model(ids, torch.arange(SEQ_LEN), model.new_cache(64), mask, logits_from=15)
    assert part.shape == (5, 264)
    assert (part - full[15:]).abs().max().item() <= 1e-6


# --------------------------------------------------------------------------------------- checkpoint files


def test_sharded_checkpoint_loads(model_dir: Path, tmp_path: Path) -> None:
    weights = load_weights(model_dir)
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_weights(tmp_path)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[n], weights[n]) for n in names)

    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors") as err:
        load_weights(tmp_path)
    assert_one_sentence(err)


def test_tokenizer_round_trip_and_special_ids(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    text = "Hello, world! 12+3=15 é"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("<|im_end|>").ids == [258]
    ids = read_special_ids(model_dir, read_config(model_dir), tok)
    assert ids == SpecialIds(mask_id=259, eos_ids=(258, 256))
    assert tok.id_to_token(ids.mask_id) == "<|MASK|>"
    assert read_chat_template(model_dir) == CHAT_TEMPLATE


def test_special_ids_fall_back_to_tokenizer(tmp_path: Path) -> None:
    path = write_random_model(tmp_path)
    (path / "generation_config.json").unlink()
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    del tok_config["mask_token"]
    tok_config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = {k: v for k, v in read_config(path).items() if k not in ("mask_token_id", "eos_token_id")}
    assert read_special_ids(path, config, load_tokenizer(path)) == SpecialIds(259, (258, 256))
    assert read_chat_template(path) == "D"


def test_random_model_is_deterministic(tmp_path: Path) -> None:
    a = load_file(str(write_random_model(tmp_path / "a", seed=7) / "model.safetensors"))
    b = load_file(str(write_random_model(tmp_path / "b", seed=7) / "model.safetensors"))
    c = load_file(str(write_random_model(tmp_path / "c", seed=8) / "model.safetensors"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)


def test_random_model_families() -> None:
    assert FAMILIES == ("sdar", "fast_dllm_v2", "llada2", "d2f_llada", "d2f_dream")
    with pytest.raises(ConfigError, match="sdar, fast_dllm_v2, llada2, d2f_llada, d2f_dream") as err:
        write_random_model("/nonexistent/never-written", family="gpt2")
    assert_one_sentence(err)


# ------------------------------------------------------------------------------------------ loading errors


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        resolve_model_dir(str(tmp_path / "no-such-model"))
    assert_one_sentence(err)
    assert resolve_model_dir(str(tmp_path)) == tmp_path


def test_file_is_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a model directory") as err:
        resolve_model_dir(str(tmp_path / "model.safetensors"))
    assert_one_sentence(err)


def test_pickle_checkpoint_is_refused_unopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle checkpoint was opened")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="only safetensors") as err:
        load_weights(tmp_path)
    assert_one_sentence(err)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path: Path, damage: str) -> None:
    path = write_random_model(tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\xde\xad\xbe\xef" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors") as err:
        load_weights(path)
    assert_one_sentence(err)


def test_missing_weight(tmp_path: Path) -> None:
    path = write_random_model(tmp_path)
    weights = load_weights(path)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="up_proj") as err:
        load_ours(path)
    assert_one_sentence(err)


def test_wrong_weight_shape(tmp_path: Path) -> None:
    path = write_random_model(tmp_path)
    weights = load_weights(path)
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="k_proj") as err:
        load_ours(path)
    assert_one_sentence(err)


def test_invalid_config_json(tmp_path: Path) -> None:
    path = write_random_model(tmp_path)
    (path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ModelLoadError, match="not valid JSON") as err:
        read_config(path)
    assert_one_sentence(err)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="JSON object") as err:
        read_config(path)
    assert_one_sentence(err)
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json") as err:
        read_config(path)
    assert_one_sentence(err)


def test_corrupt_or_missing_tokenizer(tmp_path: Path) -> None:
    path = write_random_model(tmp_path)
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json") as err:
        load_tokenizer(path)
    assert_one_sentence(err)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json") as err:
        load_tokenizer(path)
    assert_one_sentence(err)


def test_hub_id_offline_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="nonexistent-org/nonexistent-model") as err:
        resolve_model_dir("nonexistent-org/nonexistent-model")
    assert time.monotonic() - start < 10
    assert_one_sentence(err)
