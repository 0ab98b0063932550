"""The public Python API: ``s2d2.load(...)`` returns a :class:`Model`; ``Model.generate`` decodes prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from s2d2.adapters import build_adapter
from s2d2.adapters.base import FamilyAdapter
from s2d2.cache import KVCache
from s2d2.checkpoint import load_tokenizer, read_chat_template, read_config, read_special_ids, resolve_model_dir
from s2d2.config import DecodeConfig
from s2d2.decode import decode
from s2d2.errors import ConfigError, InputError, ModelLoadError
from s2d2.stats import DecodeStats

BUNDLED = "bundled"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Generation:
    """One decoded prompt."""

    text: str
    token_ids: list[int]  # generated ids, stop token excluded (with stop strings: up to the token completing one)
    finish_reason: str  # "stop" (a stop token or stop string was generated) or "length" (max_new_tokens reached)
    stats: DecodeStats

    def to_dict(self) -> dict[str, Any]:
        """The ``s2d2 generate --json`` object."""
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats.to_dict()}


class Model:
    """A loaded block-diffusion model with its tokenizer, ready to decode with any :class:`DecodeConfig`."""

    def __init__(self, adapter: FamilyAdapter, tokenizer: Any, *, name: str, chat_template: str | None = None) -> None:
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.name = name
        self.chat_template = chat_template
        self._cache: KVCache | None = None

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``, special tokens dropped."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render chat ``messages`` with the checkpoint's Jinja chat template (sandboxed)."""
        if self.chat_template is None:
            raise InputError(f"model {self.name} has no chat template.")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], config: DecodeConfig | None = None,
                 **overrides: Any) -> list[Generation]:
        """Decode each prompt (text, or a list of token ids) with ``config`` (fields may be overridden by keyword).

        Prompts are decoded one after another (batch size 1 per forward). Sampling is reproducible: prompt ``i``
        draws from a generator seeded with ``seed + i`` (a seed is drawn from torch's global RNG if none is set).
        """
        cfg = (config or DecodeConfig()).replace(**overrides) if overrides else (config or DecodeConfig())
        items = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else list(prompts)
        seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, (1,)))
        out = []
        for i, prompt in enumerate(items):
            ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            cache = self._cache_for(ids, cfg)
            generator = torch.Generator(device=self.device).manual_seed(seed + i)
            stop_check = (lambda done: _find_stop(self.decode(done), cfg.stop) >= 0) if cfg.stop else None
            token_ids, finish_reason, stats = decode(self.adapter, ids, cfg, cache, generator, stop_check)
            text = self.decode(token_ids)
            if cfg.stop and (cut := _find_stop(text, cfg.stop)) >= 0:
                # keep the tokens up to the one completing the stop string; the text ends before it
                token_ids = token_ids[:next(k for k in range(1, len(token_ids) + 1)
                                            if _find_stop(self.decode(token_ids[:k]), cfg.stop) >= 0)]
                text, finish_reason, stats.num_tokens = text[:cut], "stop", len(token_ids)
            out.append(Generation(text, token_ids, finish_reason, stats))
        return out

    def _cache_for(self, prompt_ids: list[int], cfg: DecodeConfig) -> KVCache:
        """Check the prompt fits the context, and return a cache large enough for it (reused across calls)."""
        if not prompt_ids:
            raise InputError("the prompt is empty.")
        vocab = self.adapter.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise InputError(f"the prompt holds token ids outside the vocabulary [0, {vocab}).")
        b = cfg.block_size
        total = -(-(len(prompt_ids) + cfg.max_new_tokens) // b) * b
        if total > self.adapter.max_positions:
            raise InputError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({cfg.max_new_tokens}), rounded up to "
                f"whole blocks, needs {total} positions but the model's context is {self.adapter.max_positions}.")
        capacity = total + 2 * b  # a verify forward writes up to 2B scratch rows after the block start
        if self._cache is None or self._cache.capacity < capacity:
            self._cache = self.adapter.new_cache(max(capacity, 256))
        return self._cache


def _find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    found = [i for i in (text.find(x) for x in stops) if i >= 0]
    return min(found, default=-1)


def bundled_model_dir() -> Path:
    """Where the model shipped inside the package lives."""
    return Path(str(resources.files("s2d2"))) / "bundled"


def load(name_or_path: str = BUNDLED, *, device: str = "cpu", dtype: str = "auto") -> Model:
    """Load a model: ``"bundled"``, a local Hugging Face-format directory, or a hub id.

    ``dtype="auto"`` computes in float32 on CPU (bfloat16 is several times slower there) and in the checkpoint's
    ``torch_dtype`` on GPU.
    """
    dev = _resolve_device(device)
    if name_or_path == BUNDLED:
        model_dir = bundled_model_dir()
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError("this build of s2d2 carries no bundled model yet; pass --model DIR "
                                 "(`s2d2 init-random --family sdar --out DIR` writes a tiny random one).")
    else:
        model_dir = resolve_model_dir(name_or_path)
    config = read_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    special = read_special_ids(model_dir, config, tokenizer)
    adapter = build_adapter(model_dir, config, special, tokenizer, dev, _resolve_dtype(dtype, config, dev))
    return Model(adapter, tokenizer, name=name_or_path, chat_template=read_chat_template(model_dir))


def _resolve_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a valid torch device (try cpu or cuda).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but no CUDA device is available.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} was requested but MPS is not available.")
    return dev


def _resolve_dtype(dtype: str, config: dict[str, Any], device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or "float32"), torch.float32)
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be auto, {', '.join(_DTYPES)}; got {dtype!r}.")
    return _DTYPES[dtype]
