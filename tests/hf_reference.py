"""transformers' Qwen3 as a test reference: its config built from one of our config.json files."""

from __future__ import annotations

from typing import Any


def qwen3_config(cfg: dict[str, Any]) -> Any:
    """A ``transformers.Qwen3Config`` with the fields of an SDAR/Qwen3 ``config.json`` dict."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]},
        max_position_embeddings=cfg["max_position_embeddings"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        attention_bias=cfg["attention_bias"],
        hidden_act=cfg["hidden_act"],
        use_sliding_window=False,
    )


def qwen2_config(cfg: dict[str, Any]) -> Any:
    """A ``transformers.Qwen2Config`` with the fields of a Qwen2 / Fast-dLLM v2 ``config.json`` dict."""
    from transformers import Qwen2Config

    return Qwen2Config(
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
