"""Batches in the memory there is (issue 30): the cache's bytes from the model's shape, ``batch_size="auto"``, an
explicit batch that cannot fit refused before anything is allocated, and ``dtype="auto"`` on a CPU by model size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import s2d2
import s2d2.engine.memory as memory
from s2d2.api import CPU_BF16_MIN_PARAMS, _resolve_dtype
from s2d2.cli import main
from s2d2.engine.engine import row_capacity
from s2d2.engine.memory import AUTO_LIMIT, MARGIN, kv_bytes_per_token, plan_batch, request_rows, row_bytes
from s2d2.errors import ConfigError
from s2d2.families import decoder_config_for

SHARED = Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
# SDAR-1.7B-Chat's config.json fields that shape the network (../shared/checkpoints/JetLM__SDAR-1.7B-Chat)
SDAR_1_7B = {"model_type": "sdar", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
             "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 32768, "tie_word_embeddings": False, "rope_theta": 1000000,
             "torch_dtype": "bfloat16"}
GIB = 2**30
CPU = torch.device("cpu")


def test_the_cache_of_sdar_1_7b_takes_112_kib_per_token_in_bf16() -> None:
    config = decoder_config_for(SDAR_1_7B)
    assert kv_bytes_per_token(config, torch.bfloat16) == 28 * 8 * 128 * 2 * 2 == 112 * 1024
    assert kv_bytes_per_token(config, torch.float32) == 224 * 1024
    # a row is its cache plus its largest forward's activations (its prefill: 2k rows of hidden states)
    per_row = row_bytes(config, torch.bfloat16, 2048, logit_rows=12, query_rows=2048)
    assert 2048 * 112 * 1024 < per_row < 2.5 * 2048 * 112 * 1024


def test_auto_takes_what_fits_up_to_the_device_limit() -> None:
    config = decoder_config_for(SDAR_1_7B)
    per_row = row_bytes(config, torch.bfloat16, 2048, 12, 2048)
    # this machine after loading the 1.7B model in bf16: 24 GiB - 3.8 GiB of weights - the rest of the process
    plan = plan_batch(config, torch.bfloat16, CPU, "auto", 100, 2048, 12, 2048, free=19 * GIB)
    assert plan.rows == int(19 * GIB * (1 - MARGIN)) // per_row >= 8  # the target: at least 8 at 2k
    assert plan.auto and plan.limited and plan.rows * per_row <= 19 * GIB
    assert plan.describe() == f"batch size auto: {plan.rows} rows of 440.3 MiB each ({plan.rows * per_row / GIB:.1f} " \
                              "GiB; 19.0 GiB free)"
    small = plan_batch(config, torch.bfloat16, CPU, "auto", 3, 2048, 12, 2048, free=19 * GIB)
    assert (small.rows, small.limited) == (3, False)  # never more rows than there are
    roomy = plan_batch(config, torch.bfloat16, CPU, "auto", 1000, 256, 12, 256, free=1000 * GIB)
    assert (roomy.rows, roomy.limited) == (AUTO_LIMIT["cpu"], False)
    gpu = plan_batch(config, torch.bfloat16, torch.device("cuda"), "auto", 1000, 256, 12, 256, free=1000 * GIB)
    assert gpu.rows == AUTO_LIMIT["cuda"]


def test_a_batch_that_cannot_fit_is_one_sentence() -> None:
    config = decoder_config_for(SDAR_1_7B)
    with pytest.raises(ConfigError, match=r"batch_size 64 needs .* GiB for 64 rows of 4096 tokens .* at most \d+\.$"):
        plan_batch(config, torch.bfloat16, CPU, 64, 64, 4096, 12, 4096, free=19 * GIB)
    assert plan_batch(config, torch.bfloat16, CPU, 64, 4, 4096, 12, 4096, free=19 * GIB).rows == 4  # 4 prompts
    with pytest.raises(ConfigError, match=r"one row of 32768 tokens needs .* GiB .* but only 1\.0 GiB is free"):
        plan_batch(config, torch.bfloat16, CPU, "auto", 1, 32768, 12, 32768, free=GIB)


def test_free_memory_is_what_the_host_has() -> None:
    free = memory.free_memory(CPU)
    total = memory.os.sysconf("SC_PHYS_PAGES") * memory.os.sysconf("SC_PAGE_SIZE")
    assert 0 < free <= total


def _row(model: s2d2.Model, prompts: list[str], max_new_tokens: int) -> int:
    """The bytes Model.generate counts per row for ``prompts``."""
    cfg = model.resolve_config(max_new_tokens=max_new_tokens)
    longest = max(len(model.encode(p)) for p in prompts)
    return row_bytes(model.adapter.model.config, model.dtype, row_capacity(model.adapter, longest, cfg),
                     *request_rows(longest, cfg.block_size))


def test_generate_refuses_a_batch_that_cannot_fit_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    model = s2d2.load("bundled")
    monkeypatch.setattr(memory, "free_memory", lambda device: int(2.5 * _row(model, ["1+1="], 8) / (1 - MARGIN)))

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was built")

    monkeypatch.setattr(s2d2.api, "Engine", no_engine)
    with pytest.raises(ConfigError, match=r"batch_size 8 needs .* MiB for 8 rows .* rows fit; use batch_size auto or at "
                                          r"most 2\.$"):
        model.generate(["1+1="] * 8, max_new_tokens=8, batch_size=8)
    with pytest.raises(ConfigError, match="batch_size 8 needs"):
        model.loglikelihoods([([5] * 20, [6])] * 8, batch_size=8)


def test_auto_decodes_what_fits_and_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    model = s2d2.load("bundled")
    prompts = ["12+7=", "3+4=", "8+8=", "20+1=", "5+9="]
    expected = model.generate(prompts, max_new_tokens=8, batch_size=1)
    monkeypatch.setattr(memory, "free_memory", lambda device: int(2.5 * _row(model, prompts, 8) / (1 - MARGIN)))
    outs = model.generate(prompts, max_new_tokens=8)  # batch_size "auto" by default: 2 rows fit
    assert model.last_batch_plan.rows == 2 and model.last_batch_plan.limited
    assert [o.token_ids for o in outs] == [o.token_ids for o in expected]  # batch == batch 1
    assert main(["generate", *prompts, "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "[s2d2] batch size auto: 2 rows of" in err and "memory bounds the batch" in err


def test_the_cli_takes_auto_or_a_number(capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "1+1=", "--max-new-tokens", "4", "--batch-size", "auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["text"] is not None
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "1+1=", "--batch-size", "many"])
    assert exit_.value.code == 2
    assert "'many' is neither a whole number nor auto" in capsys.readouterr().err
    assert main(["generate", "1+1=", "--batch-size", "0"]) != 0
    assert "batch_size must be an integer >= 1 or 'auto', got 0." in capsys.readouterr().err


@pytest.mark.parametrize("params, native, expected", [
    (CPU_BF16_MIN_PARAMS, True, torch.bfloat16),
    (CPU_BF16_MIN_PARAMS - 1, True, torch.float32),
    (CPU_BF16_MIN_PARAMS, False, torch.float32),
])
def test_auto_dtype_on_a_cpu_follows_the_model_size(monkeypatch: pytest.MonkeyPatch, params: int, native: bool,
                                                    expected: torch.dtype) -> None:
    monkeypatch.setattr(s2d2.api, "cpu_has_bf16", lambda: native)
    monkeypatch.setattr(s2d2.api, "_num_parameters", lambda config: params)
    assert _resolve_dtype("auto", SDAR_1_7B, CPU, Path("x")) == expected
    assert _resolve_dtype("float32", SDAR_1_7B, CPU, Path("x")) == torch.float32  # asked for: taken as asked
    assert _resolve_dtype("auto", SDAR_1_7B, torch.device("cuda"), Path("x")) == torch.bfloat16  # the checkpoint's


def test_the_parameter_count_is_the_model_s() -> None:
    assert s2d2.api._num_parameters(SDAR_1_7B) == 2_031_739_904  # SDAR-1.7B: untied head, 28 layers
    bundled = s2d2.load("bundled")
    assert s2d2.api._num_parameters(json.loads((Path(s2d2.api.bundled_model_dir()) / "config.json").read_text())) \
        == sum(p.numel() for p in bundled.adapter.model.parameters()) < CPU_BF16_MIN_PARAMS
    assert bundled.dtype == torch.float32  # the shipped model keeps float32 (and greedy S2D2 == AR exact)
