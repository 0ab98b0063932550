"""LLaDA2.x family (inclusionAI/LLaDA2.0-mini, LLaDA2.1-mini): a BailingMoeV2 mixture-of-experts decoder with
aligned logits (a mask predicts itself), so its forwards are SDAR's (block-causal drafts, the 2L verifier), with
boolean masks that really mask (the reference's float 0/1 masks do not, its §7.10).

The architecture is the shared decoder (:mod:`s2d2.models.decoder`) with LLaDA2's weight names, per-head q/k
RMSNorm, partial RoPE, dense first layers and grouped-sigmoid routed experts (:mod:`s2d2.models.moe`). Config
values the decoder does not implement are refused in one sentence rather than silently misread.
Token editing (LLaDA2.1's self-correction) is the loop's ``editing_threshold`` / ``max_post_steps``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from s2d2.errors import ModelLoadError
from s2d2.families.sdar import SDARAdapter
from s2d2.models.decoder import DecoderConfig, WeightNames
from s2d2.models.moe import MoEConfig

# BailingMoeV2's checkpoint names (the MLP and expert names are the defaults)
LLADA2_WEIGHT_NAMES = WeightNames(
    embed="model.word_embeddings.weight", norm="model.norm.weight", lm_head="lm_head.weight", layer="model.layers.{i}.",
    input_norm="input_layernorm.weight", post_norm="post_attention_layernorm.weight",
    qkv=("attention.query_key_value.weight",), o_proj="attention.dense.weight",
    q_norm="attention.query_layernorm.weight", k_norm="attention.key_layernorm.weight")

# Neither config.json nor generation_config.json names these; the published generators and SGLang hard-code them.
LLADA2_BLOCK_SIZE = 32

# config.json values the decoder implements (key: accepted values); a key left out of the file takes the class
# default of the published modeling code, given first
_SUPPORTED = {
    "score_function": ("sigmoid",),
    "moe_router_enable_expert_bias": (True,),
    "router_dtype": ("fp32", "float32", None),
    "norm_head": (False,),
    "norm_softmax": (False,),
    "use_qkv_bias": (False,),
    "use_bias": (False,),
    "use_rmsnorm": (True,),
    "use_qk_norm": (True,),
    "using_split_qkv_in_self_attention": (False,),
    "hidden_act": ("silu",),
}


def llada2_decoder_config(cfg: Mapping[str, Any]) -> DecoderConfig:
    """The decoder for a LLaDA2 MoE ``config.json``, or a ModelLoadError naming the first unsupported value."""
    for key, accepted in _SUPPORTED.items():
        if key in cfg and cfg[key] not in accepted:
            raise ModelLoadError(f"config.json {key}={cfg[key]!r} is not supported for llada2_moe "
                                 f"(supported: {', '.join(repr(a) for a in accepted if a is not None)}).")
    try:
        factor = cfg.get("partial_rotary_factor")
        if factor is None and cfg.get("rotary_dim") is not None:
            factor = int(cfg["rotary_dim"]) / int(cfg["head_dim"])
        moe = MoEConfig(
            hidden_size=int(cfg["hidden_size"]),
            moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            num_experts=int(cfg["num_experts"]),
            top_k=int(cfg["num_experts_per_tok"]),
            n_group=int(cfg.get("n_group") or 1),
            topk_group=int(cfg.get("topk_group") or 1),
            num_shared_experts=int(cfg.get("num_shared_experts") or 0),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        )
        base = DecoderConfig.from_hf(cfg, qk_norm=True, qkv_bias=False, layout=LLADA2_WEIGHT_NAMES)
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks the required field {e.args[0]!r}.") from None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json has an invalid MoE field ({e}).") from None
    return replace(base, partial_rotary_factor=float(factor if factor is not None else 1.0), moe=moe,
                   first_k_dense_replace=int(cfg.get("first_k_dense_replace", 0)))


class LLaDA2Adapter(SDARAdapter):
    """SDAR's draft / 2L verify / commit forwards on a LLaDA2 MoE checkpoint (aligned logits)."""

    family = "llada2"
    model_types = ("llada2_moe",)  # LLaDA2.0 / 2.1 (BailingMoeV2, aligned logits)
    decoder_config = staticmethod(llada2_decoder_config)
    default_block_size = LLADA2_BLOCK_SIZE
    supports_editing = True  # LLaDA2.1's self-correction (LLaDA2.0 was not trained for it; the user decides)
