"""Profile the decoding loop: NFE per method, and the loop's own share of wall time (time outside model forwards).

Usage: python scripts/profile_loop.py [--model DIR] [--hidden 256 --layers 6] [--prompts 10] [--max-new-tokens 128]

Without --model it writes a random SDAR model (``s2d2 init-random`` with the given size) to a temporary
directory. The share is measured twice: by cProfile (cumulative time inside ``Decoder.forward`` against the
whole ``generate`` call) and by the loop's own timers (``DecodeStats.forward_time_s``), which are cheaper and
therefore less distorted by the profiler.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile

import s2d2
from s2d2.training.random_init import write_random_model

METHODS = {
    "ar": dict(method="ar"),
    "static B=4": dict(method="static", block_size=4),
    "dynamic B=4 t=0.3": dict(method="dynamic", block_size=4, threshold=0.3),
    "s2d2 always-verify B=4": dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1),
    "s2d2 default (score_threshold) B=4": dict(method="s2d2", block_size=4, threshold=0.3),
    "s2d2 ucb B=8": dict(method="s2d2", block_size=8, policy="contextual_bandit_ucb", threshold=0.3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    path = args.model
    if path is None:
        overrides = {}
        if args.hidden != 64 or args.layers != 2:
            overrides = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=3 * args.hidden,
                             num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
                             head_dim=64 if args.hidden >= 64 else args.hidden)
        path = str(write_random_model(tempfile.mkdtemp(), seed=0, **overrides))
    model = s2d2.load(path)
    prompts = [model.encode(f"Question {i}: what is {i} plus {2 * i}?") for i in range(args.prompts)]
    forward_code = type(model.adapter.model).forward.__code__
    print(f"model: {path}  prompts: {args.prompts}  max_new_tokens: {args.max_new_tokens}")
    print(f"{'method':38s} {'NFE/prompt':>10s} {'tok/fwd':>8s} {'tok/s':>8s} {'loop share (timers)':>20s} {'(cProfile)':>11s}")
    for name, extra in METHODS.items():
        cfg = s2d2.DecodeConfig(max_new_tokens=args.max_new_tokens, stop_token_ids=(), **extra)
        model.generate(prompts[:2], cfg)  # warm-up
        outs = model.generate(prompts, cfg)
        d = s2d2.DecodeStats.total([o.stats for o in outs]).to_dict()
        profiler = cProfile.Profile()
        profiler.enable()
        model.generate(prompts, cfg)
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        whole = max(v[3] for k, v in stats.items() if k[2] == "generate")
        inside = sum(v[3] for k, v in stats.items() if k[0] == forward_code.co_filename and k[2] == "forward")
        print(f"{name:38s} {d['nfe'] / args.prompts:10.1f} {d['tokens_per_forward']:8.2f} {d['tokens_per_s']:8.1f} "
              f"{d['loop_time_share']:20.1%} {1 - inside / whole:11.1%}")


if __name__ == "__main__":
    main()
