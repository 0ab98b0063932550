"""Compiled forwards (``load(..., compile=True)``, ``--compile``): torch.compile's forward equals the eager one, every
method decodes the same tokens with it, and where compilation fails the model warns once and runs eager."""

from __future__ import annotations

import warnings

import pytest
import torch
from single_row import run_draft, run_verify

import s2d2
from s2d2 import DecodeConfig
from s2d2.cli import main
from s2d2.models.batching import ForwardSpec, pack
from s2d2.models.decoder import EAGER_KERNELS

pytestmark = pytest.mark.slow  # torch.compile

CONFIGS = [dict(method="ar"), dict(method="dynamic", block_size=8, threshold=0.3),
           dict(method="s2d2", block_size=8, policy="mask_span_length", min_span=1), dict(method="s2d2", block_size=4)]
PROMPTS = [[5, 17, 99, 3], list(range(40, 61)), [200]]


@pytest.fixture(scope="module")
def models(random_model_dir):
    from torch._dynamo.utils import counters

    eager, compiled = s2d2.load(str(random_model_dir)), s2d2.load(str(random_model_dir), compile=True)
    graphs = counters["stats"]["unique_graphs"]
    seconds = compiled.warm_up()
    assert compiled.adapter.model.compiled and seconds > 0
    # four for the single-row forward, one per packed token-wise kernel (not one per layer: the layers' modules
    # are arguments, guarded by shape); fewer when another model in this process compiled them already
    assert len(compiled.adapter.model.layers) > 1 and counters["stats"]["unique_graphs"] - graphs <= 6
    return eager, compiled


def test_compiled_and_eager_forwards_agree(models):
    eager, compiled = models
    adapter_e, adapter_c = eager.adapter, compiled.adapter
    ids = torch.tensor(PROMPTS[1] + [adapter_e.mask_id] * 8)
    caches = adapter_e.new_cache(64), adapter_c.new_cache(64)
    # a draft writing 16 pending rows (cache empty, then 16 cached), and a 2L verification with next-block rows
    for adapter, cache in zip((adapter_e, adapter_c), caches):
        run_draft(adapter, ids, cache, 16, 8, 5, cache_ver=True, draft_ver=True)
    for adapter, cache in zip((adapter_e, adapter_c), caches):
        assert cache.length == 16
    draft_e = run_draft(adapter_e, ids, caches[0], 16, 8, 5, cache_ver=True, draft_ver=True, cache_prefix=True)
    draft_c = run_draft(adapter_c, ids, caches[1], 16, 8, 5, cache_ver=True, draft_ver=True, cache_prefix=True)
    assert torch.allclose(draft_c, draft_e, atol=1e-4)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        assert torch.allclose(a[:, :21], b[:, :21], atol=1e-5)
    filled = PROMPTS[1][16:21] + [7, 8, 9]
    verify_e = run_verify(adapter_e, filled, caches[0], 16, 21, 8)
    verify_c = run_verify(adapter_c, filled, caches[1], 16, 21, 8)
    assert verify_c.shape == verify_e.shape == (3 + 8, adapter_e.vocab_size)
    assert torch.allclose(verify_c, verify_e, atol=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: " ".join(f"{k}={v}" for k, v in c.items()))
def test_every_method_decodes_the_same_tokens_compiled(models, cfg):
    eager, compiled = models
    config = DecodeConfig(**cfg, max_new_tokens=24, stop_token_ids=(), generation_config="none")
    want = eager.generate(PROMPTS, config, batch_size=1)
    got = compiled.generate(PROMPTS, config, batch_size=1)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.stats.nfe for o in got] == [o.stats.nfe for o in want]


