"""s2d2: fast decoding for block-diffusion language models.

S2D2 (arXiv 2603.25702) drafts a block in parallel with the model's diffusion mode, verifies the draft with the
same model in autoregressive mode, and lets a cheap routing policy decide per step whether verifying pays off.
The AR, static and confidence-threshold (dynamic) baselines run through the same loop.

    import s2d2
    model = s2d2.load("bundled")          # or a local Hugging Face-format directory, or a hub id
    out = model.generate(["prompt"], s2d2.DecodeConfig(method="s2d2", block_size=4))
    out[0].text, out[0].token_ids, out[0].stats
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from s2d2.api import Generation, Model, load
    from s2d2.config import DecodeConfig
    from s2d2.core.stats import DecodeStats
    from s2d2.errors import ConfigError, InputError, ModelLoadError, S2D2Error
    from s2d2.hf import from_transformers

# The public names, loaded on first use (PEP 562): `s2d2 --help` and `s2d2.cli` must not pay for importing torch
# (about 1.2 s on an idle 2-core machine, several seconds on a busy one) before they know what the user asked for.
_WHERE = {"Generation": "s2d2.api", "Model": "s2d2.api", "load": "s2d2.api", "DecodeConfig": "s2d2.config",
          "DecodeStats": "s2d2.core.stats", "ConfigError": "s2d2.errors", "InputError": "s2d2.errors",
          "ModelLoadError": "s2d2.errors", "S2D2Error": "s2d2.errors", "from_transformers": "s2d2.hf"}


_SUBMODULES = ("hf",)  # public submodules, reachable as s2d2.hf after a plain `import s2d2`


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"s2d2.{name}")
    if name not in _WHERE:
        raise AttributeError(f"module 's2d2' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE, *_SUBMODULES])


__all__ = [
    "ConfigError",
    "DecodeConfig",
    "DecodeStats",
    "Generation",
    "InputError",
    "Model",
    "ModelLoadError",
    "S2D2Error",
    "from_transformers",
    "load",
]
__version__ = "0.1.0"
