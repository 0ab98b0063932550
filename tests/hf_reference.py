"""transformers' Qwen3 and Qwen2 as test references: their configs built from one of our config.json files."""

from __future__ import annotations

from typing import Any


def _shared_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config.json fields Qwen2Config and Qwen3Config share."""
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        hidden_act=cfg["hidden_act"],
        use_sliding_window=False,
    )


def qwen3_config(cfg: dict[str, Any]) -> Any:
    """A ``transformers.Qwen3Config`` with the fields of an SDAR/Qwen3 ``config.json`` dict."""
    from transformers import Qwen3Config

    return Qwen3Config(**_shared_fields(cfg), head_dim=cfg["head_dim"], attention_bias=cfg["attention_bias"])


def qwen2_config(cfg: dict[str, Any]) -> Any:
    """A ``transformers.Qwen2Config`` with the fields of a Qwen2 / Fast-dLLM v2 ``config.json`` dict (q/k/v bias is
    built into Qwen2)."""
    from transformers import Qwen2Config

    return Qwen2Config(**_shared_fields(cfg))
