"""The unattended device check (issue 28, item 3): what a machine with a GPU should confirm, in one short run.

On a random-weight SDAR model in the published layout (``s2d2 init-random`` with the shape of a published
checkpoint, written to a temporary directory and loaded through ``s2d2.load``), in float32:

1. **logits**: a forward on the device equals the same forward on the CPU (largest difference relative to the
   logits' scale, at most 1e-3);
2. **lossless**: greedy S2D2 verifying every step gives AR's tokens on the device, prompt for prompt (a difference
   is reported with the smallest top-2 logit gap met, as the precision notes in docs/decoding.md explain ties);
3. **one read per step**: a batched engine step reads the device once (on CUDA every synchronising call is counted
   with ``torch.cuda.set_sync_debug_mode``; on a CPU every ``tolist``/``item``/``int``/``float``/``bool``/``cpu`` of
   a tensor), LLaDA2's MoE dispatch aside (none here: SDAR is dense);
4. **speed**: tokens/s of AR, dynamic and S2D2 (configuration A, B = 8) at each batch size, eager; with
   ``--compile`` also the compiled batch-1 forward.

It prints one table per part and ``device check: PASS`` or ``device check: FAIL (...)``, and exits 0 or 1. Without a
GPU it runs on the CPU with a small model (what CI runs, ``tests/test_device_check.py``).

Usage::

    python scripts/device_check.py                                   # CPU, tiny model (seconds)
    python scripts/device_check.py --device cuda --size 1.7b         # an SDAR-1.7B-shaped model on the GPU
    python scripts/device_check.py --device cuda --size 1.7b --batch-sizes 1 16 64 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import s2d2
from s2d2 import DecodeConfig
from s2d2.engine.engine import Engine
from s2d2.training.random_init import write_random_model

# config.json fields of the published shapes (../shared/checkpoints/JetLM__SDAR-*-Chat/config.json); "tiny" is the
# CI size. The vocabulary stays the published one where given: the LM head is a large share of a forward.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=32768,
                 rope_theta=1000000),
    "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=32768,
               rope_theta=1000000),
}
METHODS = {
    "ar": dict(method="ar"),
    "dynamic B=8 t=0.9": dict(method="dynamic", block_size=8, threshold=0.9),
    "s2d2 config-A B=8": dict(method="s2d2", block_size=8),
}
TO_HOST = ("tolist", "item", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def prompts(model: s2d2.Model, count: int, length: int, seed: int) -> list[list[int]]:
    """Random prompts of ordinary tokens (special ones left out)."""
    rng = random.Random(seed)
    special = set(model.adapter.banned_ids.tolist()) | {model.adapter.mask_id}
    vocab = [t for t in range(min(model.adapter.model.config.vocab_size, 4096)) if t not in special]
    return [[rng.choice(vocab) for _ in range(length)] for _ in range(count)]


def check_logits(model_dir: Path, device: str, model: s2d2.Model, ids: list[int]) -> tuple[bool, str]:
    """One uncached forward on ``device`` against the CPU's."""
    def logits(m: s2d2.Model) -> torch.Tensor:
        n = len(ids)
        mask = torch.ones(n, n, dtype=torch.bool, device=m.device).tril()
        with torch.inference_mode():
            return m.adapter.model(torch.tensor(ids, device=m.device), torch.arange(n, device=m.device), None,
                                   mask).float().cpu()
    if torch.device(device).type == "cpu":
        return True, "the device is the CPU: nothing to compare"
    here = logits(model)
    there = logits(s2d2.load(str(model_dir), device="cpu", dtype="float32"))
    error = float((here - there).abs().max() / there.abs().max())
    return error <= 1e-3, f"largest difference / largest logit = {error:.2e}"


def check_lossless(model: s2d2.Model, batch: list[list[int]], new_tokens: int) -> tuple[bool, str]:
    """Greedy S2D2 verifying every step against AR, at batch 1 (each prompt alone)."""
    base = dict(max_new_tokens=new_tokens, stop_token_ids=(), block_size=4)
    same = 0
    for ids in batch:
        ar = model.generate(ids, DecodeConfig(method="ar", max_new_tokens=new_tokens, stop_token_ids=()))[0]
        s2 = model.generate(ids, DecodeConfig(method="s2d2", policy="mask_span_length", min_span=1, **base))[0]
        same += ar.token_ids == s2.token_ids
    return same == len(batch), f"{same} of {len(batch)} prompts token-identical"


@contextlib.contextmanager
def counted_reads(device: torch.device) -> Iterator[list[int]]:
    """Count the device reads inside the block: CUDA's synchronising calls, or on a CPU every host read of a tensor."""
    count = [0]
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield count
            count[0] += sum("synchroniz" in str(w.message) for w in caught)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return
    reals = {name: getattr(torch.Tensor, name) for name in TO_HOST}

    def counting(real: Any) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            return real(self, *args, **kwargs)
        return read

    try:
        for name, real in reals.items():
            setattr(torch.Tensor, name, counting(real))
        yield count
    finally:
        for name, real in reals.items():
            setattr(torch.Tensor, name, real)