def _packed_logits(model: s2d2.Model) -> torch.Tensor:
    """One packed forward of three rows of different kinds over a cache that already holds committed tokens: a
    prompt's prefill (21 rows, attention group of its own), a block draft of 8 masked rows and a one-row step."""
    adapter = model.adapter
    cache = adapter.new_batch_cache(3, 64)
    specs = []
    for slot, prompt in enumerate(PROMPTS):  # commit each prompt, one row at a time through the packed forward
        spec = ForwardSpec(list(prompt), range(len(prompt)), torch.ones(len(prompt), len(prompt), dtype=torch.bool)
                           .tril(), num_store=len(prompt), logits_from=len(prompt) - 1)
        adapter.model.forward_packed(pack([spec], [slot], [0], adapter.device), cache)
        cache.slot(slot).commit(len(prompt))
        specs.append(spec)
    lengths = [len(p) for p in PROMPTS]
    draft = [adapter.mask_id] * 8
    specs = [ForwardSpec(list(range(60, 81)), range(lengths[0], lengths[0] + 21),
                         torch.ones(21, 21, dtype=torch.bool).tril(), num_store=0, logits_from=0),
             ForwardSpec(draft, range(lengths[1], lengths[1] + 8), torch.ones(8, 8, dtype=torch.bool), num_store=0,
                         logits_from=0),
             ForwardSpec([9], [lengths[2]], torch.ones(1, 1, dtype=torch.bool),
                         num_store=0, logits_from=0)]
    batch = pack(specs, [0, 1, 2], lengths, adapter.device)
    assert len(batch.groups) > 1
    return adapter.model.forward_packed(batch, cache)


def test_the_packed_forward_compiled_agrees_and_decodes_the_same_tokens_without_recompiling(models):
    """``--compile`` covers the engine's packed forward (its token-wise parts, one graph each for every layer and
    row count): logits agree with eager, batched decoding gives eager's tokens and NFE, and after the warm-up no
    batch size, method or row count compiles a new graph (``torch._dynamo``'s own count)."""
    from torch._dynamo.utils import counters

    eager, compiled = models
    assert compiled.adapter.model._kernels is not EAGER_KERNELS
    assert torch.allclose(_packed_logits(compiled), _packed_logits(eager), atol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    prompts = PROMPTS + [[11, 12], list(range(100, 130)), [7] * 9]
    for cfg, batch_size in zip(CONFIGS, (2, 3, 4, 6)):
        config = DecodeConfig(**cfg, max_new_tokens=20, stop_token_ids=(), generation_config="none")
        want, got = eager.generate(prompts, config, batch_size=batch_size), compiled.generate(
            prompts, config, batch_size=batch_size)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.stats.nfe for o in got] == [o.stats.nfe for o in want]
    assert counters["stats"]["unique_graphs"] == graphs  # bounded: whatever decoding came, nothing recompiled


def test_a_failing_compiler_warns_once_and_runs_eager(random_model_dir, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = s2d2.load(str(random_model_dir), compile=True)
    eager = s2d2.load(str(random_model_dir))
    config = DecodeConfig(method="s2d2", block_size=4, max_new_tokens=12, stop_token_ids=(), generation_config="none")
    with pytest.warns(RuntimeWarning, match="torch.compile is not available here .*InvalidCxxCompiler"):
        got = model.generate(PROMPTS, config, batch_size=1)
    assert not model.adapter.model.compiled and model.adapter.model._kernels is EAGER_KERNELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later forwards (packed ones too) run eager without warning again
        again = model.generate(PROMPTS, config, batch_size=1)
        packed = model.generate(PROMPTS, config, batch_size=3)
    want = eager.generate(PROMPTS, config, batch_size=1)
    assert [o.token_ids for o in got] == [o.token_ids for o in again] == [o.token_ids for o in want]
    assert [o.token_ids for o in packed] == [o.token_ids for o in want]


def test_a_compiler_failing_first_in_the_packed_forward_warns_once(random_model_dir, monkeypatch):
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(fn.__name__)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = s2d2.load(str(random_model_dir), compile=True)
    config = DecodeConfig(method="s2d2", block_size=4, max_new_tokens=12, stop_token_ids=(), generation_config="none")
    with pytest.warns(RuntimeWarning, match="torch.compile is not available here") as caught:
        got = model.generate(PROMPTS, config, batch_size=3)
    assert len([w for w in caught if "torch.compile" in str(w.message)]) == 1
    assert calls == ["_attention_inputs"] and not model.adapter.model.compiled
    want = s2d2.load(str(random_model_dir)).generate(PROMPTS, config, batch_size=1)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_cli_reports_the_warm_up(random_model_dir, capsys):
    assert main(["generate", "ab", "--model", str(random_model_dir), "--max-new-tokens", "4", "--compile"]) == 0
    err = capsys.readouterr().err
    assert "[s2d2] compiling the forward (torch.compile, one-time warm-up) ..." in err
    assert "[s2d2] forward compiled, warm-up " in err
