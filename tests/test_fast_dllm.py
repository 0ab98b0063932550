"""Fast-dLLM v2 family: the published layout, the Qwen2 module against transformers, and the design invariants for a
shifted-logit model (row t-1 predicts token t; AR mode is a plain causal forward; each block opens with an AR token).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_reference import qwen2_config
from safetensors.torch import load_file
from single_row import run_commit, run_draft, run_verify
from test_distribution import NUM_NEW, PROMPT, TEMPERATURE, TOP_K, N, chi_square_pvalue, sample_counts
from test_engine import NEAR_TIE, assert_batch_independent, assert_never_verifying_is_dynamic, prompts

import s2d2
from s2d2 import DecodeConfig
from s2d2.core.sampling import token_probs

# config.json keys of Efficient-Large-Model/Fast_dLLM_v2_1.5B as published (../shared/checkpoints)
PUBLISHED_CONFIG_KEYS = {
    "architectures", "attention_dropout", "auto_map", "bd_size", "bos_token_id", "eos_token_id", "hidden_act",
    "hidden_size", "initializer_range", "intermediate_size", "layer_types", "max_position_embeddings",
    "max_window_layers", "model_type", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
    "pad_token_id", "rms_norm_eps", "rope_scaling", "rope_theta", "sliding_window", "tie_word_embeddings",
    "torch_dtype", "transformers_version", "use_cache", "use_sliding_window", "vocab_size",
}


@pytest.fixture(scope="module")
def fast_dir(family_dir) -> Path:
    return family_dir("fast_dllm_v2")


@pytest.fixture(scope="module")
def fast(family_model) -> s2d2.Model:
    return family_model("fast_dllm_v2")


@pytest.fixture(scope="module")
def fast_models(family_model) -> list[s2d2.Model]:
    return [family_model("fast_dllm_v2", seed) for seed in (1, 2)]


def test_the_published_layout_loads(fast_dir, fast):
    """Published keys and files: no mask_token_id in config.json (the id comes from added_tokens.json), tied
    embeddings with no lm_head tensor, sharded safetensors with an index, EOS from generation_config.json, sampling
    defaults from it, bd_size as the default block size, 8-token sub-blocks."""
    config = json.loads((fast_dir / "config.json").read_text())
    assert set(config) == PUBLISHED_CONFIG_KEYS and config["model_type"] == "Fast_dLLM_Qwen"
    assert {p.name for p in fast_dir.iterdir()} >= {"added_tokens.json", "special_tokens_map.json",
                                                     "chat_template.jinja", "model.safetensors.index.json"}
    index = json.loads((fast_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and len(set(index.values())) == 2
    assert "model.layers.0.self_attn.q_proj.bias" in index and "model.layers.0.self_attn.q_norm.weight" not in index
    added = json.loads((fast_dir / "added_tokens.json").read_text())
    assert fast.adapter.family == "fast_dllm_v2" and fast.adapter.mask_id == added["|<MASK>|"]
    assert fast.adapter.stop_ids == (added["<|im_end|>"], added["<|endoftext|>"])
    assert fast.generation_defaults == {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    cfg = fast.resolve_config(DecodeConfig())
    assert (cfg.block_size, cfg.sub_block_size, cfg.steps) == (config["bd_size"], 8, config["bd_size"])
    assert fast.resolve_config(DecodeConfig(method="ar")).block_size == 1
    assert fast.resolve_config(DecodeConfig(block_size=4)).block_size == 4
    assert fast.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|im_start|>user\nhi")


def test_causal_logits_equal_transformers_qwen2(fast_dir, fast):
    from transformers import Qwen2ForCausalLM

    config = json.loads((fast_dir / "config.json").read_text())
    hf_config = qwen2_config(config)
    hf_config._attn_implementation = "eager"
    hf = Qwen2ForCausalLM(hf_config).to(torch.float32).eval()
    weights = {}
    for file in sorted(fast_dir.glob("model-*.safetensors")):
        weights.update(load_file(str(file)))
    result = hf.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and result.missing_keys == ["lm_head.weight"]
    ids = torch.tensor([[5, 77, 120, 3, 250, 9, 41, 200, 13, 64, 101]])
    n = ids.shape[1]
    with torch.no_grad():
        theirs = hf(ids).logits[0]
        cache = fast.adapter.new_cache(n)
        ours = fast.adapter.model(ids[0], torch.arange(n), cache, torch.ones(n, n, dtype=torch.bool).tril())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def causal_greedy(model: s2d2.Model, prompt: list[int], n: int) -> list[int]:
    """Plain AR decoding with shifted logits: each token is the argmax of the last row of a causal forward over
    everything before it (no cache, an explicit tril mask), the mask and padding ids excluded."""
    adapter, ids = model.adapter, list(prompt)
    for _ in range(n):
        k = len(ids)
        logits = adapter.model(torch.tensor(ids), torch.arange(k), adapter.new_cache(k),
                               torch.ones(k, k, dtype=torch.bool).tril())[-1]
        logits[adapter.banned_ids] = float("-inf")
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


PROMPTS = [[72, 101, 108, 108, 111], list(range(40, 56)), [7] * 8, [3, 250, 9]]  # 5, 16 (= 2 x bd_size), 8, 3 tokens


@pytest.mark.parametrize("cfg", [
    dict(method="ar"),
    dict(method="s2d2", policy="mask_span_length", min_span=1),  # verify every step, whole-block units
    dict(method="s2d2", policy="mask_span_length", min_span=1, block_size=8, sub_block_size=4),
    dict(method="s2d2", policy="mask_span_length", min_span=1, block_size=4, fuse_draft=False),
])
def test_greedy_verifying_every_step_is_causal_greedy(fast, cfg):
    """Invariant: S2D2 that verifies every step (and AR) reproduces plain causal greedy decoding, for prompts
    that end inside a block and at a block boundary (the first token is then the prefill's AR token)."""
    config = DecodeConfig(**cfg, max_new_tokens=20, stop_token_ids=(), generation_config="none")
    for prompt in PROMPTS:
        out = fast.generate(prompt, config, batch_size=1)[0]
        assert out.token_ids == causal_greedy(fast, prompt, 20), (cfg, prompt)
        if cfg["method"] == "ar":
            assert out.stats.nfe == 20  # one forward per token: prefill + first token, then one per token


@pytest.mark.parametrize("cfg", [
    dict(policy="mask_span_length", min_span=1, block_size=4),  # the next block's AR token and cache
    dict(policy="mask_span_length", min_span=1, block_size=8, sub_block_size=4),  # + the next sub-block's draft
    dict(policy="mask_span_length", min_span=2, block_size=8, sub_block_size=4, threshold=0.2),  # drafts decide too
])
def test_a_verification_that_finishes_a_block_or_sub_block_saves_forwards(fast_models, cfg):
    """With fuse_draft, a verification accepting the last span of a block also yields the next block's AR token and
    the block's cache, and one accepting the last span of a sub-block also drafts the rest of the block: fewer
    forwards, the same tokens."""
    base = dict(method="s2d2", max_new_tokens=32, stop_token_ids=(), generation_config="none", **cfg)
    saved = 0
    for m in fast_models:
        for prompt in PROMPTS:
            fused = m.generate(prompt, DecodeConfig(**base), batch_size=1)[0]
            plain = m.generate(prompt, DecodeConfig(**base, fuse_draft=False), batch_size=1)[0]
            assert fused.token_ids == plain.token_ids
            assert fused.stats.nfe == plain.stats.nfe - fused.stats.fused_drafts
            saved += fused.stats.fused_drafts
    assert saved > 0


def test_never_verifying_is_the_dynamic_baseline(fast):
    assert_never_verifying_is_dynamic(fast, PROMPTS, block_size=8, threshold=0.3, max_new_tokens=24,
                                      stop_token_ids=(), generation_config="none")


def test_sub_blocks_keep_commits_inside_the_left_most_sub_block(fast):
    """Dynamic at threshold 0 commits every mask it may: a whole block per step without sub-blocks, one sub-block
    per step with them."""
    base = dict(method="dynamic", block_size=8, threshold=0.0, max_new_tokens=32, stop_token_ids=(),
                generation_config="none")
    prompt = list(range(40, 56))  # 16 tokens: 4 blocks of 8 generated, each opened by an AR token
    whole = fast.generate(prompt, DecodeConfig(**base, sub_block_size=8), batch_size=1)[0]
    subs = fast.generate(prompt, DecodeConfig(**base, sub_block_size=4), batch_size=1)[0]
    assert whole.stats.steps == 4 and subs.stats.steps == 8


def test_draft_and_verify_leave_the_cache_unchanged_and_cached_equals_uncached(fast):
    adapter = fast.adapter
    ids = torch.tensor(list(range(30, 46)) + [adapter.mask_id] * 8)  # 16 committed, then a block of 8 masks
    ids[16] = 99  # the block's AR token
    cache = adapter.new_cache(64)
    run_commit(adapter, ids, cache, 16, 8, cache_ver=True)
    keys = [k[:, :16].clone() for k in cache.keys]
    draft = run_draft(adapter, ids, cache, 16, 8, 1, cache_ver=True, draft_ver=True)
    run_verify(adapter, [99, 5, 6], cache, 16, 17)
    assert cache.length == 16 and all(torch.equal(k[:, :16], old) for k, old in zip(cache.keys, keys))
    # uncached: one forward over everything, the committed part (and, with draft_ver, the block's committed offset
    # 0) causal, the block's masks bidirectional
    n = 24
    idx = torch.arange(n)
    mask = (idx[:, None] >= idx[None, :]) | ((idx[:, None] >= 17) & (idx[None, :] >= 16))
    full = adapter.model(ids, idx, adapter.new_cache(n), mask)
    full[:, adapter.banned_ids] = float("-inf")
    torch.testing.assert_close(draft[1:], full[16:23], rtol=1e-5, atol=1e-5)  # offset i read from row i-1


@pytest.mark.parametrize("name", ["ar", "dynamic", "s2d2-always", "s2d2-A", "s2d2-sub"])
def test_batched_equals_batch_1(fast_models, name):
    cfg = {"ar": dict(method="ar"), "dynamic": dict(method="dynamic", block_size=8, threshold=0.5),
           "s2d2-always": dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1),
           "s2d2-A": dict(method="s2d2", block_size=8), "s2d2-sub": dict(method="s2d2", block_size=8, sub_block_size=4,
                                                                          threshold=0.5)}[name]
    config = DecodeConfig(**cfg, max_new_tokens=20, stop_token_ids=(), generation_config="none")
    for k, m in enumerate(fast_models):
        assert_batch_independent(m, prompts(6, seed=10 + k), config, batch_size=4)
    assert NEAR_TIE > 0


