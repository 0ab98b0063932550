"""D2F family (discrete diffusion forcing): LLaDA-8B-Instruct and Dream-v0-7B, turned into block-diffusion decoders
by the D2F LoRA adapters (merged at load, :func:`s2d2.checkpoint.merge_lora`).

- **LLaDA** (``model_type`` "llada"): a LLaMA-style dense decoder in OLMo's weight layout
  (``model.transformer.blocks.{i}.q_proj`` ..., ``ff_proj`` the SwiGLU gate, ``ff_out`` the down projection and,
  at the top level, the LM head), full multi-head attention unless the config says otherwise, **aligned** logits
  (a mask predicts itself): SDAR's forwards (block-causal drafts, the 2L verifier).
- **Dream** (``model_type`` "Dream"): Qwen2's architecture and weight names, **shifted** logits (row t-1 predicts
  token t): Fast-dLLM v2's forwards (every block opens with a token decoded in AR mode from the row before it;
  AR mode is a plain causal forward), without sub-blocks.

As in D2F's code, blocks start at the prompt's end (not at absolute multiples of the block size), and without
the AR-consistent cache (``cache_ver``) the prompt is one bidirectional chunk that later blocks see whole. (D2F's
Dream path drops its attention mask, reference §4.3 / our fact check: every Dream forward there is fully
bidirectional, later masked blocks included; here Dream gets the same block-causal masks as LLaDA.)

Both read the config keys of their published files; LLaDA's config class takes OLMo's defaults for keys a file
leaves out, so every architecture-changing key is checked at its effective value and a value the decoder does not
implement is refused in one sentence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tokenizers import Tokenizer

from s2d2.checkpoint import SpecialIds
from s2d2.errors import ModelLoadError
from s2d2.families.fast_dllm import FastDLLMAdapter
from s2d2.families.sdar import QWEN_WEIGHT_NAMES, SDARAdapter
from s2d2.models.decoder import Decoder, DecoderConfig, WeightNames

# The D2F example's block size (reference §4.3; the adapters were trained with blocks of 16).
D2F_BLOCK_SIZE = 32

# Tokens that end a turn, beside the checkpoints' eos ids (generation_config.json names only <|endoftext|>):
# LLaDA-8B-Instruct's chat turns end with <|eot_id|>; for Dream, D2F's example also stops on <|im_start|> and
# <|im_end|> (a base model writing the next chat turn).
LLADA_TURN_END_TOKENS = ("<|eot_id|>",)
DREAM_TURN_END_TOKENS = ("<|im_start|>", "<|im_end|>")

# LLaDA-8B's checkpoint names (OLMo's): ff_proj is the SwiGLU gate, ff_out the down projection and, at the top
# level, the LM head
LLADA_WEIGHT_NAMES = WeightNames(
    embed="model.transformer.wte.weight", norm="model.transformer.ln_f.weight",
    lm_head="model.transformer.ff_out.weight", layer="model.transformer.blocks.{i}.",
    input_norm="attn_norm.weight", post_norm="ff_norm.weight", qkv=("q_proj.weight", "k_proj.weight", "v_proj.weight"),
    o_proj="attn_out.weight", mlp="", swiglu=("ff_proj.weight", "up_proj.weight", "ff_out.weight"))

# LLaDA config keys that change the architecture: (the published config class's default, accepted values).
_LLADA_SUPPORTED: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "block_type": ("sequential", ("llama",)),
    "activation_type": ("swiglu", ("silu",)),
    "layer_norm_type": ("default", ("rms",)),
    "layer_norm_with_affine": (True, (True,)),
    "bias_for_layer_norm": (None, (None, False)),
    "rope": (False, (True,)),
    "alibi": (False, (False,)),
    "attention_layer_norm": (False, (False,)),
    "input_emb_norm": (False, (False,)),
    "scale_logits": (False, (False,)),
    "include_bias": (False, (False,)),
    "block_group_size": (1, (1,)),
}


def llada_decoder_config(cfg: Mapping[str, Any]) -> DecoderConfig:
    """The decoder for a LLaDA ``config.json`` (OLMo key names), or a ModelLoadError naming the first value the
    decoder does not implement."""
    for key, (default, accepted) in _LLADA_SUPPORTED.items():
        value = cfg.get(key, default)
        if value not in accepted:
            raise ModelLoadError(f"config.json {key}={value!r} is not supported for llada "
                                 f"(supported: {', '.join(repr(a) for a in accepted if a is not None)}).")
    try:
        d_model, heads = int(cfg["d_model"]), int(cfg["n_heads"])
        kv_heads = cfg.get("n_kv_heads")
        if kv_heads is None:  # OLMo's effective_n_kv_heads
            kv_heads = 1 if cfg.get("multi_query_attention") else heads
        inter = cfg.get("mlp_hidden_size")
        if inter is None:
            inter = int(cfg.get("mlp_ratio", 4)) * d_model
        return DecoderConfig(
            vocab_size=int(cfg.get("embedding_size") or cfg["vocab_size"]),  # rows of wte and of the LM head
            hidden_size=d_model,
            intermediate_size=int(inter),
            num_hidden_layers=int(cfg["n_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=d_model // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            max_position_embeddings=int(cfg.get("max_sequence_length", 1024)),
            tie_word_embeddings=bool(cfg.get("weight_tying", True)),
            qk_norm=False,
            qkv_bias=bool(cfg.get("include_qkv_bias") or False),
            rope_float32=bool(cfg.get("rope_full_precision", True)),
            layout=LLADA_WEIGHT_NAMES,
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks the required field {e.args[0]!r}.") from None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json has a field of the wrong type ({e}).") from None


def dream_decoder_config(cfg: Mapping[str, Any]) -> DecoderConfig:
    """The decoder for a Dream ``config.json``: Qwen2's (q/k/v bias, no q/k norm)."""
    return DecoderConfig.from_hf(cfg, qk_norm=False, qkv_bias=True, layout=QWEN_WEIGHT_NAMES)


