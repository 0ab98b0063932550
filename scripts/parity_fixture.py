"""Write a parity fixture: logits of a family's *published* modeling code on a tiny random checkpoint.

The published code is never part of this project: fetch it yourself into a folder and run this script in an
environment whose transformers it supports (4.57.x), with torch and safetensors. Per family:

- ``llada2``: ``modeling_llada2_moe.py`` + ``configuration_llada2_moe.py`` (inclusionAI/LLaDA2.0-mini);
- ``llada``: ``modeling_llada.py`` + ``configuration_llada.py`` (the D2F copy, S2D2 ``D2F/model_cache/llada``);
- ``dream``: ``model_dream.py`` + ``configuration_dream.py`` + ``generation_utils.py`` (the D2F copy, S2D2
  ``D2F/model_cache/dream``; it imports itself as ``model_cache.dream``, so keep that folder name).

::

    s2d2 init-random --family d2f_llada --out /tmp/llada-tiny --seed 0          # in the project's environment
    python scripts/parity_fixture.py --family llada --model /tmp/llada-tiny --code /tmp/ref/model_cache/llada \\
        --out tests/fixtures/llada_parity.safetensors                             # in the side environment

The fixture holds the input ids, the expected float32 logits of the *base* model (no adapter) under a causal, a
block-causal (block 4) and a full (bidirectional) mask, and in its metadata a checksum of the weights, so the tests
can rebuild the same model with ``init-random`` and compare. Masks reach the published code as additive 4D float
tensors (0 = attend, finfo.min = masked), the form every one of them applies as given (LLaDA2's 0/1 float masks
would mask nothing, reference §7.10).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INPUT_IDS = [5, 77, 120, 3, 250, 9, 41, 200, 13, 64, 101, 33]
BLOCK = 4
# family: (modeling module, configuration module, config class, model class, keyword of the additive mask)
FAMILIES = {
    "llada2": ("modeling_llada2_moe", "configuration_llada2_moe", "LLaDA2MoeConfig", "LLaDA2MoeModelLM",
               "attention_mask"),
    "llada": ("modeling_llada", "configuration_llada", "LLaDAConfig", "LLaDAModelLM", "attention_bias"),
    "dream": ("model_dream", "configuration_dream", "DreamConfig", "DreamModel", "attention_mask"),
}


def masks(n: int) -> dict[str, torch.Tensor]:
    """Boolean masks (True = may attend): causal, block-causal with blocks of ``BLOCK``, and full."""
    idx = torch.arange(n)
    return {"causal": idx[:, None] >= idx[None, :], "block_causal": (idx[:, None] // BLOCK) >= (idx[None, :] // BLOCK),
            "full": torch.ones(n, n, dtype=torch.bool)}


def weights_checksum(tensors: dict[str, torch.Tensor]) -> float:
    """A float64 sum over every tensor, name-ordered: detects a changed random model."""
    return float(sum(tensors[k].double().sum() for k in sorted(tensors)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--model", required=True, help="an init-random directory of the family")
    parser.add_argument("--code", required=True, help="folder holding the published modeling files")
    parser.add_argument("--out", required=True)
    parser.add_argument("--masks", nargs="+", default=None, help="masks to record (default: all)")
    args = parser.parse_args()
    modeling_name, configuration_name, config_class, model_class, mask_kwarg = FAMILIES[args.family]
    code = Path(args.code).resolve()
    sys.path.insert(0, str(code.parent.parent))  # the folder and its parent import as (namespace) packages
    package = f"{code.parent.name}.{code.name}"
    configuration = importlib.import_module(f"{package}.{configuration_name}")
    modeling = importlib.import_module(f"{package}.{modeling_name}")

    model_dir = Path(args.model)
    config = getattr(configuration, config_class)(**json.loads((model_dir / "config.json").read_text()))
    config._attn_implementation = "sdpa" if args.family == "dream" else "eager"
    model = getattr(modeling, model_class)(config).to(torch.float32).eval()
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("model-*.safetensors")):
        tensors.update(load_file(str(file)))
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if "inv_freq" not in k]:
        raise SystemExit(f"weights do not fit the published module: {result}")

    ids = torch.tensor([INPUT_IDS])
    out = {"input_ids": ids[0]}
    chosen = masks(len(INPUT_IDS))
    with torch.no_grad():
        for name, mask in chosen.items():
            if args.masks and name not in args.masks:
                continue
            additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[None, None]
            kwargs = {mask_kwarg: additive, "use_cache": False}
            out[f"logits_{name}"] = model(input_ids=ids, **kwargs).logits[0].float().contiguous()
    import transformers

    save_file(out, args.out, metadata={"weights_checksum": repr(weights_checksum(tensors)),
                                        "transformers": transformers.__version__, "block": str(BLOCK),
                                        "family": args.family})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
