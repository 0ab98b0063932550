"""LLaDA2.x family (first step: the MoE model and SDAR's forwards on it; token editing is not here yet): the
published layout, the decoder against transformers' Glm4MoeForCausalLM (the same architecture: per-head q/k norm,
partial NeoX RoPE, dense first layers, grouped-sigmoid routed and shared experts), and the invariants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from single_row import run_commit
from test_distribution import chi_square_pvalue, exact_ar_distribution, sample_counts
from test_engine import (
    assert_batch_independent,
    assert_draft_and_verify_leave_the_cache_unchanged,
    assert_never_verifying_is_dynamic,
    prompts,
)

import s2d2
from s2d2 import DecodeConfig
from s2d2.errors import ModelLoadError
from s2d2.families.sdar import draft_mask
from s2d2.training.random_init import write_random_model

# config.json keys of inclusionAI/LLaDA2.0-mini as published (../shared/checkpoints)
PUBLISHED_CONFIG_KEYS = {
    "architectures", "attention_dropout", "auto_map", "dtype", "embedding_dropout", "first_k_dense_replace",
    "head_dim", "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
    "max_window_layers", "model_type", "moe_intermediate_size", "moe_router_enable_expert_bias", "n_group",
    "norm_head", "norm_softmax", "norm_topk_prob", "num_attention_heads", "num_experts", "num_experts_per_tok",
    "num_hidden_layers", "num_key_value_heads", "num_shared_experts", "output_dropout", "output_router_logits",
    "pad_token_id", "partial_rotary_factor", "rms_norm_eps", "rope_scaling", "rope_theta", "rotary_dim",
    "routed_scaling_factor", "router_dtype", "score_function", "sliding_window", "tie_word_embeddings", "topk_group",
    "transformers_version", "use_bias", "use_cache", "use_qkv_bias", "use_rmsnorm", "use_sliding_window",
    "using_split_qkv_in_self_attention", "vocab_size",
}


@pytest.fixture(scope="module")
def llada_dir(family_dir) -> Path:
    return family_dir("llada2")


@pytest.fixture(scope="module")
def llada(family_model) -> s2d2.Model:
    return family_model("llada2")


def test_the_published_layout_loads(llada_dir, llada):
    config = json.loads((llada_dir / "config.json").read_text())
    assert set(config) == PUBLISHED_CONFIG_KEYS
    index = json.loads((llada_dir / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("model.word_embeddings.weight", "model.layers.0.attention.query_key_value.weight",
                 "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.expert_bias",
                 "model.layers.1.mlp.experts.15.down_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
                 "lm_head.weight"):
        assert name in index, name
    tok = llada.tokenizer
    assert llada.adapter.family == "llada2" and llada.adapter.mask_id == tok.token_to_id("<|mask|>")
    assert set(llada.adapter.stop_ids) == {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|role_end|>")}
    assert llada.resolve_config(DecodeConfig()).block_size == 32
    assert llada.apply_chat_template([{"role": "user", "content": "hi"}]).endswith(
        "<role>HUMAN</role>hi<|role_end|><role>ASSISTANT</role>".replace("HUMAN", "USER"))


@pytest.mark.parametrize("key, value", [("score_function", "softmax"), ("norm_head", True),
                                        ("moe_router_enable_expert_bias", False), ("use_qkv_bias", True)])
def test_unsupported_config_values_are_refused_in_one_sentence(tmp_path, key, value):
    path = write_random_model(tmp_path / "m", "llada2")
    config = json.loads((path / "config.json").read_text())
    config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=key) as err:
        s2d2.load(str(path))
    assert "\n" not in str(err.value)


def test_logits_equal_transformers_glm4_moe(llada_dir, llada):
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    c = json.loads((llada_dir / "config.json").read_text())
    hf = Glm4MoeForCausalLM(Glm4MoeConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], head_dim=c["head_dim"], rms_norm_eps=c["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"],
                         "partial_rotary_factor": c["partial_rotary_factor"]},
        max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=False, attention_bias=False,
        moe_intermediate_size=c["moe_intermediate_size"], num_experts_per_tok=c["num_experts_per_tok"],
        n_shared_experts=c["num_shared_experts"], n_routed_experts=c["num_experts"],
        routed_scaling_factor=c["routed_scaling_factor"], n_group=c["n_group"], topk_group=c["topk_group"],
        first_k_dense_replace=c["first_k_dense_replace"], norm_topk_prob=True, use_qk_norm=True))
    hf = hf.to(torch.float32).eval()
    ours: dict[str, torch.Tensor] = {}
    for file in sorted(llada_dir.glob("model-*.safetensors")):
        ours.update(load_file(str(file)))
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    theirs: dict[str, torch.Tensor] = {"model.embed_tokens.weight": ours["model.word_embeddings.weight"],
                                       "model.norm.weight": ours["model.norm.weight"],
                                       "lm_head.weight": ours["lm_head.weight"]}
    for i in range(c["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", f"model.layers.{i}."
        qkv = ours[p + "attention.query_key_value.weight"]
        theirs.update({t + "self_attn.q_proj.weight": qkv[:q], t + "self_attn.k_proj.weight": qkv[q:q + kv],
                       t + "self_attn.v_proj.weight": qkv[q + kv:],
                       t + "self_attn.q_norm.weight": ours[p + "attention.query_layernorm.weight"],
                       t + "self_attn.k_norm.weight": ours[p + "attention.key_layernorm.weight"],
                       t + "self_attn.o_proj.weight": ours[p + "attention.dense.weight"],
                       t + "input_layernorm.weight": ours[p + "input_layernorm.weight"],
                       t + "post_attention_layernorm.weight": ours[p + "post_attention_layernorm.weight"]})
        if i < c["first_k_dense_replace"]:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                theirs[t + f"mlp.{proj}.weight"] = ours[p + f"mlp.{proj}.weight"]
            continue
        e = range(c["num_experts"])
        theirs[t + "mlp.gate.weight"] = ours[p + "mlp.gate.weight"]
        theirs[t + "mlp.gate.e_score_correction_bias"] = ours[p + "mlp.gate.expert_bias"]
        theirs[t + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
            [ours[p + f"mlp.experts.{k}.gate_proj.weight"], ours[p + f"mlp.experts.{k}.up_proj.weight"]]) for k in e])
        theirs[t + "mlp.experts.down_proj"] = torch.stack([ours[p + f"mlp.experts.{k}.down_proj.weight"] for k in e])
        for proj in ("gate_proj", "up_proj", "down_proj"):
            theirs[t + f"mlp.shared_experts.{proj}.weight"] = ours[p + f"mlp.shared_experts.{proj}.weight"]
    result = hf.load_state_dict(theirs, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.tensor([[5, 77, 120, 3, 250, 9, 41, 200, 13, 64, 101, 33]])
    n = ids.shape[1]
    with torch.no_grad():
        expected = hf(ids).logits[0]
        got = llada.adapter.model(ids[0], torch.arange(n), llada.adapter.new_cache(n),
                                  torch.ones(n, n, dtype=torch.bool).tril())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_masks_really_mask(llada):
    """Changing a later block moves no logit of an earlier one (block-causal draft mask, boolean)."""
    adapter = llada.adapter
    a = torch.tensor(list(range(40, 56)))
    b = a.clone()
    b[12:] = torch.tensor([7, 8, 9, 10])  # the last block of 4
    mask = draft_mask(12, 4, 0, True, True, adapter.device)
    out = [adapter.model(x, torch.arange(16), adapter.new_cache(16), mask) for x in (a, b)]
    # equal up to float rounding (experts multiply other row counts); the reference's float masks move them by ~12
    torch.testing.assert_close(out[0][:12], out[1][:12], rtol=0, atol=1e-4)
    assert (out[0][12:] - out[1][12:]).abs().max() > 0.1


@pytest.mark.parametrize("cfg", [
    dict(method="ar"),
    dict(method="s2d2", policy="mask_span_length", min_span=1, block_size=4),
    dict(method="s2d2", policy="mask_span_length", min_span=1, block_size=8, sub_block_size=4),
])
def test_greedy_verifying_every_step_equals_ar(llada, cfg):
    ar = DecodeConfig(method="ar", max_new_tokens=16, stop_token_ids=(), generation_config="none")
    config = DecodeConfig(**cfg, max_new_tokens=16, stop_token_ids=(), generation_config="none")
    for prompt in ([72, 101, 108, 108, 111], list(range(40, 48)), [3, 250, 9]):
        assert llada.generate(prompt, config, batch_size=1)[0].token_ids == \
            llada.generate(prompt, ar, batch_size=1)[0].token_ids


def test_never_verifying_is_dynamic_and_batched_equals_batch_1(llada):
    assert_never_verifying_is_dynamic(llada, [[72, 101, 108, 108, 111], list(range(40, 56))], block_size=8,
                                      threshold=0.3, max_new_tokens=16, stop_token_ids=(), generation_config="none")
    for cfg in (dict(method="ar"), dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1),
                dict(method="dynamic", block_size=8, threshold=0.5)):
        assert_batch_independent(llada, prompts(6, seed=20), DecodeConfig(**cfg, max_new_tokens=16,
                                                                          stop_token_ids=()), batch_size=4)


@pytest.mark.slow  # statistical: thousands of sampled decodes
def test_sampled_s2d2_draws_from_the_ar_distribution(llada):
    target = exact_ar_distribution(llada)
    counts = sample_counts(llada, method="s2d2", policy="mask_span_length", min_span=1, generation_config="none")
    assert chi_square_pvalue(counts, target) > 1e-3


_METHODS = [["--method", "ar"], ["--method", "static"], ["--method", "dynamic"], ["--method", "s2d2"]]
_EDITING = ["--editing-threshold", "0.9", "--max-post-steps", "2"]


@pytest.mark.parametrize("flags", _METHODS + [["--method", "s2d2", "--block-size", "4"]] + [
    f + _EDITING for f in _METHODS + [["--method", "s2d2", "--policy", "contextual_bandit_ucb"]]])
def test_cli_generate_on_an_init_random_directory(cli_generate_on_random, flags):
    """Every method, with and without token editing (UCB too)."""
    result = cli_generate_on_random("llada2", *flags)
    assert 0 < len(result["token_ids"]) <= 12 and result["stats"]["nfe"] > 0 and "edits" in result["stats"]


# ------------------------------------------------------------------------------------------------------ editing
EDIT = dict(editing_threshold=0.3, max_post_steps=4)


def run_traced(model: s2d2.Model, prompt: list[int], cfg: DecodeConfig):
    """Decode one prompt, recording each draft's view of everything before its block; returns (tokens, stats,
    snapshots, cache)."""
    from s2d2.core.loop import decode_steps
    from s2d2.core.requests import DraftRequest
    from s2d2.engine.runner import drive, run_request

    adapter = model.adapter
    cache = adapter.new_cache(256)
    snapshots = []

    def forward(request):
        if isinstance(request, DraftRequest):
            snapshots.append((request.block_start, request.ids[:request.block_start]))
        return run_request(adapter, request, cache)

    with torch.inference_mode():
        tokens, _, stats = drive(decode_steps(prompt, cfg, cache, adapter.traits), cache, forward)
    return tokens, stats, snapshots, cache


@pytest.mark.parametrize("method", [dict(method="dynamic", threshold=0.5), dict(method="s2d2"),
                                    dict(method="s2d2", policy="mask_span_length", min_span=1, editing_threshold=0.05)])
def test_edits_touch_only_the_current_block_and_the_cache_holds_final_tokens(llada, method):
    """Edits fire; every draft sees the prompt and earlier blocks exactly as they end up; the cache holds the K/V of
    the final tokens (a block's K/V enter it only after its last edit)."""
    cfg = llada.resolve_config(DecodeConfig(**{**EDIT, **method}, block_size=4, max_new_tokens=24,
                                            stop_token_ids=(), generation_config="none"))
    total_edits = 0
    for prompt in ([72, 101, 108, 108, 111], list(range(40, 48))):
        tokens, stats, snapshots, cache = run_traced(llada, prompt, cfg)
        total_edits += stats.edits
        final = prompt + tokens
        for start, before in snapshots:
            assert before == final[:start]
        n = cache.length
        fresh = llada.adapter.new_cache(n)
        run_commit(llada.adapter, torch.tensor(final), fresh, n, 4, cache_ver=True)
        for ours, expected in zip(cache.keys, fresh.keys):
            torch.testing.assert_close(ours[:, :n], expected[:, :n], rtol=1e-5, atol=1e-5)
    assert total_edits > 0


def test_never_verifying_is_dynamic_with_editing(llada):
    outs = assert_never_verifying_is_dynamic(llada, [[72, 101, 108, 108, 111], list(range(40, 56))], block_size=8,
                                             threshold=0.3, max_new_tokens=16, stop_token_ids=(),
                                             generation_config="none", **EDIT)
    assert sum(o.stats.edits for o in outs) > 0  # the comparison covered edits


def test_post_steps_run_only_while_edits_fire(llada):
    base = dict(method="dynamic", block_size=4, threshold=0.5, max_new_tokens=16, stop_token_ids=(),
                generation_config="none", editing_threshold=0.3)
    none = llada.generate([72, 101, 108], DecodeConfig(**base, max_post_steps=0), batch_size=1)[0]
    some = llada.generate([72, 101, 108], DecodeConfig(**base, max_post_steps=8), batch_size=1)[0]
    assert some.stats.steps >= none.stats.steps and some.stats.edits >= none.stats.edits
    assert some.stats.nfe - none.stats.nfe == some.stats.steps - none.stats.steps  # each post step is one draft


def test_editing_is_refused_for_families_without_it(model):
    with pytest.raises(s2d2.ConfigError, match="editing_threshold") as err:
        model.generate("x", DecodeConfig(editing_threshold=0.9))
    assert "\n" not in str(err.value)


def test_logits_equal_the_published_modeling_code(llada_dir, llada):
    """tests/fixtures/llada2_parity.safetensors holds the logits of the published modeling_llada2_moe.py (run by
    scripts/parity_fixture.py --family llada2 in a transformers 4.57 environment) on this very model (init-random, seed 0),
    under a causal and a block-causal mask."""
    from safetensors import safe_open

    from s2d2.checkpoint import load_weights

    path = Path(__file__).parent / "fixtures" / "llada2_parity.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        fixture = {k: f.get_tensor(k) for k in f.keys()}
    weights = load_weights(llada_dir)
    assert float(sum(weights[k].double().sum() for k in sorted(weights))) == float(meta["weights_checksum"])
    ids = fixture["input_ids"]
    n, block, idx = ids.shape[0], int(meta["block"]), torch.arange(ids.shape[0])
    masks = {"causal": idx[:, None] >= idx[None, :], "block_causal": (idx[:, None] // block) >= (idx[None, :] // block)}
    for name, mask in masks.items():
        ours = llada.adapter.model(ids, idx, llada.adapter.new_cache(n), mask)
        torch.testing.assert_close(ours, fixture[f"logits_{name}"], rtol=1e-5, atol=1e-5)


def test_draft_and_verify_leave_the_cache_unchanged_and_cached_equals_uncached(llada):
    assert_draft_and_verify_leave_the_cache_unchanged(llada.adapter)