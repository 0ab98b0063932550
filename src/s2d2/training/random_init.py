"""Tiny randomly initialised checkpoints in Hugging Face format, for tests and for trying the CLI without a download.

:func:`write_random_model` writes everything a real checkpoint directory holds (``config.json``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json`` with a chat template, and
``model.safetensors``), so the same loading code runs on it as on a published model.

The weights use a deliberately large initialisation scale (std 0.2, not the usual 0.02): with 0.02 a tiny model's
top logits are near-ties, and float rounding between mathematically equal forwards (cached vs. uncached, fused
vs. unfused) can flip an argmax and make equivalence tests fail for no logical reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from s2d2.errors import ConfigError
from s2d2.families import decoder_config_for
from s2d2.models.decoder import Decoder

__all__ = ["FAMILIES", "LORA_ADAPTER_DIR", "SPECIAL_TOKENS", "write_lora_adapter", "write_random_model"]

FAMILIES = ("sdar", "fast_dllm_v2", "llada2", "d2f_llada", "d2f_dream")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>")  # ids 256, 257, 258, 259
# LLaDA2's special tokens (its tokenizer files; 156892, 156895, 156900 in the published vocabulary)
LLADA2_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "[CLS]", "[gMASK]", "<|mask|>", "<|role_end|>")
LLADA2_CHAT_TEMPLATE = (
    "<role>SYSTEM</role>{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}<|role_end|>"
    "{% for m in messages %}{% if m['role'] != 'system' %}<role>{{ m['role'] | upper }}</role>{{ m['content'] }}"
    "<|role_end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)
# Fast-dLLM v2 spells its mask "|<MASK>|" (added_tokens.json of the published checkpoints)
FAST_DLLM_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|")

# LLaDA-8B-Instruct's special tokens (126080, 126081, 126336, 126346-126348 in the published vocabulary) and its
# published chat template (tokenizer_config.json)
LLADA_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>")
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
# Dream's added tokens that matter here (151643-151645, 151665, 151666 in the published vocabulary)
DREAM_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>")
LORA_RANK = 8  # the published D2F adapters: r 32, alpha 32 (scale 1); tiny models get r 8, alpha 8
LORA_ADAPTER_DIR = "lora"  # where init-random puts a D2F family's adapter, inside the model directory
# The D2F adapters' target modules (D2F's training LoraConfig), by family
LORA_TARGETS = {"d2f_llada": ("q_proj", "v_proj", "k_proj", "attn_out"),
                "d2f_dream": ("q_proj", "v_proj", "k_proj", "o_proj")}

WEIGHT_STD = 0.2  # Linear and Embedding weights (see the module docstring for why this is large)
NORM_STD = 0.1  # RMSNorm weights are 1 + normal(0, NORM_STD)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """One printable character per byte value 0..255, in byte order (the GPT-2 byte-level convention).

    Bytes that are printable Latin-1 characters stand for themselves; the others are shifted to code points
    256 and up, so no byte maps to whitespace or a control character.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    chars, shift = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars


def _byte_tokenizer(special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Tokenizer:
    """Byte-level BPE without merges: token id = byte value, then the special tokens at 256.."""
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def _sdar_config(tok: Tokenizer) -> dict[str, Any]:
    eot, mask = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|MASK|>")
    return {
        "architectures": ["SDARForCausalLM"],
        "model_type": "sdar",
        "vocab_size": 264,  # a little larger than the tokenizer: real SDAR checkpoints pad the vocabulary
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "block_size": 4,
        "mask_token_id": mask,
        "bos_token_id": None,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "torch_dtype": "float32",
    }


def _fast_dllm_v2_config(tok: Tokenizer) -> dict[str, Any]:
    """The published Fast_dLLM_v2 config.json's keys (1.5B: tied embeddings), with tiny sizes. No mask_token_id:
    the published configs have none; the mask id comes from added_tokens.json."""
    layers = 2
    return {
        "architectures": ["Fast_dLLM_QwenForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig", "AutoModel": "modeling.Fast_dLLM_QwenModel",
                     "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
        "bd_size": 8,  # 32 in the published checkpoints
        "bos_token_id": tok.token_to_id("<|endoftext|>"),
        "eos_token_id": tok.token_to_id("<|im_end|>"),
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "layer_types": ["full_attention"] * layers,
        "max_position_embeddings": 2048,
        "max_window_layers": layers,
        "model_type": "Fast_dLLM_Qwen",
        "num_attention_heads": 4,
        "num_hidden_layers": layers,
        "num_key_value_heads": 2,
        "pad_token_id": tok.token_to_id("<|im_end|>"),
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.53.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 264,
    }


def _llada2_config(tok: Tokenizer) -> dict[str, Any]:
    """The published LLaDA2.0-mini config.json's keys with tiny sizes (no mask or block fields: there are none)."""
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "dtype": "float32",  # bfloat16 in the published checkpoints
        "embedding_dropout": 0.0,
        "first_k_dense_replace": 1,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "max_position_embeddings": 2048,
        "max_window_layers": 28,
        "model_type": "llada2_moe",
        "moe_intermediate_size": 16,
        "moe_router_enable_expert_bias": True,
        "n_group": 4,
        "norm_head": False,
        "norm_softmax": False,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "num_shared_experts": 1,
        "output_dropout": 0.0,
        "output_router_logits": False,
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 600000,
        "rotary_dim": 8,
        "routed_scaling_factor": 2.5,
        "router_dtype": "fp32",
        "score_function": "sigmoid",
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "topk_group": 2,
        "transformers_version": "4.57.1",
        "use_bias": False,
        "use_cache": False,
        "use_qkv_bias": False,
        "use_rmsnorm": True,
        "use_sliding_window": False,
        "using_split_qkv_in_self_attention": False,
        "vocab_size": 264,
    }


def _llada_config(tok: Tokenizer) -> dict[str, Any]:
    """The published LLaDA-8B-Instruct config.json's keys (OLMo names) with tiny sizes."""
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": 64,  # 4096 in the published checkpoint
        "embedding_dropout": 0.0, "embedding_size": 264,
        "eos_token_id": tok.token_to_id("<|endoftext|>"),
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": tok.token_to_id("<|mdm_mask|>"),
        "max_sequence_length": 2048, "mlp_hidden_size": 128, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
        "pad_token_id": tok.token_to_id("<|endoftext|>"),
        "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True,
        "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3",
        "use_cache": False, "vocab_size": 264, "weight_tying": False,
    }