class LLaDAAdapter(SDARAdapter):
    """SDAR's draft / 2L verify / commit forwards on a LLaDA checkpoint with its D2F adapter (aligned logits)."""

    family = "d2f_llada"
    model_types = ("llada",)  # LLaDA-8B (OLMo layout)
    default_block_size = D2F_BLOCK_SIZE
    blocks_from_prompt_end = True
    turn_end_tokens = LLADA_TURN_END_TOKENS
    decoder_config = staticmethod(llada_decoder_config)

    @staticmethod
    def checkpoint_dtype(config: Mapping[str, Any]) -> str | None:
        """LLaDA's OLMo-style config names its training precision (``amp_bf16``) instead of a dtype."""
        precision = {"amp_bf16": "bfloat16", "amp_fp16": "float16"}.get(str(config.get("precision")))
        return SDARAdapter.checkpoint_dtype(config) or precision


class DreamAdapter(FastDLLMAdapter):
    """Fast-dLLM v2's shifted-logit forwards on a Dream checkpoint with its D2F adapter, one block unit (no
    sub-blocks)."""

    family = "d2f_dream"
    model_types = ("Dream",)  # Dream-v0-7B (Qwen2 layout, shifted logits)
    blocks_from_prompt_end = True
    turn_end_tokens = DREAM_TURN_END_TOKENS
    decoder_config = staticmethod(dream_decoder_config)

    def __init__(self, model: Decoder, mask_id: int, stop_ids: Iterable[int], banned_ids: Iterable[int]) -> None:
        super().__init__(model, mask_id, stop_ids, banned_ids, bd_size=D2F_BLOCK_SIZE)
        self.default_sub_block_size = None

    @classmethod
    def from_checkpoint(cls, model: Decoder, config: Mapping[str, Any], special: SpecialIds, tokenizer: Tokenizer,
                        banned_ids: Iterable[int]) -> DreamAdapter:
        """The adapter around a loaded network (D2F's block size; no sub-blocks)."""
        assert special.mask_id is not None
        return cls(model, special.mask_id, cls.stop_ids_for(special, tokenizer), banned_ids)