@torch.inference_mode()
def exact_causal_distribution(model: s2d2.Model) -> dict[tuple[int, ...], float]:
    """P(x1 x2 x3 | prompt) under the top-k AR chain of a shifted-logit model: each conditional is the last row of a
    causal forward over the prefix."""
    adapter = model.adapter
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(NUM_NEW):
        nxt = {}
        for seq, p in dist.items():
            tokens = PROMPT + list(seq)
            k = len(tokens)
            logits = adapter.model(torch.tensor(tokens), torch.arange(k), adapter.new_cache(k),
                                   torch.ones(k, k, dtype=torch.bool).tril())[-1:]
            q = token_probs(logits.index_fill_(-1, adapter.banned_ids, float("-inf")), TEMPERATURE, TOP_K, 1.0)[0]
            for tok in torch.nonzero(q).flatten().tolist():
                nxt[seq + (tok,)] = p * float(q[tok])
        dist = nxt
    return dist


@pytest.mark.slow  # statistical: thousands of sampled decodes
def test_sampled_s2d2_draws_from_the_ar_distribution(fast):
    """Invariant: sampled S2D2 verifying every step samples the AR chain; with block size 2 the third token is a
    block's opening AR token, drawn with the decoding temperature (the reference takes its argmax)."""
    target = exact_causal_distribution(fast)
    no_file = dict(generation_config="none")  # the checkpoint's top_p 0.8 would change the target
    counts = sample_counts(fast, method="s2d2", block_size=2, policy="mask_span_length", min_span=1, **no_file)
    assert sum(counts.values()) == N
    assert chi_square_pvalue(counts, target) > 1e-3
    assert chi_square_pvalue(sample_counts(fast, method="ar", block_size=1, **no_file), target) > 1e-3
    unverified = sample_counts(fast, method="dynamic", block_size=4, threshold=0.0, **no_file)
    assert chi_square_pvalue(unverified, target) < 1e-6