def _dream_config(tok: Tokenizer) -> dict[str, Any]:
    """The published Dream-v0 config.json's keys (Qwen2 names) with tiny sizes."""
    eot = tok.token_to_id("<|endoftext|>")
    return {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": eot, "eos_token_id": eot, "hidden_act": "silu",
        "hidden_size": 64,  # 3584 in the published checkpoints
        "initializer_range": 0.02, "intermediate_size": 128,
        "mask_token_id": tok.token_to_id("<|mask|>"),
        "max_position_embeddings": 2048, "max_window_layers": 2, "model_type": "Dream", "num_attention_heads": 4,
        "num_hidden_layers": 2, "num_key_value_heads": 2, "pad_token_id": eot, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 264,
    }


def _write_llada_files(out: Path, tok: Tokenizer) -> None:
    """The published LLaDA-8B-Instruct side files: tokenizer_config.json (chat template, bos/eos), special tokens,
    generation_config.json (bos and eos only)."""
    _write_json(out / "special_tokens_map.json", {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
        "chat_template": LLADA_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
        "fast_tokenizer": True, "model_max_length": 2048, "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast"})
    _write_json(out / "generation_config.json", {
        "bos_token_id": tok.token_to_id("<|startoftext|>"), "eos_token_id": tok.token_to_id("<|endoftext|>")})


def _write_dream_files(out: Path, tok: Tokenizer) -> None:
    """The published Dream side files: added_tokens.json, special tokens (mask ``<|mask|>``), a tokenizer_config.json
    with a Qwen chat template, generation_config.json (bos, eos, pad)."""
    specials = {t: tok.token_to_id(t) for t in DREAM_SPECIAL_TOKENS}
    _write_json(out / "added_tokens.json", specials)
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": ["<|beginoftext|>", "<|mask|>"], "bos_token": "<|beginoftext|>",
        "eos_token": "<|endoftext|>", "mask_token": "<|mask|>", "pad_token": "<|endoftext|>"})
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False, "additional_special_tokens": ["<|beginoftext|>", "<|mask|>"],
        "bos_token": "<|beginoftext|>", "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "errors": "replace", "mask_token": "<|mask|>", "model_max_length": 2048,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "DreamTokenizer",
        "unk_token": None})
    eot = specials["<|endoftext|>"]
    _write_json(out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot})


def write_lora_adapter(out_dir: str | os.PathLike[str], base: dict[str, torch.Tensor], targets: tuple[str, ...],
                       seed: int = 0, r: int = LORA_RANK, alpha: float = LORA_RANK) -> Path:
    """A random peft-format LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``, peft's key names
    ``base_model.model.<weight>.lora_{A,B}.weight``) on every 2-D weight of ``base`` whose module is in ``targets``."""
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {}
    for name in sorted(base):
        module, leaf = name.rsplit(".", 1)
        if leaf != "weight" or module.rsplit(".", 1)[-1] not in targets or base[name].dim() != 2:
            continue
        out_dim, in_dim = base[name].shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = WEIGHT_STD * torch.randn(r, in_dim, generator=gen)
        tensors[f"base_model.model.{module}.lora_B.weight"] = WEIGHT_STD * torch.randn(out_dim, r, generator=gen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "adapter_config.json", {
        "base_model_name_or_path": None, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "lora_alpha": alpha, "lora_dropout": 0.1, "modules_to_save": None,
        "peft_type": "LORA", "r": r, "target_modules": list(targets), "task_type": None, "use_dora": False,
        "use_rslora": False})
    return out


