"""Write a random-weight checkpoint of a published model's real size and layout, to measure what real sizes cost.

The published files (``config.json``, tokenizer and chat files) are copied from ``--published`` (e.g.
``../shared/checkpoints/JetLM__SDAR-1.7B-Chat``); a Qwen2 ``vocab.json`` + ``merges.txt`` (``--bpe``) stand in for a
missing ``tokenizer.json``. The weights are drawn tensor by tensor (``s2d2 init-random``'s distribution, a fixed
seed), stored in the config's ``torch_dtype`` under the checkpoint's own names, in one ``model.safetensors`` or in
``--shards`` shards with their index. Never commit the result (SDAR-1.7B: 4.1 GB).

    python scripts/sized_checkpoint.py --published ../shared/checkpoints/JetLM__SDAR-1.7B-Chat \\
        --bpe ../shared/checkpoints/_qwen2-bpe --out /tmp/sdar-1.7b
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from s2d2.families import decoder_config_for
from s2d2.models.decoder import Decoder
from s2d2.training.random_init import NORM_STD, WEIGHT_STD

COPIED = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
          "added_tokens.json", "chat_template.jinja", "tokenizer.json")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def random_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint ``config`` describes, under its names, drawn one by one in its dtype."""
    with torch.device("meta"):
        model = Decoder(decoder_config_for(config), device="meta")
    dtype = DTYPES[str(config.get("torch_dtype") or config.get("dtype") or "float32")]
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (param, rows) in model._hf_layout().items():
        if name == model.config.layout.lm_head and model.lm_head is None:
            continue  # tied: the checkpoint holds the embedding only
        shape = (param[rows] if rows is not None else param).shape
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        out[name] = (1.0 + NORM_STD * noise if name.endswith("norm.weight") else WEIGHT_STD * noise).to(dtype)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--published", type=Path, required=True, help="the published checkpoint's small files")
    parser.add_argument("--bpe", type=Path, help="vocab.json + merges.txt, where --published has no tokenizer.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (args.published / name).is_file():
            shutil.copyfile(args.published / name, args.out / name)
    if not (args.out / "tokenizer.json").is_file():
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(args.bpe / name, args.out / name)
    config = json.loads((args.out / "config.json").read_text())
    tensors = random_tensors(config, args.seed)
    names = list(tensors)
    per = -(-len(names) // args.shards)
    weight_map = {}
    for k in range(args.shards):
        file = "model.safetensors" if args.shards == 1 else f"model-{k + 1:05d}-of-{args.shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, str(args.out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    if args.shards > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (args.out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"wrote {args.out}: {sum(t.numel() for t in tensors.values()) / 1e9:.2f}B parameters, {size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
