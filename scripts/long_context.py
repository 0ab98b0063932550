"""A server under a long request: one prompt of ``--long-tokens`` tokens beside ``--short`` short ones, all sent at
once to ``s2d2 serve --model MODEL``, with the server's resident memory (API and engine processes) sampled every
0.5 s. Reports each request's status and latency, the memory before and at its peak, and what the long request's
own K/V buffers take (its tokens x the cache's bytes per token). Run alone on the machine::

    python scripts/long_context.py --model /tmp/sdar-1.7b --long-tokens 16000 --short 15 \\
        --out benchmarks/sdar-1.7b-random/long_context.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).parent))
from loadtest import rss_mib, serving  # noqa: E402

from s2d2.checkpoint import load_tokenizer, read_config  # noqa: E402
from s2d2.engine.memory import kv_bytes_per_token  # noqa: E402
from s2d2.evaluation.tasks import arith  # noqa: E402
from s2d2.families import decoder_config_for  # noqa: E402


def long_prompt(model: str, tokens: int) -> str:
    """Text of about ``tokens`` tokens (arith questions one after another)."""
    tok = load_tokenizer(model)
    problems = arith.generate("test", 200, seed=1)
    text, k = "", 0
    while len(tok.encode(text).ids) < tokens:
        text += " ".join(p.prompt for p in problems[k % 200:k % 200 + 20]) + "\n"
        k += 20
    ids = tok.encode(text).ids[:tokens]
    return tok.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--long-tokens", type=int, default=16000)
    parser.add_argument("--short", type=int, default=15)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--method", default="s2d2")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    prompts = [long_prompt(args.model, args.long_tokens)] + [p.prompt for p in arith.generate("test", args.short,
                                                                                             seed=0)]
    with serving(args.model, args.method, max_batch=args.short + 1, max_queue=64,
                 extra=("--timeout", "3600")) as (proc, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
        before = rss_mib(proc.pid)
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                peak.append(rss_mib(proc.pid))

        def send(prompt: str) -> dict:
            t0 = time.perf_counter()
            try:
                out = client.completions.create(model="loadtest", prompt=prompt, max_tokens=args.max_tokens)
                return {"status": 200, "seconds": round(time.perf_counter() - t0, 1),
                        "prompt_tokens": out.usage.prompt_tokens, "completion_tokens": out.usage.completion_tokens}
            except openai.APIStatusError as e:
                return {"status": e.status_code, "error": str(e)[:300]}

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(send, prompts))
        done.set()
        sampler.join()
    config = read_config(args.model)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(str(config.get("torch_dtype")), torch.float32)
    report = {"model": Path(args.model).name, "method": args.method, "long_tokens": args.long_tokens,
              "short": args.short,
              "rss_before_mib": round(before), "rss_peak_mib": round(max(peak)),
              "long_kv_mib_estimate": round(args.long_tokens * kv_bytes_per_token(decoder_config_for(config), dtype)
                                            / 2**20),
              "answered": sum(r["status"] == 200 for r in results), "requests": len(results),
              "long": results[0], "short_seconds": [r.get("seconds") for r in results[1:]]}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps({**report, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
