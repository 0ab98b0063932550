"""Write the LLaDA2 parity fixture: logits of the *published* LLaDA2 MoE modeling code on a tiny random checkpoint.

The published code (``modeling_llada2_moe.py`` + ``configuration_llada2_moe.py`` from the inclusionAI/LLaDA2.0-mini
Hugging Face repository) is never part of this project: fetch it yourself into a folder (made a package with an
empty ``__init__.py``) and run this script in an environment whose transformers it supports (4.57.x; it fails on 5.x)
with torch and safetensors::

    s2d2 init-random --family llada2 --out /tmp/llada2-tiny --seed 0          # in the project's environment
    python scripts/llada2_parity_fixture.py --model /tmp/llada2-tiny --code /tmp/llada2_ref_code \\
        --out tests/fixtures/llada2_parity.safetensors                          # in the side environment

The fixture holds the input ids, the expected float32 logits under a causal and a block-causal (block 4) mask, and
in its metadata a checksum of the weights, so ``tests/test_llada2.py`` can rebuild the same model with
``init-random`` and compare. Masks are passed to the published code as additive 4D float tensors (0 = attend,
finfo.min = masked), the form it applies as given (its 0/1 float masks would mask nothing, reference §7.10).
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


def masks(n: int) -> dict[str, torch.Tensor]:
    """Boolean masks (True = may attend): causal, and block-causal with blocks of ``BLOCK``."""
    idx = torch.arange(n)
    return {"causal": idx[:, None] >= idx[None, :], "block_causal": (idx[:, None] // BLOCK) >= (idx[None, :] // BLOCK)}


def weights_checksum(tensors: dict[str, torch.Tensor]) -> float:
    """A float64 sum over every tensor, name-ordered: detects a changed random model."""
    return float(sum(tensors[k].double().sum() for k in sorted(tensors)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an init-random --family llada2 directory")
    parser.add_argument("--code", required=True, help="folder (a package) holding the published modeling files")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    code = Path(args.code).resolve()
    sys.path.insert(0, str(code.parent))
    modeling = importlib.import_module(f"{code.name}.modeling_llada2_moe")
    configuration = importlib.import_module(f"{code.name}.configuration_llada2_moe")

    model_dir = Path(args.model)
    config = configuration.LLaDA2MoeConfig(**json.loads((model_dir / "config.json").read_text()))
    config._attn_implementation = "eager"
    model = modeling.LLaDA2MoeModelLM(config).to(torch.float32).eval()
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("model-*.safetensors")):
        tensors.update(load_file(str(file)))
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if "inv_freq" not in k]:
        raise SystemExit(f"weights do not fit the published module: {result}")

    ids = torch.tensor([INPUT_IDS])
    out = {"input_ids": ids[0]}
    with torch.no_grad():
        for name, mask in masks(len(INPUT_IDS)).items():
            additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[None, None]
            out[f"logits_{name}"] = model(input_ids=ids, attention_mask=additive).logits[0].float().contiguous()
    import transformers

    save_file(out, args.out, metadata={"weights_checksum": repr(weights_checksum(tensors)),
                                        "transformers": transformers.__version__, "block": str(BLOCK)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
