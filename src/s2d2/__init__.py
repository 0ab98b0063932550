"""s2d2: fast decoding for block-diffusion language models.

S2D2 (arXiv 2603.25702) drafts a block in parallel with the model's diffusion mode, verifies the draft with the
same model in autoregressive mode, and lets a cheap routing policy decide per step whether verifying pays off.
The AR, static and confidence-threshold (dynamic) baselines run through the same loop.

    import s2d2
    model = s2d2.load("bundled")          # or a local Hugging Face-format directory, or a hub id
    out = model.generate(["prompt"], s2d2.DecodeConfig(method="s2d2", block_size=4))
    out[0].text, out[0].token_ids, out[0].stats
"""

from s2d2.api import Generation, Model, load
from s2d2.config import DecodeConfig
from s2d2.core.stats import DecodeStats
from s2d2.errors import ConfigError, InputError, ModelLoadError, S2D2Error

__all__ = [
    "ConfigError",
    "DecodeConfig",
    "DecodeStats",
    "Generation",
    "InputError",
    "Model",
    "ModelLoadError",
    "S2D2Error",
    "load",
]
__version__ = "0.1.0"
