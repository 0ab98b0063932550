"""Reduced precision (bfloat16, float16): RMSNorm rounding, whole-model parity with transformers, greedy S2D2 vs AR.

The parity tests in test_model.py run in float32, where the order of RMSNorm's cast and weight multiply makes no
difference; here the same checks run in the precisions models are served in. Figures quoted below were measured
on CPU (torch 2.13, transformers 5.24) with the tiny random SDAR models of ``s2d2.training.random_init``; run with
``pytest -s`` to see the greedy comparison's report.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hf_reference import qwen3_config
from safetensors.torch import load_file

import s2d2
from s2d2 import DecodeConfig
from s2d2.checkpoint import read_config
from s2d2.models.decoder import _rms_norm
from s2d2.training.random_init import write_random_model

REDUCED = [torch.bfloat16, torch.float16]
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
SEQ_LEN = 64


# ------------------------------------------------------------------------------------------------- RMSNorm


def _alternative_order(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The order transformers does NOT use: scale in float32, then cast back once."""
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", REDUCED, ids=lambda d: DTYPE_NAMES[d])
def test_rms_norm_is_bit_identical_to_transformers(dtype: torch.dtype) -> None:
    """Our RMSNorm equals transformers' Qwen3RMSNorm bit for bit in reduced precision (normalise in float32, cast
    back, then multiply by the weight in the model dtype), and the check has power: scaling in float32 before the
    single cast back differs on about a quarter of the elements (23-28%, measured), though in float32 the two orders
    agree exactly, which is why the float32 parity tests cannot see it."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    gen = torch.Generator().manual_seed(0)
    for shape in [(7, 64), (1, 3, 4, 16), (2, 5, 128), (33, 1024)]:
        dim = shape[-1]
        x32 = 3.0 * torch.randn(shape, generator=gen)
        w32 = 1.0 + 0.5 * torch.randn(dim, generator=gen)  # far from 1, so the multiply rounds
        x, weight = x32.to(dtype), w32.to(dtype)
        reference = Qwen3RMSNorm(dim, eps=1e-6).to(dtype)
        with torch.no_grad():
            reference.weight.copy_(weight)
            theirs = reference(x)
        ours = _rms_norm(x, weight, 1e-6)
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs), (shape, (ours != theirs).float().mean().item())
        mismatch = (_alternative_order(x, weight, 1e-6) != theirs).float().mean().item()
        assert mismatch > 0.05, (shape, mismatch)  # the rounding-order mutation is visible on these inputs
        # ... and invisible in float32
        assert torch.equal(_alternative_order(x32, w32, 1e-6), _rms_norm(x32, w32, 1e-6)), shape


# ------------------------------------------------------------------------------ whole model vs transformers


@pytest.fixture(scope="module")
def hf_dir(random_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random SDAR checkpoint (seed 0) re-saved as a transformers Qwen3ForCausalLM directory.

    Reduced-precision transformers models are loaded with ``from_pretrained(dtype=...)``, as users do: that keeps
    the rotary ``inv_freq`` buffer in float32, whereas ``model.to(torch.bfloat16)`` would cast it too and give
    different cos/sin tables (and logits) from what transformers serves.
    """
    from transformers import Qwen3ForCausalLM

    cfg = read_config(random_model_dir)
    hf_config = qwen3_config(cfg)
    model = Qwen3ForCausalLM(hf_config).to(torch.float32)
    result = model.load_state_dict(load_file(str(random_model_dir / "model.safetensors")), strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    out = tmp_path_factory.mktemp("hf-qwen3")
    model.save_pretrained(out)
    return out


def _ids(n: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _masks(n: int = SEQ_LEN) -> dict[str, torch.Tensor]:
    pos = torch.arange(n)
    return {"causal": pos[:, None] >= pos[None, :], "block_causal": (pos[:, None] // 4) >= (pos[None, :] // 4)}


@torch.inference_mode()
def _ours(model_dir: Path, dtype: torch.dtype, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model = s2d2.load(str(model_dir), dtype=DTYPE_NAMES[dtype]).adapter.model
    assert model.embed.weight.dtype == dtype
    return model(ids, torch.arange(len(ids)), model.new_cache(len(ids)), mask)


@torch.inference_mode()
def _theirs(hf_path: Path, dtype: torch.dtype, attn: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(hf_path, dtype=dtype, attn_implementation=attn).eval()
    assert model.model.embed_tokens.weight.dtype == dtype
    if attn == "eager":
        # transformers 5's eager attention adds the mask to the scores, so it must be additive (a bool mask would
        # be added as 0/1), and in the model dtype: a float32 mask would promote the scores to float32.
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    out = model(input_ids=ids[None], position_ids=torch.arange(len(ids))[None], attention_mask=mask[None, None],
                use_cache=False)
    return out.logits[0].float()


@pytest.mark.parametrize("dtype", REDUCED, ids=lambda d: DTYPE_NAMES[d])
def test_reduced_precision_logits_bit_identical_to_transformers_sdpa(random_model_dir: Path, hf_dir: Path,
                                                                     dtype: torch.dtype) -> None:
    """Loaded in bfloat16 / float16, our model's logits equal transformers' Qwen3ForCausalLM (SDPA attention) bit
    for bit, on a causal and a block-causal mask over 64 tokens (measured: equal for 3 seeds, lengths 20/64/130).

    Every reduced-precision rounding step thus happens where and in the order transformers does it, so any change
    to one fails here. Checked by mutation (max |ours - transformers| in bfloat16 / float16): RMSNorm scaled in
    float32 before the cast back 0.16 / 0.021; attention softmax with exp and sum in bfloat16 0.13 / 0.018; RoPE
    angles computed in the model dtype 0.18 / 0.029; even a hand-written attention with a float32 softmax (which
    matches transformers' eager path exactly) 0.13 / 0.018. The fused q/k/v and gate/up projections are no
    obstacle: a GEMM's output columns round exactly as the split GEMMs' do."""
    ids = _ids()
    for name, mask in _masks().items():
        ours = _ours(random_model_dir, dtype, ids, mask)
        theirs = _theirs(hf_dir, dtype, "sdpa", ids, mask)
        assert ours.shape == theirs.shape == (SEQ_LEN, 264)
        diff = (ours - theirs).abs().max().item()
        assert torch.equal(ours, theirs), f"{name}: max |ours - transformers| = {diff:.4g} in {DTYPE_NAMES[dtype]}"
        # not vacuous: reduced precision does change the logits
        assert (ours - _ours(random_model_dir, torch.float32, ids, mask)).abs().max().item() > 1e-3


@pytest.mark.parametrize("dtype", REDUCED, ids=lambda d: DTYPE_NAMES[d])
def test_reduced_precision_error_is_transformers_sized(random_model_dir: Path, hf_dir: Path,
                                                       dtype: torch.dtype) -> None:
    """Tolerance parity, robust to attention-kernel differences: against transformers' eager attention (float32
    softmax, bf16 matmuls: not bit-identical to SDPA) and transformers' float32 logits as the reference.

    With M = max |reference logit| (6.7-6.9 here) and eps = finfo(dtype).eps (2**-7 bf16, 2**-10 fp16):
      * max |ours - fp32| <= 1.5 * max |eager - fp32| + eps * M
      * mean |ours - fp32| <= 1.25 * mean |eager - fp32|
      * max |ours - eager| <= 1.5 * max |eager - fp32| + eps * M  (the two reduced-precision implementations are
        no farther apart than either is from float32)
    Measured over 3 seeds x lengths 20/64/130 x 2 masks: max-error ratio <= 1.1 (bf16), <= 1.34 (fp16); mean
    ratio 0.94-1.06; max |ours - eager| / max |eager - fp32| <= 0.9 (bf16), <= 0.95 (fp16). On this test's input
    (max / mean error vs float32, causal; block-causal alike): bfloat16 ours 0.197 / 0.0254, eager 0.195 / 0.0261,
    max |ours - eager| 0.125; float16 ours 0.0236 / 0.0029, eager 0.0201 / 0.0030, max |ours - eager| 0.0176. The
    bounds sit at 0.5-0.65 of their limit here.

    These bounds are a coarse guard that stays valid if transformers' SDPA path changes; subtle rounding changes are
    left to the bit-exact tests above. Checked by mutation, they catch RoPE angles computed in the model dtype in
    float16 (max error 1.17x the bound, block-causal) but not in bfloat16 (0.69x); they do not catch the RMSNorm
    rounding-order mutation (it brings ours *closer* to float32: mean ratio 0.84-0.93) nor a softmax with exp and
    sum in bfloat16 (at most 0.89x the max bound, mean ratio 1.00-1.04)."""
    ids = _ids()
    for name, mask in _masks().items():
        reference = _theirs(hf_dir, torch.float32, "sdpa", ids, mask)
        ours = _ours(random_model_dir, dtype, ids, mask)
        eager = _theirs(hf_dir, dtype, "eager", ids, mask)
        floor = torch.finfo(dtype).eps * reference.abs().max().item()
        err_ours, err_eager = (ours - reference).abs(), (eager - reference).abs()
        between = (ours - eager).abs().max().item()
        report = (f"{name} {DTYPE_NAMES[dtype]}: max|ours-fp32| {err_ours.max().item():.4f}, max|eager-fp32| "
                  f"{err_eager.max().item():.4f}, mean {err_ours.mean().item():.5f} vs {err_eager.mean().item():.5f}, "
                  f"max|ours-eager| {between:.4f}, floor {floor:.4f}")
        assert err_eager.max().item() > 0, report  # the reference is a different precision
        assert err_ours.max().item() <= 1.5 * err_eager.max().item() + floor, report
        assert err_ours.mean().item() <= 1.25 * err_eager.mean().item(), report
        assert between <= 1.5 * err_eager.max().item() + floor, report


# ------------------------------------------------------------------------------------ greedy S2D2 == AR

ALWAYS_VERIFY = dict(method="s2d2", policy="mask_span_length", min_span=1, cache_ver=True, temperature=0.0)
NUM_NEW = 40
PROMPT_LENGTHS = (1, 3, 5, 10, 17)
BLOCK_SIZES = (4, 8)
# A divergence counts as explained when, in the AR-mode logits recomputed at its first differing position, both the
# AR token and S2D2's token lie within TIE_ULPS * eps * M of the top logit (so the top-2 gap does too), where
# M = max |finite logit| of that row and eps = finfo(dtype).eps (2**-7 bfloat16, 2**-10 float16): eps * M is
# between one and two ulps of the largest logit. Derivation, bfloat16 on these models: the same conditional computed
# by a 2L verify row, by the AR decode or by an explicit causal forward is off from float32 by 0.07 (the row's
# largest logit error, typical) to 0.16-0.22 (worst row); a verify row and an explicit forward differ from each
# other by at most 0.07, about 1.3 units at M ~ 5.5. A preference between two tokens can thus move by a few
# units; 4 leaves margin. Measured first
# divergences: gap at most 1.04 units (bfloat16, 31 distinct first divergences over 120 runs) and 0.93 units
# (float16, 4); the median top-2 gap over all positions is 5-10 units, so the tokens a real bug picks fall far
# outside the tolerance. Checked by mutation: a verify mask that lets a span row see its own draft, or acceptance
# of any draft within 0.2 of the verifier's top logit, fails both precisions on unexplained divergences; within
# 0.1 (about 3 bfloat16 units) bfloat16 fails on the divergence count and float16 on a gap; within 0.05 bfloat16
# cannot tell it from rounding (float16 still fails) -- the float32 test fails on all of them.
TIE_ULPS = 4.0


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(length)]  # byte tokens; no special ids


def _prompts() -> list[tuple[int, list[int]]]:
    """(model index, prompt) pairs: each of the three random models with each prompt length."""
    return [(index, _prompt(length, seed=100 * index + length)) for index in range(3) for length in PROMPT_LENGTHS]


def _generate(model: s2d2.Model, ids: list[int], **cfg) -> s2d2.Generation:
    config = DecodeConfig(stop_token_ids=(), generation_config="none", max_new_tokens=NUM_NEW, **cfg)
    return model.generate(ids, config)[0]


@torch.inference_mode()
def _ar_logits(model: s2d2.Model, prefix: list[int]) -> torch.Tensor:
    """The AR-mode conditional of the position after ``prefix``: a causal forward over prefix + one mask query,
    which is what a 2L verify row sees (the tokens before it and itself); banned ids at -inf, as in decoding."""
    adapter = model.adapter
    tokens = prefix + [adapter.mask_id]
    n = len(tokens)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    logits = adapter.model(torch.tensor(tokens), torch.arange(n), adapter.new_cache(n), mask)
    return logits[-1].index_fill_(-1, adapter.banned_ids, float("-inf"))


@pytest.fixture(scope="module")
def random_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Seeds 0, 1, 2: the same files, hence weights, as the ``random_models`` fixture's."""
    return [write_random_model(tmp_path_factory.mktemp(f"precision-seed{seed}"), seed=seed) for seed in range(3)]


def test_greedy_s2d2_equals_ar_in_float32(random_models) -> None:
    """The contrast for the test below, on its prompts: in float32 every run matches AR token for token."""
    assert all(m.adapter.model.embed.weight.dtype == torch.float32 for m in random_models)
    for index, ids in _prompts():
        ar = _generate(random_models[index], ids, method="ar")
        assert len(ar.token_ids) == NUM_NEW
        for block_size in BLOCK_SIZES:
            sd = _generate(random_models[index], ids, block_size=block_size, **ALWAYS_VERIFY)
            assert sd.token_ids == ar.token_ids, (index, ids, block_size)


@pytest.mark.parametrize("dtype", REDUCED, ids=lambda d: DTYPE_NAMES[d])
def test_greedy_s2d2_vs_ar_differs_only_at_near_ties(random_models, random_dirs, dtype: torch.dtype) -> None:
    """In bfloat16 / float16, greedy S2D2 verifying every step may return other tokens than greedy AR; each such
    run must part from AR at a near-tie of the AR-mode logits (both tokens within TIE_ULPS of the top there).

    The AR decode (one row per forward, K/V from earlier forwards) and the 2L verify forward compute the same
    conditionals through different shapes, so they round differently; where the top two logits are within an ulp
    or so the argmax can flip, and the sequences part ways. Measured on these 30 runs: 6 diverge in bfloat16
    (first-divergence gaps 0.016-0.047, about 0.3-1 unit), 2 in float16 (exact ties, gap 0); on a wider set of
    120 runs (prompts of 1-20 tokens), 43 (36%) in bfloat16 and 6 in float16. Which side float32 agrees with
    is split (18 AR, 13 S2D2 over the 31 distinct bfloat16 first divergences): neither path is the less accurate.
    """
    models = [s2d2.load(str(path), dtype=DTYPE_NAMES[dtype]) for path in random_dirs]
    assert all(m.adapter.model.embed.weight.dtype == dtype for m in models)
    eps = torch.finfo(dtype).eps
    compared, lines, failures = 0, [], []
    for index, ids in _prompts():
        model = models[index]
        ar = _generate(model, ids, method="ar")
        for block_size in BLOCK_SIZES:
            sd = _generate(model, ids, block_size=block_size, **ALWAYS_VERIFY)
            assert sd.stats.verify_forwards == sd.stats.steps > 0  # verified every step
            assert sd.stats.fallback_tokens == 0
            assert len(sd.token_ids) == len(ar.token_ids) == NUM_NEW
            compared += 1
            if sd.token_ids == ar.token_ids:
                continue
            first = next(i for i, (a, b) in enumerate(zip(ar.token_ids, sd.token_ids)) if a != b)
            assert ar.token_ids[:first] == sd.token_ids[:first]  # by construction: a common prefix
            prefix = ids + ar.token_ids[:first]
            logits = _ar_logits(model, prefix)
            scale = eps * logits[torch.isfinite(logits)].abs().max().item()
            top = logits.topk(2).values
            gap = (top[0] - top[1]).item()
            a, b = ar.token_ids[first], sd.token_ids[first]
            behind_a, behind_b = (top[0] - logits[a]).item(), (top[0] - logits[b]).item()
            logits32 = _ar_logits(random_models[index], prefix)
            line = (f"model {index} prompt of {len(ids)} B={block_size}: first divergence at token {first} "
                    f"(AR {a}, S2D2 {b}); top-2 gap {gap:.4f} = {gap / scale:.2f} units, AR token "
                    f"{behind_a / scale:.2f} and S2D2 token {behind_b / scale:.2f} units below the top "
                    f"(unit eps*M = {scale:.4f}, tolerance {TIE_ULPS:g} units); float32 logit(AR) - logit(S2D2) "
                    f"{(logits32[a] - logits32[b]).item():+.4f}")
            lines.append(line)
            if max(gap, behind_a, behind_b) > TIE_ULPS * scale:
                failures.append(line)
    summary = (f"greedy S2D2 vs AR in {DTYPE_NAMES[dtype]}: {compared} runs compared (3 models x "
               f"{len(PROMPT_LENGTHS)} prompts x block sizes {BLOCK_SIZES}, {NUM_NEW} tokens each), {len(lines)} "
               f"diverged" + "".join("\n  " + line for line in lines))
    print("\n" + summary)
    assert compared == 3 * len(PROMPT_LENGTHS) * len(BLOCK_SIZES), summary
    assert not failures, "divergences not explained by a near-tie:\n" + "\n".join(failures) + "\n" + summary
    # near-ties are rare: a bug that flips many near-ties (rather than picking far-off tokens) still shows here
    assert len(lines) <= compared // 2, summary
