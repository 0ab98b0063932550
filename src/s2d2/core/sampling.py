"""From logits to token distributions and choices.

One transform is used for the drafter's p and the verifier's q, so that speculative acceptance with
``min(1, q/p)`` and the residual ``(q - p)+`` preserves the verifier's distribution (reference §8.4: p must be the
distribution the draft was actually sampled from). At temperature 0 the choice is the argmax, and the reported
distribution is the plain softmax (temperature 1, no top-k/top-p): that is the model's own confidence, which the
confidence threshold and the acceptance estimators read.
"""

from __future__ import annotations

import torch


def transform_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p filtering; filtered entries become -inf. ``logits``: ``[n, V]``."""
    if temperature > 0.0 and temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def token_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a token is drawn from (float32, ``[n, V]``); plain softmax when greedy."""
    if temperature == 0.0:
        return torch.softmax(logits.float(), dim=-1)
    return torch.softmax(transform_logits(logits.float(), temperature, top_k, top_p), dim=-1)


def choose_tokens(probs: torch.Tensor, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Argmax (greedy) or one multinomial draw per row; returns ``[n]`` int64."""
    if greedy:
        return probs.argmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def row_seed(seed: int, row: int, choice: int = 0) -> int:
    """The seed of prompt ``row``'s sampled choice ``choice`` under a request seeded with ``seed``.

    Prompt ``row`` (choice 0) draws from ``seed + row``, the documented batch contract (data-parallel shards shift
    the seed by their first row). Further choices of one prompt (the server's ``n``) get seeds scattered by a
    SplitMix64 step, so that choice 1 of seed 1 is not choice 0 of seed 2, as ``seed + k`` would make it. Every
    value wraps modulo 2**64, the generator's range."""
    base = (seed + row) % 2**64
    if choice == 0:
        return base
    z = (base + choice * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)
