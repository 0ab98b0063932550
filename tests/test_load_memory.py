"""Loading a checkpoint needs the model's memory, not the file's as well (issue 30).

A safetensors file is memory-mapped; a loader that reads every tensor through one map (or into a dict first) holds
the file resident beside the model: about 2x the weights at its peak. These tests load a generated bf16 checkpoint of
~290 MB in a fresh process and bound the peak resident memory the load adds (``ru_maxrss`` after loading minus
before) by 1.3x the weights in the dtype they are loaded in, bf16 and float32.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from s2d2.checkpoint import CheckpointTensors, load_weights, merge_lora, open_weights
from s2d2.training.random_init import LORA_ADAPTER_DIR, write_random_model

# ~143M parameters: 286 MB in bf16, no tensor over 17 MB (as in a real checkpoint, the largest is a small share)
SHAPE = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=10, num_attention_heads=8,
             num_key_value_heads=4, head_dim=128, vocab_size=8192, torch_dtype="bfloat16")

MEASURE = """
import json, resource, sys
import torch
import s2d2
from s2d2.checkpoint import open_weights
s2d2.load(sys.argv[3], dtype=sys.argv[2])  # a tiny model first: the one-time imports (meta kernels, ~75 MB) and
# allocations of any load are not the weights' share
weights = open_weights(sys.argv[1])
size = sum(weights[n].numel() for n in weights)  # parameters (the map is dropped below, before measuring)
del weights
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = s2d2.load(sys.argv[1], dtype=sys.argv[2])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loaded = sum(p.numel() * p.element_size() for p in model.adapter.model.parameters())
print(json.dumps({"added": (after - before) * 1024, "loaded": loaded, "params": size}))
"""


@pytest.fixture(scope="module")
def sized_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("sized"), seed=5, weights_dtype=torch.bfloat16, **SHAPE)


def _load_in_fresh_process(path: Path, dtype: str, tiny: Path) -> dict[str, int]:
    # A fresh process so that the peak is this load's alone. Its first map of the file must not be the one that
    # counted the parameters: that map is dropped before the measurement starts.
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), dtype, str(tiny)], capture_output=True, text=True,
                         timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_loading_adds_at_most_1_3x_the_loaded_weights(sized_model: Path, dtype: str, tmp_path: Path) -> None:
    got = _load_in_fresh_process(sized_model, dtype, write_random_model(tmp_path / "tiny"))
    assert got["loaded"] == got["params"] * (2 if dtype == "bfloat16" else 4)
    ratio = got["added"] / got["loaded"]
    assert ratio <= 1.3, f"loading in {dtype} added {got['added'] / 2**20:.0f} MiB of resident memory for " \
                         f"{got['loaded'] / 2**20:.0f} MiB of weights ({ratio:.2f}x)"


def test_the_lazy_checkpoint_reads_what_the_eager_one_holds(sized_model: Path) -> None:
    lazy, eager = open_weights(sized_model), load_weights(sized_model)
    assert list(lazy) == list(eager) and len(lazy) == len(eager)
    assert all(torch.equal(lazy[n], eager[n]) for n in list(eager)[::7])
    assert "no.such.weight" not in lazy
    with pytest.raises(KeyError):
        lazy["no.such.weight"]


class _Counting(Mapping[str, torch.Tensor]):
    """A checkpoint that records which tensors were read."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors, self.read = tensors, []

    def __getitem__(self, name: str) -> torch.Tensor:
        self.read.append(name)
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors


def test_a_lora_merge_reads_each_weight_when_the_loader_does(tmp_path: Path) -> None:
    """Merging holds one updated weight at a time: nothing is read until the loader asks, and each weight once."""
    path = write_random_model(tmp_path / "m", "d2f_llada")
    base = _Counting(load_weights(path))
    merged = merge_lora(base, path / LORA_ADAPTER_DIR)
    assert base.read == []
    from s2d2.families import decoder_config_for
    from s2d2.models.decoder import Decoder

    config = json.loads((path / "config.json").read_text())
    Decoder.from_hf_weights(decoder_config_for(config), merged)
    assert sorted(base.read) == sorted(base.tensors)  # every weight read once, no more


def test_a_checkpoint_is_read_in_file_order_and_reopened(sized_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file is mapped afresh after READ_BUDGET bytes, so the pages already copied can leave the process."""
    import s2d2.checkpoint as checkpoint

    opened: list[Path] = []
    real_open = checkpoint._open_safetensors

    def counting_open(path: Path, device: str):
        opened.append(path)
        return real_open(path, device)

    monkeypatch.setattr(checkpoint, "_open_safetensors", counting_open)
    weights = open_weights(sized_model)
    headers = len(opened)
    total = 0
    for name in weights:
        tensor = weights[name]
        total += tensor.numel() * tensor.element_size()
    reopens = len(opened) - headers
    assert isinstance(weights, CheckpointTensors)
    assert total // checkpoint.READ_BUDGET <= reopens <= total // checkpoint.READ_BUDGET + 2