class _Ops(TorchDispatchMode):
    """Counts the tensor operations that compute (views of a tensor aside) dispatched while ``active``."""

    def __init__(self, count: list[int]) -> None:
        super().__init__()
        self.active, self.count = True, count

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count[0] += self.active and not func.is_view
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counted_step_costs() -> Iterator[list[int]]:
    """Count inside the block ``[operations, copies]``: the tensor operations run outside the engine's packed
    forward (views aside; on a GPU each is a kernel launch), and the host-to-device copies
    (:func:`s2d2.transfer.to_device`, wherever it was imported). The caller may reset the counts between steps."""
    import s2d2.engine.engine as engine_module
    import s2d2.transfer

    count = [0, 0]
    ops = _Ops(count)  # counts into count[0]; the copy wrapper below into count[1]
    real_forward, real_copy = engine_module.forward_packed, s2d2.transfer.to_device

    def forward(*args: Any, **kwargs: Any) -> Any:
        ops.active = False
        try:
            return real_forward(*args, **kwargs)
        finally:
            ops.active = True

    def copy(*args: Any, **kwargs: Any) -> Any:
        count[1] += 1
        return real_copy(*args, **kwargs)

    patched = [m for name, m in sys.modules.items() if name.startswith("s2d2") and getattr(m, "to_device", None)
               is real_copy]
    engine_module.forward_packed = forward
    for module in patched:
        module.to_device = copy
    try:
        with ops:
            yield count
    finally:
        engine_module.forward_packed = real_forward
        for module in patched:
            module.to_device = real_copy


def check_reads(model: s2d2.Model, batch: list[list[int]], new_tokens: int) -> tuple[bool, str]:
    """Device reads per engine step, for each method at the batch's size: greedy rows, and a batch whose every other
    row samples (temperature 0.8, top-p 0.95, its own generator)."""
    worst: dict[str, int] = {}
    for (name, fields), mixed in itertools.product(METHODS.items(), (False, True)):
        engine = Engine(model.adapter, max_batch_size=len(batch))
        for i, ids in enumerate(batch):
            cfg = DecodeConfig(**fields, max_new_tokens=new_tokens, stop_token_ids=())
            sampled = mixed and i % 2 == 0
            engine.add(ids, cfg.replace(temperature=0.8, top_p=0.95) if sampled else cfg,
                       torch.Generator(model.device).manual_seed(i) if sampled else None)
        per_step = []
        while not engine.idle:
            with counted_reads(model.device) as count:
                engine.step()
            per_step.append(count[0])
        worst[name + (" (mixed)" if mixed else "")] = max(per_step)
    return all(v <= 1 for v in worst.values()), ", ".join(f"{k}: at most {v}" for k, v in worst.items())


def speed(model: s2d2.Model, batch_sizes: list[int], new_tokens: int, prompt_len: int, compiled: bool) -> list[str]:
    """Markdown rows: tokens/s per method and batch size (one warm-up batch first, then the timed one)."""
    rows = []
    for name, fields in METHODS.items():
        cfg = DecodeConfig(**fields, max_new_tokens=new_tokens, stop_token_ids=())
        cells = []
        for b in batch_sizes:
            batch = prompts(model, b, prompt_len, seed=b)
            model.generate(batch, cfg, batch_size=b)  # warm-up (allocator, kernels, compile at batch 1)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outs = model.generate(batch, cfg, batch_size=b)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            cells.append(f"{sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start):.0f}")
        rows.append(f"| {name}{' (compiled at batch 1)' if compiled else ''} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="the model's shape (default: 1.7b on a GPU, tiny on a CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="for the speed table (default: 1 16 64 on a GPU, 1 4 on a CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="per prompt (default 64 GPU, 16 CPU)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="also time the compiled batch-1 forward")
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    size = args.size or ("1.7b" if gpu else "tiny")
    batch_sizes = args.batch_sizes or ([1, 16, 64] if gpu else [1, 4])
    new_tokens = args.max_new_tokens or (64 if gpu else 16)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_model(Path(tmp) / f"sdar-{size}", "sdar", seed=0, **SIZES[size])
        model = s2d2.load(str(model_dir), device=args.device, dtype="float32")
        params = sum(p.numel() for p in model.adapter.model.parameters())
        print(f"# device check: SDAR-shaped random model '{size}' ({params / 1e6:.1f}M parameters), float32, "
              f"{args.device} ({torch.cuda.get_device_name() if gpu else 'CPU'}), torch {torch.__version__}\n")
        batch = prompts(model, 4, args.prompt_len, seed=0)
        results = {"logits": check_logits(model_dir, args.device, model, batch[0]),
                   "lossless": check_lossless(model, batch, new_tokens),
                   "one read per step": check_reads(model, batch, new_tokens)}
        print("| check | result | detail |\n|---|---|---|")
        for name, (ok, detail) in results.items():
            print(f"| {name} | {'pass' if ok else 'FAIL'} | {detail} |")
        print(f"\n| method (tokens/s, {new_tokens} new tokens, prompts of {args.prompt_len}) | "
              + " | ".join(f"batch {b}" for b in batch_sizes) + " |")
        print("|---|" + "---|" * len(batch_sizes))
        for row in speed(model, batch_sizes, new_tokens, args.prompt_len, compiled=False):
            print(row)
        if args.compile:
            compiled = s2d2.load(str(model_dir), device=args.device, dtype="float32", compile=True)
            print(f"(compile warm-up {compiled.warm_up():.1f} s)")
            for row in speed(compiled, [1], new_tokens, args.prompt_len, compiled=True):
                print(row)
    failed = [name for name, (ok, _) in results.items() if not ok]
    print(f"\ndevice check: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
