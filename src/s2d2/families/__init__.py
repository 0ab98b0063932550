"""Model families, keyed by config.json ``model_type``: one registry, one module per family.

Each family's adapter class (``families/<family>.py``) holds only what differs: the ``model_types`` it serves, how
its ``config.json`` maps to the network (``decoder_config``), how the adapter is made around a loaded network
(``from_checkpoint``: stop ids, block sizes), the dtype its checkpoints were trained in, and its forwards' layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from s2d2.checkpoint import SpecialIds, merge_lora, open_weights
from s2d2.errors import ModelLoadError
from s2d2.families.base import FamilyAdapter
from s2d2.families.d2f import DreamAdapter, LLaDAAdapter
from s2d2.families.fast_dllm import FastDLLMAdapter
from s2d2.families.llada2 import LLaDA2Adapter
from s2d2.families.sdar import SDARAdapter
from s2d2.models.decoder import Decoder, DecoderConfig

FAMILIES: tuple[type[SDARAdapter], ...] = (SDARAdapter, FastDLLMAdapter, LLaDA2Adapter, LLaDAAdapter, DreamAdapter)
BY_MODEL_TYPE: dict[str, type[SDARAdapter]] = {t: family for family in FAMILIES for t in family.model_types}
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)


def family_for(config: Mapping[str, Any], where: Path | str = "config.json") -> type[SDARAdapter]:
    """The adapter class serving a checkpoint's ``config.json`` (read from ``where``), by its ``model_type``."""
    model_type = str(config.get("model_type", ""))
    if model_type not in BY_MODEL_TYPE:
        raise ModelLoadError(f"model_type {model_type!r} in {where} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    return BY_MODEL_TYPE[model_type]


def decoder_config_for(config: Mapping[str, Any]) -> DecoderConfig:
    """The native decoder's configuration for a checkpoint's ``config.json``."""
    return family_for(config).decoder_config(config)


def build_adapter(model_dir: Path, config: dict[str, Any], special: SpecialIds, tokenizer: Tokenizer,
                  device: torch.device, dtype: torch.dtype, lora_dir: Path | None = None) -> FamilyAdapter:
    """Instantiate the native module for ``config``, load its safetensors weights (with the LoRA adapter in
    ``lora_dir`` merged in), and wrap it in its family adapter."""
    family = family_for(config, model_dir / "config.json")
    _check_mask(special, str(model_dir))
    decoder_config = family.decoder_config(config)
    if device.type == "meta":  # shapes, ids and tokenizer without the weights: a server's API side (no decoding)
        with torch.device("meta"):
            model = Decoder(decoder_config, device=device, dtype=dtype).eval().requires_grad_(False)
    else:
        # Read lazily and copied into the model tensor by tensor: loading needs the model's memory, not the file's
        # as well (the weights are read on the CPU and moved, so on an accelerator the host holds a few tensors).
        weights = open_weights(model_dir)
        tensors = merge_lora(weights, lora_dir) if lora_dir is not None else weights
        model = Decoder.from_hf_weights(decoder_config, tensors, device, dtype)
        weights.close()
    return wrap_decoder(model, config, special, tokenizer)


def _check_mask(special: SpecialIds, where: str) -> None:
    if special.mask_id is None:
        raise ModelLoadError(f"{where} names no mask token (config.json mask_token_id); "
                             "a block-diffusion model needs one.")


def wrap_decoder(model: Decoder, config: dict[str, Any], special: SpecialIds, tokenizer: Tokenizer,
                 where: str = "config.json") -> FamilyAdapter:
    """The family adapter of ``config`` around a built network ``model`` (its weights loaded or shared)."""
    _check_mask(special, where)
    # Rows past the tokenizer's vocabulary are padding that was never trained: never emit them.
    padding = range(tokenizer.get_vocab_size(with_added_tokens=True), model.config.vocab_size)
    return family_for(config, where).from_checkpoint(model, config, special, tokenizer, padding)
