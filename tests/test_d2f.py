"""D2F family (first step: LLaDA-8B and Dream-7B natively, their D2F LoRA adapters merged at load, one block in
flight): the published layouts, the base models' logits against the published modeling code (fixtures) and
transformers' Qwen2, merged-LoRA logits against an explicit low-rank path, and the design.md invariants."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from single_row import run_draft
from test_distribution import chi_square_pvalue, exact_ar_distribution, sample_counts
from test_engine import (
    assert_batch_independent,
    assert_draft_and_verify_leave_the_cache_unchanged,
    assert_never_verifying_is_dynamic,
    prompts,
)
from test_fast_dllm import causal_greedy, exact_causal_distribution

import s2d2
from s2d2 import DecodeConfig
from s2d2.errors import ModelLoadError
from s2d2.families.sdar import draft_mask
from s2d2.training.random_init import LORA_ADAPTER_DIR, LORA_TARGETS, write_random_model

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("d2f_llada", "d2f_dream")
# The published checkpoints' config.json keys and weight names (../shared/checkpoints; layer index as {i})
LLADA_CONFIG_KEYS = {
    "activation_type", "alibi", "alibi_bias_max", "architectures", "attention_dropout", "attention_layer_norm",
    "attention_layer_norm_with_affine", "auto_map", "bias_for_layer_norm", "block_group_size", "block_type",
    "d_model", "embedding_dropout", "embedding_size", "eos_token_id", "flash_attention", "include_bias",
    "include_qkv_bias", "init_cutoff_factor", "init_device", "init_fn", "init_std", "input_emb_norm",
    "layer_norm_type", "layer_norm_with_affine", "mask_token_id", "max_sequence_length", "mlp_hidden_size",
    "mlp_ratio", "model_type", "multi_query_attention", "n_heads", "n_kv_heads", "n_layers", "pad_token_id",
    "precision", "residual_dropout", "rms_norm_eps", "rope", "rope_full_precision", "rope_theta", "scale_logits",
    "transformers_version", "use_cache", "vocab_size", "weight_tying",
}
DREAM_CONFIG_KEYS = {
    "architectures", "attention_dropout", "auto_map", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "mask_token_id", "max_position_embeddings", "max_window_layers",
    "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id", "rms_norm_eps",
    "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings", "torch_dtype", "transformers_version",
    "use_cache", "use_mrope", "use_sliding_window", "vocab_size",
}
LLADA_WEIGHTS = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"} | {
    f"model.transformer.blocks.{{i}}.{m}.weight" for m in
    ("attn_norm", "attn_out", "ff_norm", "ff_out", "ff_proj", "k_proj", "q_proj", "up_proj", "v_proj")}
DREAM_WEIGHTS = {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} | {
    f"model.layers.{{i}}.{m}" for m in
    ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.down_proj.weight", "mlp.gate_proj.weight",
     "mlp.up_proj.weight", "self_attn.o_proj.weight")} | {
    f"model.layers.{{i}}.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")}


def _load(path: Path, adapter: bool = True) -> s2d2.Model:
    return s2d2.load(str(path), adapter=str(path / LORA_ADAPTER_DIR) if adapter else None)


@pytest.fixture(scope="module")
def d2f(family_dir) -> dict[str, s2d2.Model]:
    """Each family's init-random model with its LoRA adapter merged."""
    return {family: _load(family_dir(family)) for family in FAMILIES}


def _shards(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("model-*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("family, config_keys, weights", [("d2f_llada", LLADA_CONFIG_KEYS, LLADA_WEIGHTS),
                                                         ("d2f_dream", DREAM_CONFIG_KEYS, DREAM_WEIGHTS)])
