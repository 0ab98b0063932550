"""Where decoding stops: stop strings of several tokens across a block boundary, a stop string beside a stop
token (whichever comes first wins), and a context that ends exactly at the model's ``max_position_embeddings``."""

from __future__ import annotations

import random

import pytest

import s2d2
from s2d2 import DecodeConfig

PRINTABLE = list(range(ord("a"), ord("z") + 1))  # byte tokens that are one ASCII character each


def printable_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(PRINTABLE) for _ in range(length)]


def run(model: s2d2.Model, ids: list[int], **cfg) -> s2d2.Generation:
    cfg.setdefault("stop_token_ids", ())
    return model.generate(ids, DecodeConfig(**cfg))[0]


def straddling_stop(model: s2d2.Model, cfg: dict, length: int) -> tuple[list[int], s2d2.Generation, str, int]:
    """A prompt, its free generation, and a 3-token stop string whose first token ends a block and whose others
    open the next one, at the string's first occurrence; also the number of tokens up to its last token.

    Prompts are tried in a fixed order until one's (deterministic, greedy) generation has such a window of whole
    ASCII characters (the random model writes many lone non-ASCII bytes)."""
    b = cfg["block_size"]
    for seed in range(100):
        ids = printable_prompt(length, seed)
        free = run(model, ids, max_new_tokens=64, **cfg)
        tokens = free.token_ids
        for k in range(1, len(tokens) - 2):
            piece = tokens[k - 1:k + 2]
            if (length + k) % b or not all(32 < t < 127 for t in piece):
                continue  # token k must open a block; one ASCII character per token
            stop = model.decode(piece)
            end = next(j for j in range(1, len(tokens) + 1) if stop in model.decode(tokens[:j]))
            if end == k + 2:  # first occurrence is this one
                return ids, free, stop, end
    raise AssertionError("no prompt gave a printable 3-token window across a block boundary")


SETTINGS = [
    dict(method="dynamic", block_size=4, threshold=0.5),
    dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1),
    dict(method="s2d2", block_size=8),
]


@pytest.mark.parametrize("cfg", SETTINGS, ids=["dynamic", "s2d2-always", "s2d2-A"])
def test_a_multi_token_stop_string_across_a_block_boundary(model, cfg):
    ids, free, stop, end = straddling_stop(model, cfg, length=6)
    out = run(model, ids, max_new_tokens=64, stop=[stop], **cfg)
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:end]  # up to the token completing the string ...
    assert out.text == free.text[:free.text.find(stop)]  # ... and the text ends before it
    assert out.stats.num_tokens == end
    # decoding ended with the block holding the string's last token: every step before is the free run's
    b = cfg["block_size"]
    last_block_end = -(-(len(ids) + end) // b) * b
    assert out.stats.steps < free.stats.steps
    assert out.stats.fallback_tokens + out.stats.accepted_tokens + out.stats.corrected_tokens \
        == last_block_end - len(ids) // b * b - len(ids) % b


@pytest.mark.parametrize("stop_first", [True, False])
def test_a_stop_string_beside_a_stop_token_whichever_comes_first(model, stop_first):
    cfg = dict(method="s2d2", block_size=4)
    ids, free, stop, end = straddling_stop(model, cfg, length=5)
    if stop_first:  # a stop token after the string: the string ends decoding
        token = next(t for t in free.token_ids[end:] if t not in free.token_ids[:end])
        out = run(model, ids, max_new_tokens=64, stop=[stop], stop_token_ids=(token,), **cfg)
        assert out.token_ids == free.token_ids[:end] and out.text == free.text[:free.text.find(stop)]
    else:  # a stop token inside the text before the string: decoding stops there, the token excluded
        at = end - 3 - 1
        token = free.token_ids[at]
        at = free.token_ids.index(token)
        out = run(model, ids, max_new_tokens=64, stop=[stop], stop_token_ids=(token,), **cfg)
        assert out.token_ids == free.token_ids[:at] and out.text == model.decode(free.token_ids[:at])
        assert stop not in out.text
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("block_size", [4, 8])
def test_a_context_exactly_at_max_positions(model, block_size):
    limit = model.adapter.max_positions
    new = 2 * block_size
    ids = printable_prompt(limit - new - 1, seed=2)  # prompt + max_new_tokens, rounded up to blocks, == limit
    ar = run(model, ids, method="ar", max_new_tokens=new)
    sd = run(model, ids, method="s2d2", block_size=block_size, policy="mask_span_length", min_span=1,
             max_new_tokens=new)
    assert len(ar.token_ids) == new and sd.token_ids == ar.token_ids and ar.finish_reason == "length"
    with pytest.raises(s2d2.InputError, match=f"needs {limit + block_size} positions but the model's context is "
                                              f"{limit}"):
        run(model, ids + [97] * 2, method="s2d2", block_size=block_size, max_new_tokens=new)
