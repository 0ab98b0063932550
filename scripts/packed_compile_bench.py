"""The engine's packed forward, eager against compiled (``--compile``: its token-wise parts), on the same batches.

Decodes ``--n`` test problems of the bundled model's task at each batch size with each method, eagerly, recording
every packed forward the engine runs (the batch and its cache); then replays those forwards with the eager and
the compiled token-wise kernels in ``--rounds`` shuffled rounds and prints the median milliseconds per forward and
their ratio, and the share of an eager replay's time spent in matrix multiplications (``aten::mm``, which compiling
leaves to the same kernels; torch.profiler). Only the forward is timed, so the engine's own host work does not
dilute the comparison.

    python scripts/packed_compile_bench.py --out benchmarks/compile/packed.md    # run alone on the CPU (~5 min)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

import s2d2
from s2d2.evaluation.tasks import wordy
from s2d2.models.decoder import EAGER_KERNELS, Decoder

METHODS = {"ar": dict(method="ar"), "dynamic B=8 t=0.9": dict(method="dynamic", block_size=8, threshold=0.9),
           "s2d2 config-A B=8": dict(method="s2d2", block_size=8)}


def record(model: s2d2.Model, prompts: list[str], cfg: s2d2.DecodeConfig, batch_size: int) -> list:
    """Every packed forward (batch, cache) the engine runs while decoding ``prompts``."""
    calls, forward = [], Decoder.forward_packed

    def recording(self: Decoder, batch, cache):  # noqa: ANN001
        calls.append((batch, cache))
        return forward(self, batch, cache)

    Decoder.forward_packed = recording  # type: ignore[method-assign]
    try:
        model.generate(prompts, cfg, batch_size=batch_size)
    finally:
        Decoder.forward_packed = forward  # type: ignore[method-assign]
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, compiled = s2d2.load("bundled"), s2d2.load("bundled", compile=True)
    warm_up = compiled.warm_up()
    decoder = model.adapter.model
    kernels = {"eager": EAGER_KERNELS, "compiled": compiled.adapter.model._kernels}
    prompts = [p.prompt for p in wordy.generate("test", args.n, seed=0)]
    lines = [f"# Packed forward, eager vs compiled token-wise parts: bundled, {args.n} wordy test problems, "
             f"{args.rounds} rounds, {torch.get_num_threads()} threads", "",
             f"Compile warm-up {warm_up:.1f} s.", "",
             "| batch | method | packed forwards | rows per forward (median) | eager ms / forward "
             "| compiled ms / forward | eager / compiled | eager time in aten::mm |",
             "|---|---|---|---|---|---|---|---|"]
    rng = random.Random(0)
    for batch_size in args.batch_sizes:
        for name, fields in METHODS.items():
            calls = record(model, prompts, s2d2.DecodeConfig(**fields), batch_size)

            def replay(mode: str) -> float:
                decoder._kernels = kernels[mode]
                t0 = time.perf_counter()
                with torch.inference_mode():
                    for batch, cache in calls:
                        decoder.forward_packed(batch, cache)
                return time.perf_counter() - t0

            for mode in kernels:  # warm both (and check the compiled kernels take every shape without failing)
                replay(mode)
            times: dict[str, list[float]] = {mode: [] for mode in kernels}
            for _ in range(args.rounds):
                for mode in rng.sample(list(kernels), len(kernels)):
                    times[mode].append(replay(mode))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                replay("eager")
            ops = prof.key_averages()
            mm_share = sum(e.self_cpu_time_total for e in ops if e.key == "aten::mm") / sum(
                e.self_cpu_time_total for e in ops)
            decoder._kernels = EAGER_KERNELS
            eager, comp = (statistics.median(times[m]) * 1000 / len(calls) for m in ("eager", "compiled"))
            rows = statistics.median(b.num_rows for b, _ in calls)
            lines.append(f"| {batch_size} | {name} | {len(calls)} | {rows:g} | {eager:.2f} | {comp:.2f} | "
                         f"{eager / comp:.3f}x | {mm_share:.0%} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