def test_the_published_layouts_load(family_dir, d2f, family, config_keys, weights):
    path, model = family_dir(family), d2f[family]
    assert set(json.loads((path / "config.json").read_text())) == config_keys
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert {re.sub(r"\.\d+\.", ".{i}.", name) for name in index} == weights
    # the adapter: peft's key names, on exactly the D2F targets, every layer
    adapter_cfg = json.loads((path / LORA_ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter_cfg["target_modules"] == list(LORA_TARGETS[family]) and adapter_cfg["peft_type"] == "LORA"
    keys = load_file(str(path / LORA_ADAPTER_DIR / "adapter_model.safetensors")).keys()
    modules = {re.match(r"base_model\.model\.(.+)\.lora_[AB]\.weight$", k)[1] for k in keys}
    assert {m.rsplit(".", 1)[-1] for m in modules} == set(LORA_TARGETS[family]) and len(keys) == 2 * 2 * 4
    tok = model.tokenizer
    if family == "d2f_llada":
        assert model.adapter.mask_id == tok.token_to_id("<|mdm_mask|>") and not model.adapter.shifted_logits
        assert set(model.adapter.stop_ids) == {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|eot_id|>")}
        assert model.apply_chat_template([{"role": "user", "content": " hi "}]) == (
            "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    else:
        assert model.adapter.mask_id == tok.token_to_id("<|mask|>") and model.adapter.shifted_logits
        assert set(model.adapter.stop_ids) == {tok.token_to_id(t) for t in
                                               ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    cfg = model.resolve_config(DecodeConfig())
    assert (cfg.block_size, cfg.sub_block_size) == (32, None)
    assert model.resolve_config(DecodeConfig(method="ar")).block_size == 1


@pytest.mark.parametrize("edit, message", [
    ({"alibi": True}, "alibi=True is not supported for llada"),
    ({"block_type": "sequential"}, "block_type='sequential'"),
    ({"include_bias": True}, "include_bias=True"),
    ({"rope": None}, "rope=False"),  # a key left out takes the config class's default (no RoPE)
    ({"d_model": None}, "lacks the required field 'd_model'"),
])
def test_unsupported_llada_configs_are_refused_in_one_sentence(tmp_path, edit, message):
    path = write_random_model(tmp_path / "m", "d2f_llada")
    config = json.loads((path / "config.json").read_text())
    for key, value in edit.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=re.escape(message)) as err:
        s2d2.load(str(path))
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


@pytest.mark.parametrize("family, fixture", [("d2f_llada", "llada"), ("d2f_dream", "dream")])
def test_base_logits_equal_the_published_modeling_code(family_dir, family, fixture):
    """tests/fixtures/{llada,dream}_parity.safetensors hold the logits of the published modeling code (the D2F copies
    of modeling_llada.py / model_dream.py, run by scripts/parity_fixture.py under transformers 4.57) on this very
    base model (init-random, seed 0) under a causal, a block-causal (block 4) and a full mask."""
    path = FIXTURES / f"{fixture}_parity.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        expected = {k: f.get_tensor(k) for k in f.keys()}
    weights = _shards(family_dir(family))
    assert float(sum(weights[k].double().sum() for k in sorted(weights))) == float(meta["weights_checksum"])
    model = _load(family_dir(family), adapter=False).adapter.model
    ids = expected["input_ids"]
    n, block, idx = ids.shape[0], int(meta["block"]), torch.arange(ids.shape[0])
    masks = {"causal": idx[:, None] >= idx[None, :], "block_causal": (idx[:, None] // block) >= (idx[None, :] // block),
             "full": torch.ones(n, n, dtype=torch.bool)}
    for name, mask in masks.items():
        ours = model(ids, idx, model.new_cache(n), mask, logits_to=n)
        torch.testing.assert_close(ours, expected[f"logits_{name}"], rtol=1e-5, atol=1e-5)


def test_dream_causal_logits_equal_transformers_qwen2(family_dir):
    from hf_reference import qwen2_config
    from transformers import Qwen2ForCausalLM

    path = family_dir("d2f_dream")
    hf_config = qwen2_config(json.loads((path / "config.json").read_text()))
    hf_config._attn_implementation = "eager"
    hf = Qwen2ForCausalLM(hf_config).to(torch.float32).eval()
    result = hf.load_state_dict(_shards(path), strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    ids = torch.tensor([[5, 77, 120, 3, 250, 9, 41, 200, 13, 64, 101]])
    n = ids.shape[1]
    model = _load(path, adapter=False).adapter.model
    with torch.no_grad():
        theirs = hf(ids).logits[0]
        ours = model(ids[0], torch.arange(n), model.new_cache(n), torch.ones(n, n, dtype=torch.bool).tril(), logits_to=n)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_lora_logits_equal_base_plus_an_explicit_low_rank_path(family_dir, d2f, family):
    """The merged model's logits equal the base model's with ``x @ A.T @ B.T * alpha / r`` added to the output of
    every targeted projection at run time (forward hooks on the base model, nothing merged)."""
    path = family_dir(family)
    base = _load(path, adapter=False).adapter.model
    lora = load_file(str(path / LORA_ADAPTER_DIR / "adapter_model.safetensors"))
    cfg = json.loads((path / LORA_ADAPTER_DIR / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    prefix = "model.transformer.blocks.{i}." if family == "d2f_llada" else "model.layers.{i}.self_attn."
    out_name = "attn_out" if family == "d2f_llada" else "o_proj"

    def low_rank(i: int, module: str, x: torch.Tensor) -> torch.Tensor:
        key = "base_model.model." + prefix.format(i=i) + module
        return scale * (x @ lora[key + ".lora_A.weight"].T) @ lora[key + ".lora_B.weight"].T

    for i, layer in enumerate(base.layers):
        layer.qkv.register_forward_hook(lambda m, args, out, i=i: out + torch.cat(
            [low_rank(i, p, args[0]) for p in ("q_proj", "k_proj", "v_proj")], dim=-1))
        layer.o_proj.register_forward_hook(lambda m, args, out, i=i: out + low_rank(i, out_name, args[0]))
    ids, n = torch.tensor([5, 77, 120, 3, 250, 9, 41, 200]), 8
    mask = (torch.arange(n)[:, None] // 4) >= (torch.arange(n)[None, :] // 4)
    merged = d2f[family].adapter.model
    with torch.no_grad():
        expected = base(ids, torch.arange(n), base.new_cache(n), mask, logits_to=n)
        plain = merged(ids, torch.arange(n), merged.new_cache(n), mask, logits_to=n)
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-4)
    assert (plain - _load(path, adapter=False).adapter.model(ids, torch.arange(n), base.new_cache(n), mask,
                                                              logits_to=n)).abs().max() > 0.1


# ------------------------------------------------------------------------------------------------- invariants
PROMPTS = [[72, 101, 108, 108, 111], list(range(40, 56)), [3, 250, 9]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [
    dict(method="ar"),
    dict(method="s2d2", policy="mask_span_length", min_span=1, block_size=4),
    dict(method="s2d2", policy="mask_span_length", min_span=1, block_size=8, cache_ver=False, draft_ver=False),
])
def test_greedy_verifying_every_step_equals_ar(d2f, family, cfg):
    """LLaDA (aligned): equals greedy AR decoding; Dream (shifted): equals plain causal greedy decoding. Without the
    AR-consistent cache (the prompt is then one bidirectional chunk, as D2F prefills it) the verifier reads K/V
    that AR mode would not have computed, so the equality is asserted to fail somewhere: the test can tell."""
    model = d2f[family]
    config = DecodeConfig(**cfg, max_new_tokens=16, stop_token_ids=(), generation_config="none")
    ar = DecodeConfig(method="ar", max_new_tokens=16, stop_token_ids=(), generation_config="none")
    same = []
    for prompt in PROMPTS:
        out = model.generate(prompt, config, batch_size=1)[0].token_ids
        if family == "d2f_dream":
            same.append(out == causal_greedy(model, prompt, 16))
        else:
            same.append(out == model.generate(prompt, ar, batch_size=1)[0].token_ids)
    assert all(same) if cfg.get("cache_ver", True) else not all(same), (cfg, same)


@pytest.mark.parametrize("family", FAMILIES)
def test_never_verifying_is_dynamic_and_batched_equals_batch_1(d2f, family):
    model = d2f[family]
    assert_never_verifying_is_dynamic(model, PROMPTS, block_size=8, threshold=0.3, max_new_tokens=16,
                                      stop_token_ids=(), generation_config="none")
    for cfg in (dict(method="ar"), dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1),
                dict(method="s2d2", block_size=8), dict(method="dynamic", block_size=8, threshold=0.5)):
        assert_batch_independent(model, prompts(6, seed=30), DecodeConfig(**cfg, max_new_tokens=16,
                                                                          stop_token_ids=()), batch_size=4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow  # statistical: thousands of sampled decodes
def test_sampled_s2d2_draws_from_the_ar_distribution(d2f, family):
    model = d2f[family]
    target = exact_ar_distribution(model) if family == "d2f_llada" else exact_causal_distribution(model)
    block = 4 if family == "d2f_llada" else 2  # Dream: the third token opens a block (its AR token)
    counts = sample_counts(model, method="s2d2", block_size=block, policy="mask_span_length", min_span=1,
                           generation_config="none")
    assert chi_square_pvalue(counts, target) > 1e-3


def test_llada_draft_and_verify_leave_the_cache_unchanged_and_cached_equals_uncached(d2f):
    assert_draft_and_verify_leave_the_cache_unchanged(d2f["d2f_llada"].adapter)


_FLAGS = [["--method", "ar"], ["--method", "static"], ["--method", "dynamic"], ["--method", "s2d2"],
          ["--method", "s2d2", "--block-size", "4", "--policy", "score_threshold"],
          ["--method", "s2d2", "--block-size", "4", "--policy", "score_hysteresis"],
          ["--method", "s2d2", "--block-size", "4", "--policy", "contextual_bandit_ucb"],
          ["--method", "s2d2", "--temperature", "0.7"]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flags", _FLAGS)
def test_cli_generate_with_the_adapter(tmp_path, capsys, family, flags):
    """Done-when: ``s2d2 generate "x" --model DIR --adapter ADIR`` on the init-random directories, every method."""
    from s2d2.cli import main

    out = tmp_path / family
    assert main(["init-random", "--family", family, "--out", str(out)]) == 0
    assert str(out / LORA_ADAPTER_DIR) in capsys.readouterr().out
    assert main(["generate", "x", "--model", str(out), "--adapter", str(out / LORA_ADAPTER_DIR),
                 "--max-new-tokens", "12", "--json", *flags]) == 0
    result = json.loads(capsys.readouterr().out)
    n = len(result["token_ids"])
    assert result["stats"]["nfe"] > 0 and (n == 12 or (n < 12 and result["finish_reason"] == "stop")), result


def test_blocks_start_at_the_prompt_end_and_the_prompt_is_one_bidirectional_chunk(d2f):
    """D2F's layout: a 5-token prompt with blocks of 4 opens its first block at position 5 (not 4), and without
    the AR-consistent cache the prompt rows see each other whole, later rows see the prompt and earlier blocks."""
    from s2d2.core.loop import decode_steps
    from s2d2.core.requests import DraftRequest
    from s2d2.engine.runner import drive, run_request

    adapter = d2f["d2f_llada"].adapter
    cfg = DecodeConfig(method="dynamic", block_size=4, threshold=0.9, max_new_tokens=6, stop_token_ids=(),
                       cache_ver=False, draft_ver=False, generation_config="none")
    cache = adapter.new_cache(64)
    starts = []

    def forward(request):
        if isinstance(request, DraftRequest):
            starts.append(request.block_start)
        return run_request(adapter, request, cache)

    ids, _, _ = drive(decode_steps([72, 101, 108, 108, 111], cfg, cache, adapter.traits), cache, forward)
    assert len(ids) == 6
    assert sorted(set(starts)) == [5, 9]  # 6 new tokens: blocks [5, 9) and [9, 13), the second cut at 11
    t, f = True, False
    expected = torch.tensor([  # 3 prompt rows, then blocks of 2 counted from the prompt's end
        [t, t, t, f, f, f, f], [t, t, t, f, f, f, f], [t, t, t, f, f, f, f],
        [t, t, t, t, t, f, f], [t, t, t, t, t, f, f],
        [t, t, t, t, t, t, t], [t, t, t, t, t, t, t]])
    assert torch.equal(draft_mask(5, 2, 0, False, False, torch.device("cpu"), prompt_rows=3), expected)
    # the pending prompt of the first draft is that chunk; later pending blocks are block-causal as in SDAR
    spec = adapter.draft_spec(list(range(9)), 0, 5, 4, 0, cache_ver=False, draft_ver=False)
    assert spec.mask[:5, :5].all() and not spec.mask[:5, 5:].any() and spec.mask[5:].all()
    assert torch.equal(adapter.draft_spec(list(range(13)), 5, 9, 4, 0, cache_ver=False, draft_ver=False).mask,
                       draft_mask(4, 4, 0, False, False, adapter.device))


# ------------------------------------------------------------------------------------------- pipelined blocks
PIPE = dict(block_add_threshold=0.5, decoded_token_threshold=0.8)


def trace_requests(model: s2d2.Model, prompt: list[int], cfg: DecodeConfig):
    """Decode one prompt with the single-row forwards, checking before every forward and at the end that the cache
    holds only committed tokens; returns (token ids, stats, [(request, ids before it, its logits)] for every
    forward, cache, final ids)."""
    from s2d2.core.loop import decode_steps
    from s2d2.core.requests import RowState
    from s2d2.engine.runner import drive, run_request

    adapter = model.adapter
    cache, state = adapter.new_cache(256), RowState()
    trace = []

    def only_committed_cached() -> None:
        assert adapter.mask_id not in state.seq.tokens[:cache.length]

    def forward(request):
        only_committed_cached()
        before = torch.tensor(state.seq.tokens)
        logits = run_request(adapter, request, cache)
        trace.append((request, before, logits))
        return logits

    ids, _, stats = drive(decode_steps(prompt, cfg, cache, adapter.traits, state=state), cache, forward)
    only_committed_cached()
    return ids, stats, trace, cache, torch.tensor(state.seq.tokens)


def _drafts(trace) -> list:
    return [t for t in trace if type(t[0]).__name__ == "DraftRequest"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pipe", [PIPE, dict(block_add_threshold=0.25, decoded_token_threshold=0.5),
                                  dict(block_add_threshold=1.0)])
def test_pipelined_greedy_verifying_every_step_equals_ar(d2f, family, pipe):
    """With an AR-consistent cache a verified step commits only what the verifier decides, from the cache frontier
    on, so verifying every step is greedy AR whatever the blocks in flight; and several blocks really are in
    flight (each draft forward covers at most one more block than the one before)."""
    model = d2f[family]
    ar = DecodeConfig(method="ar", max_new_tokens=20, stop_token_ids=(), generation_config="none")
    # a low threshold, so that confident drafts beside the span abound (a verified step must not commit them)
    cfg = DecodeConfig(method="s2d2", block_size=4, policy="mask_span_length", min_span=1, threshold=0.05, **pipe,
                       max_new_tokens=20, stop_token_ids=(), generation_config="none")
    widths = []
    for prompt in PROMPTS:
        ids, stats, trace, _, _ = trace_requests(model, prompt, cfg)
        assert ids == model.generate(prompt, ar, batch_size=1)[0].token_ids, (prompt, pipe)
        drafts = [r.num_blocks for r, _, _ in _drafts(trace)]
        assert drafts[0] == 1 and all(b <= a + 1 for a, b in zip(drafts, drafts[1:]))
        widths += drafts
    assert max(widths) > 1 if pipe["block_add_threshold"] < 1 else max(widths) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_pipelined_never_verifying_is_the_d2f_baseline_and_batched_equals_batch_1(d2f, family):
    model = d2f[family]
    d2f_baseline = assert_never_verifying_is_dynamic(model, PROMPTS, block_size=4, threshold=0.3, **PIPE,
                                                     max_new_tokens=20, stop_token_ids=(), generation_config="none")
    assert all(out.stats.nfe == out.stats.steps for out in d2f_baseline)  # one forward per step
    for cfg in (dict(method="dynamic", threshold=0.3), dict(method="s2d2", policy="mask_span_length", min_span=1),
                dict(method="s2d2", threshold=0.3), dict(method="s2d2", policy="contextual_bandit_ucb")):
        config = DecodeConfig(**cfg, block_size=4, **PIPE, max_new_tokens=16, stop_token_ids=())
        assert_batch_independent(model, prompts(6, seed=40), config, batch_size=4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt", [[72, 101, 108, 108, 111], list(range(40, 49))])
def test_pipelined_d2f_steps_follow_the_add_and_activation_rules(d2f, family, prompt):
    """Replays D2F's schedule from the trace of the dynamic (never verifying) decoder and checks every step: blocks
    start at the prompt's end; the next block opens exactly when the last block's decoded share has reached
    block_add_threshold (one per step, never past the limit); finished blocks leave flight from the front; each block
    commits exactly its masked drafts above the threshold, or, when none clears it and the block is fully activated
    (the front block, or its predecessor's share reached decoded_token_threshold), its most confident draft;
    shifted logits: the front block's first token in the step it reaches the front."""
    model, size, threshold = d2f[family], 4, 0.6
    adapter = model.adapter
    cfg = DecodeConfig(method="dynamic", block_size=size, threshold=threshold, **PIPE, max_new_tokens=24,
                       stop_token_ids=(), generation_config="none")
    ids, stats, trace, _, final = trace_requests(model, prompt, cfg)
    drafts = _drafts(trace)
    assert len(drafts) == stats.steps == stats.nfe and len(ids) == 24
    limit, p = len(prompt) + 24, len(prompt)
    masked = lambda ids, lo, hi: [i for i in range(lo, min(hi, limit)) if ids[i] == adapter.mask_id]  # noqa: E731
    share = lambda ids, start: 1 - len(masked(ids, start, start + size)) / (min(start + size, limit) - start)  # noqa
    activated, widths = {p}, []
    for t, (request, before, logits) in enumerate(drafts):
        after = drafts[t + 1][1] if t + 1 < len(drafts) else final
        front, count = request.block_start, request.num_blocks
        assert (front - p) % size == 0 and front + (count - 1) * size < limit
        if t:  # the add rule, from the state this step started with
            prev_front, prev_count = drafts[t - 1][0].block_start, drafts[t - 1][0].num_blocks
            kept = max(prev_count - (front - prev_front) // size, 1)
            last = front + (kept - 1) * size
            opens = share(before, last) >= PIPE["block_add_threshold"] and last + size < limit
            assert count == kept + opens, t
        for j in range(1, count):
            if share(before, front + (j - 1) * size) >= PIPE["decoded_token_threshold"]:
                activated.add(front + j * size)
        activated.add(front)
        probs = torch.softmax(logits, dim=-1)
        conf, tokens = probs.max(dim=-1)
        for j in range(count):
            start = front + j * size
            todo = masked(before, start, start + size)
            done = [i for i in todo if after[i] != adapter.mask_id]
            if adapter.shifted_logits and j == 0 and start in todo and after[start] != adapter.mask_id:
                todo.remove(start)  # the front block's AR token
                done.remove(start)
            confident = [i for i in todo if conf[i - front] > threshold]
            expected = confident or ([max(todo, key=lambda i: conf[i - front])] if start in activated and todo else [])
            assert sorted(done) == sorted(expected), (t, j)
            assert all(after[i] == tokens[i - front] for i in done)
        widths.append(count)
    assert max(widths) >= 2


def test_a_stop_token_ends_the_blocks_after_it(d2f):
    """Once a stop token is committed, the blocks after it leave flight (no later forward carries a block that starts
    at or past the stop) and no new block opens; the output ends before the stop token. The stop is the token the
    unconstrained decoder writes at offset 19, committed while the block after it is in flight."""
    model = d2f["d2f_llada"]
    base = dict(method="dynamic", block_size=4, threshold=0.3, block_add_threshold=0.25, max_new_tokens=24,
                generation_config="none")
    prompt = [72, 101, 108, 108, 111]
    free = model.generate(prompt, DecodeConfig(**base, stop_token_ids=()), batch_size=1)[0].token_ids
    stop = free[19]
    assert stop not in free[:19]
    ids, stats, trace, _, final = trace_requests(model, prompt, DecodeConfig(**base, stop_token_ids=(stop,)))
    assert ids == free[:19]
    position = len(prompt) + 19
    after_stop = [r for r, before, _ in _drafts(trace) if before[position] == stop]
    assert after_stop and all(r.block_start + (r.num_blocks - 1) * 4 < position for r in after_stop)


def test_pipelined_cache_holds_what_a_fresh_causal_forward_computes(d2f):
    """Cache purity with blocks in flight: after decoding, the cached K/V of every committed position equal those of
    one uncached causal forward over the committed tokens (cache_ver), the prompt included."""
    model = d2f["d2f_llada"]
    adapter = model.adapter
    cfg = DecodeConfig(method="s2d2", block_size=4, threshold=0.3, **PIPE, max_new_tokens=20, stop_token_ids=(),
                       generation_config="none")
    ids, _, _, cache, seq_ids = trace_requests(model, [72, 101, 108, 108, 111], cfg)
    n = cache.length
    assert n >= 5 + 20 - 4 and adapter.mask_id not in seq_ids[:n].tolist()
    fresh = adapter.new_cache(n)
    adapter.model(seq_ids[:n], torch.arange(n), fresh, torch.ones(n, n, dtype=torch.bool).tril(), num_store=n)
    for cached, expected in zip(cache.keys, fresh.keys):
        torch.testing.assert_close(cached[:, :n], expected[:, :n], rtol=1e-5, atol=1e-5)


def test_a_multi_block_draft_equals_one_uncached_block_causal_forward(d2f):
    adapter = d2f["d2f_llada"].adapter
    m = adapter.mask_id
    ids = torch.tensor([72, 101, 108, 108, 111, 30, 31, m, m, 32, m, m, m, m, m, m, m])  # prompt, 3 blocks of 4
    cache = adapter.new_cache(64)
    draft = run_draft(adapter, ids, cache, 5, 4, 2, cache_ver=False, draft_ver=False, num_blocks=3)
    assert cache.length == 5 and draft.shape[0] == 12
    t, f = True, False
    mask = torch.tensor([[t] * 5 + [f] * 12] * 5 + [[t] * 9 + [f] * 8] * 4 + [[t] * 13 + [f] * 4] * 4 + [[t] * 17] * 4)
    assert torch.equal(draft_mask(5, 4, 2, False, False, adapter.device, prompt_rows=5, num_blocks=3), mask)
    full = adapter.model(ids, torch.arange(17), adapter.new_cache(17), mask, logits_to=17)
    full[:, adapter.banned_ids] = float("-inf")
    torch.testing.assert_close(draft, full[5:], rtol=1e-5, atol=1e-5)


def test_pipelined_cache_ver_is_what_makes_verification_exact(d2f):
    """Without the AR-consistent cache the finished blocks' K/V are block-causal (D2F's), the verifier is not the AR
    conditional, and verifying every step no longer reproduces AR for some prompt: cache_ver has a meaning here."""
    model = d2f["d2f_llada"]
    ar = DecodeConfig(method="ar", max_new_tokens=20, stop_token_ids=(), generation_config="none")
    cfg = DecodeConfig(method="s2d2", block_size=4, policy="mask_span_length", min_span=1, **PIPE, max_new_tokens=20,
                       stop_token_ids=(), generation_config="none")
    same = {flag: [model.generate(p, cfg.replace(cache_ver=flag, draft_ver=flag), batch_size=1)[0].token_ids ==
                   model.generate(p, ar, batch_size=1)[0].token_ids for p in PROMPTS] for flag in (True, False)}
    assert all(same[True]) and not all(same[False])


@pytest.mark.slow  # statistical: thousands of sampled decodes
def test_pipelined_sampled_s2d2_draws_from_the_ar_distribution(d2f):
    model = d2f["d2f_llada"]
    counts = sample_counts(model, method="s2d2", block_size=2, policy="mask_span_length", min_span=1,
                           generation_config="none", **PIPE)
    assert chi_square_pvalue(counts, exact_ar_distribution(model)) > 1e-3


@pytest.mark.parametrize("cfg, message", [
    (dict(method="static"), "applies to methods dynamic and s2d2, not static"),
    (dict(method="s2d2", sub_block_size=2), "cannot be combined with sub_block_size"),
    (dict(method="s2d2", fuse_commit=False), "needs fuse_commit"),
    (dict(method="s2d2", block_add_threshold=0.0), "block_add_threshold must be a number in (0.0, 1.0]"),
])
def test_pipelining_refuses_what_it_cannot_honour(cfg, message):
    with pytest.raises(s2d2.errors.ConfigError, match=re.escape(message)):
        DecodeConfig(**{"block_add_threshold": 0.5, **cfg})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("flags", [["--method", "dynamic"], ["--method", "s2d2"],
                                   ["--method", "s2d2", "--policy", "score_hysteresis"],
                                   ["--method", "s2d2", "--policy", "contextual_bandit_ucb", "--temperature", "0.8"]])
def test_cli_generate_pipelined(family_dir, capsys, family, flags):
    from s2d2.cli import main

    path = family_dir(family)
    assert main(["generate", "x", "--model", str(path), "--adapter", str(path / LORA_ADAPTER_DIR), "--block-size", "4",
                 "--block-add-threshold", "0.5", "--decoded-token-threshold", "0.8", "--max-new-tokens", "12",
                 "--json", *flags]) == 0
    result = json.loads(capsys.readouterr().out)
    n = len(result["token_ids"])
    assert result["stats"]["nfe"] > 0 and (n == 12 or (n < 12 and result["finish_reason"] == "stop")), result
