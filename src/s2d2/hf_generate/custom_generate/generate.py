"""transformers' ``custom_generate`` entry point for s2d2: ``model.generate(..., trust_remote_code=True,
custom_generate=s2d2.hf.CUSTOM_GENERATE)`` imports this file and calls ``generate(model=..., **arguments)``;
:func:`s2d2.hf.generate` does the work."""

from s2d2.hf import generate as _s2d2_generate


def generate(model, *args, **kwargs):
    return _s2d2_generate(model, *args, **kwargs)
