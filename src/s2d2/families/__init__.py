"""Model families: which adapter and native module serve a checkpoint, keyed by config.json ``model_type``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from s2d2.checkpoint import SpecialIds, load_weights, merge_lora
from s2d2.errors import ModelLoadError
from s2d2.families.base import FamilyAdapter
from s2d2.families.d2f import (
    DREAM_TURN_END_TOKENS,
    LLADA_TURN_END_TOKENS,
    DreamAdapter,
    LLaDAAdapter,
    dream_decoder_config,
    llada_decoder_config,
)
from s2d2.families.fast_dllm import FastDLLMAdapter
from s2d2.families.llada2 import LLaDA2Adapter, llada2_decoder_config
from s2d2.families.sdar import SDARAdapter
from s2d2.models.decoder import Decoder, DecoderConfig

# SDAR checkpoints say "sdar"; a Qwen3 model trained with the block-diffusion objective may say "qwen3".
SDAR_MODEL_TYPES = ("sdar", "qwen3")
FAST_DLLM_MODEL_TYPES = ("Fast_dLLM_Qwen",)  # Fast-dLLM v2 (Qwen2.5 architecture, shifted logits)
LLADA2_MODEL_TYPES = ("llada2_moe",)  # LLaDA2.0 / 2.1 (BailingMoeV2, aligned logits)
LLADA_MODEL_TYPES = ("llada",)  # LLaDA-8B (OLMo layout, aligned logits), with the D2F adapter
DREAM_MODEL_TYPES = ("Dream",)  # Dream-v0-7B (Qwen2 layout, shifted logits), with the D2F adapter
SUPPORTED_MODEL_TYPES = (SDAR_MODEL_TYPES + FAST_DLLM_MODEL_TYPES + LLADA2_MODEL_TYPES + LLADA_MODEL_TYPES
                         + DREAM_MODEL_TYPES)


def decoder_config_for(config: dict[str, Any]) -> DecoderConfig:
    """The native decoder's configuration for a checkpoint's ``config.json``, by its ``model_type``."""
    model_type = str(config.get("model_type", ""))
    if model_type in LLADA2_MODEL_TYPES:
        return llada2_decoder_config(config)
    if model_type in LLADA_MODEL_TYPES:
        return llada_decoder_config(config)
    if model_type in DREAM_MODEL_TYPES:
        return dream_decoder_config(config)
    if model_type in FAST_DLLM_MODEL_TYPES:  # Qwen2 layout: q/k/v bias, no q/k norm
        return DecoderConfig.from_hf(config, qk_norm=False, qkv_bias=True)
    # Qwen3 layout (SDAR): q/k norm, q/k/v bias only if configured
    return DecoderConfig.from_hf(config, qk_norm=True, qkv_bias=bool(config.get("attention_bias", False)))


def build_adapter(model_dir: Path, config: dict[str, Any], special: SpecialIds, tokenizer: Tokenizer,
                  device: torch.device, dtype: torch.dtype, lora_dir: Path | None = None) -> FamilyAdapter:
    """Instantiate the native module for ``config``, load its safetensors weights (with the LoRA adapter in
    ``lora_dir`` merged in), and wrap it in its family adapter."""
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} in {model_dir / 'config.json'} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    if special.mask_id is None:
        raise ModelLoadError(f"{model_dir} names no mask token (config.json mask_token_id); "
                             "a block-diffusion model needs one.")
    fast = model_type in FAST_DLLM_MODEL_TYPES
    decoder_config = decoder_config_for(config)
    tensors = load_weights(model_dir, device=str(device))
    if lora_dir is not None:
        tensors = merge_lora(tensors, lora_dir)
    model = Decoder.from_hf_weights(decoder_config, tensors, device, dtype)
    # Rows past the tokenizer's vocabulary are padding that was never trained: never emit them.
    padding = range(tokenizer.get_vocab_size(with_added_tokens=True), decoder_config.vocab_size)
    if fast:
        bd_size = config.get("bd_size", 32)
        if not isinstance(bd_size, int) or isinstance(bd_size, bool) or bd_size < 1:
            raise ModelLoadError(f"config.json field bd_size must be a positive integer, got {bd_size!r}.")
        return FastDLLMAdapter(model, special.mask_id, special.eos_ids, banned_ids=padding, bd_size=bd_size)
    if model_type in LLADA2_MODEL_TYPES:
        return LLaDA2Adapter(model, special.mask_id, special.eos_ids, banned_ids=padding)
    if model_type in LLADA_MODEL_TYPES:
        stops = _with_turn_ends(special.eos_ids, tokenizer, LLADA_TURN_END_TOKENS)
        return LLaDAAdapter(model, special.mask_id, stops, banned_ids=padding)
    if model_type in DREAM_MODEL_TYPES:
        stops = _with_turn_ends(special.eos_ids, tokenizer, DREAM_TURN_END_TOKENS)
        return DreamAdapter(model, special.mask_id, stops, banned_ids=padding)
    return SDARAdapter(model, special.mask_id, special.eos_ids, banned_ids=padding)


def _with_turn_ends(eos_ids: tuple[int, ...], tokenizer: Tokenizer, tokens: tuple[str, ...]) -> tuple[int, ...]:
    """``eos_ids`` followed by the ids of the turn-end ``tokens`` the tokenizer knows (no duplicates)."""
    known = (tokenizer.token_to_id(t) for t in tokens)
    return tuple(dict.fromkeys([*eos_ids, *(i for i in known if i is not None)]))