def _write_llada2_files(out: Path) -> None:
    """The published tokenizer_config.json (mask_token, chat template) and special_tokens_map.json; no
    generation_config.json (none was found for the published checkpoints)."""
    _write_json(out / "special_tokens_map.json", {
        "bos_token": "<|startoftext|>", "cls_token": "[CLS]", "eos_token": "<|endoftext|>", "gmask_token": "[gMASK]",
        "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"})
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
        "chat_template": LLADA2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "cls_token": "[CLS]",
        "eos_token": "<|endoftext|>", "mask_token": "<|mask|>", "fast_tokenizer": True, "gmask_token": "[gMASK]",
        "model_max_length": 2048, "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})


def _write_fast_dllm_v2_files(out: Path, tok: Tokenizer, config: dict[str, Any]) -> None:
    """The published Fast-dLLM v2 side files: added_tokens.json (the mask id's only source), special_tokens_map.json,
    a Qwen2Tokenizer tokenizer_config.json without mask_token or chat template, chat_template.jinja, and the
    generation_config.json sampling defaults (do_sample, temperature 0.7, top_k 20, top_p 0.8)."""
    specials = {t: tok.token_to_id(t) for t in FAST_DLLM_SPECIAL_TOKENS}
    _write_json(out / "added_tokens.json", specials)
    mask = {"content": "|<MASK>|", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": [mask],
        "eos_token": {**mask, "content": "<|im_end|>"},
        "pad_token": {**mask, "content": "<|endoftext|>"},
    })
    _write_json(out / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {**mask, "content": t, "special": True} for t, i in specials.items()},
        "additional_special_tokens": ["|<MASK>|"],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": int(config["max_position_embeddings"]),
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    _write_json(out / "generation_config.json", {
        "bos_token_id": specials["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [specials["<|im_end|>"], specials["<|endoftext|>"]],
        "pad_token_id": specials["<|endoftext|>"],
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": "4.53.1",
    })


def _save_sharded(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    """``model-0000k-of-0000n.safetensors`` shards and their ``model.safetensors.index.json``, as published."""
    names = sorted(tensors)
    per = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for k in range(num_shards):
        file = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def init_weights(model: Decoder, seed: int, weight_std: float = WEIGHT_STD, norm_std: float = NORM_STD) -> None:
    """normal(0, weight_std) for every matrix (and bias), 1 + normal(0, norm_std) for every RMSNorm weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a fixed order, so a seed fixes every value
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.rsplit(".", 1)[-1].endswith("norm"):  # input_norm, post_norm, q_norm, k_norm, norm
                param.copy_(1.0 + norm_std * noise)
            else:
                param.copy_(weight_std * noise)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_random_model(
    out_dir: str | os.PathLike[str], family: str = "sdar", seed: int = 0,
    weights_dtype: torch.dtype = torch.float32, **overrides: Any,
) -> Path:
    """Write a tiny random model of ``family`` to ``out_dir`` (created if needed) and return its path.

    ``overrides`` replace ``config.json`` fields (e.g. ``hidden_size=32``, ``num_hidden_layers=1``,
    ``tie_word_embeddings=True``, ``model_type="qwen3"``); the weights follow the resulting config and are saved in
    ``weights_dtype`` (drawn in float32, then cast). The same seed and overrides always give the same files.
    """
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}.")

    specials, make_config = {
        "sdar": (SPECIAL_TOKENS, _sdar_config), "fast_dllm_v2": (FAST_DLLM_SPECIAL_TOKENS, _fast_dllm_v2_config),
        "llada2": (LLADA2_SPECIAL_TOKENS, _llada2_config), "d2f_llada": (LLADA_SPECIAL_TOKENS, _llada_config),
        "d2f_dream": (DREAM_SPECIAL_TOKENS, _dream_config)}[family]
    tok = _byte_tokenizer(specials)
    config = make_config(tok)
    config.update(overrides)
    if overrides.get("model_type") == "qwen3" and "architectures" not in overrides:
        config["architectures"] = ["Qwen3ForCausalLM"]
    if int(config["vocab_size"]) < tok.get_vocab_size():
        raise ConfigError(
            f"vocab_size {config['vocab_size']} is smaller than the tokenizer's {tok.get_vocab_size()} tokens.")

    model = Decoder(decoder_config_for(config))  # the loader's own choice, so what is written is what loads
    init_weights(model, seed)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", config)
    if family != "sdar":
        if family == "fast_dllm_v2":
            _write_fast_dllm_v2_files(out, tok, config)
        elif family == "llada2":
            _write_llada2_files(out)
        elif family == "d2f_llada":
            _write_llada_files(out, tok)
        else:
            _write_dream_files(out, tok)
        tensors = {name: t.to(weights_dtype) for name, t in model.hf_state_dict().items()}
        _save_sharded(out, tensors, num_shards=2)
        if family in LORA_TARGETS:  # the D2F adapter that makes the base model a block-diffusion decoder
            write_lora_adapter(out / LORA_ADAPTER_DIR, tensors, LORA_TARGETS[family], seed=seed)
        return out
    _write_json(out / "generation_config.json", {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        "pad_token_id": config.get("pad_token_id"),
    })
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "add_bos_token": False,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|MASK|>",
        "model_max_length": int(config["max_position_embeddings"]),
        "chat_template": CHAT_TEMPLATE,
    })
    tensors = {name: t.to(weights_dtype) for name, t in model.hf_state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