@pytest.mark.parametrize("flags", [["--method", "ar"], ["--method", "static"], ["--method", "dynamic"],
                                   ["--method", "s2d2"], ["--method", "s2d2", "--block-size", "4"],
                                   ["--method", "s2d2", "--sub-block-size", "4", "--temperature", "0.7"]])
def test_cli_generate_on_an_init_random_directory(cli_generate_on_random, flags):
    result = cli_generate_on_random("fast_dllm_v2", *flags)
    assert 0 < len(result["token_ids"]) <= 12 and result["stats"]["nfe"] > 0


def test_a_qwen2_vocab_and_merges_without_tokenizer_json_tokenizes_as_transformers(tmp_path):
    """Qwen2.5-based checkpoints may ship vocab.json + merges.txt (+ added_tokens.json) only: the tokenizer built
    from them encodes exactly as transformers' Qwen2Tokenizer does from the same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    from s2d2.checkpoint import load_tokenizer

    corpus = ["Hello, world! It's 2024 and the café is open.", "def f(x):\n    return x + 1\n", "A" * 30,
              "Numbers 12345 and words, words; more words. 中文 😀"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=
                                                        pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.model.save(str(tmp_path))  # vocab.json, merges.txt
    size = tok.get_vocab_size()
    added = {"<|endoftext|>": size, "<|im_start|>": size + 1, "<|im_end|>": size + 2, "|<MASK>|": size + 3}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False} for t, i in added.items()}}))
    ours = load_tokenizer(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["Hello, world! It's 2025.\n\nWhat's 12+678?", "  spaces   and\ttabs\r\n", "Ünïcödé café 中文",
                 "<|im_start|>user\nhi<|im_end|>\n|<MASK>|", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]:
        assert ours.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False), text
    assert ours.token_to_id("|<MASK>|") == added["|<MASK>|"]


def test_a_first_draft_with_pending_prompt_rows_reads_each_offset_from_the_row_before(fast):
    """The first block's draft also writes the prompt's block-aligned prefix: offset i (prompt tail included) is read
    from row i-1, the first of them the prefix's last row; equal to one uncached forward."""
    adapter = fast.adapter
    prompt = list(range(60, 79))  # 19 tokens: prefix 0..15 pending, tail 16..18 opens the block of 8 at 16
    ids = torch.tensor(prompt + [adapter.mask_id] * 5)
    cache = adapter.new_cache(64)
    draft = run_draft(adapter, ids, cache, 16, 8, 3, cache_ver=True, draft_ver=True)
    assert cache.length == 16 and draft.shape[0] == 8
    n, idx = 24, torch.arange(24)
    mask = (idx[:, None] >= idx[None, :]) | ((idx[:, None] >= 19) & (idx[None, :] >= 16))
    full = adapter.model(ids, idx, adapter.new_cache(n), mask)
    full[:, adapter.banned_ids] = float("-inf")
    torch.testing.assert_close(draft, full[15:23], rtol=1e-5, atol=1e-5)


def test_a_verification_ending_a_sub_block_drafts_the_rest_of_the_block_as_a_draft_forward_would(fast):
    """The verify forward's extra rows (the rest of the block, masks) give offset k its logits from row k-1, as the
    draft forward with the verified prefix committed and draft_ver does; the cache is left unchanged."""
    adapter = fast.adapter
    cache = adapter.new_cache(64)
    ids = torch.tensor(list(range(30, 46)) + [99, 5, 6, 7] + [adapter.mask_id] * 4)  # offsets 0-3 committed
    run_commit(adapter, ids, cache, 16, 8, cache_ver=True)
    verify = run_verify(adapter, [99, 5, 6, 7], cache, 16, 17, next_block=4)  # span offsets 1-3, then 4 mask rows
    assert verify.shape[0] == 3 + 1 + 4 and cache.length == 16
    draft = run_draft(adapter, ids, cache, 16, 8, 4, cache_ver=True, draft_ver=True)
    torch.testing.assert_close(verify[3:7], draft[4:8], rtol=1e-5, atol=1e-5)
