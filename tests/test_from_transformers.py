"""``s2d2.from_transformers``: S2D2 on a model a user already loaded with transformers (issue 31, first step).

The s2d2 model must decode exactly as ``s2d2.load`` of the same directory (token for token, forward for forward, for
every method), share the transformers model's tensors (no copy: same storage, no growth of resident memory by the
model's size, and a change to the transformers weights is seen), and refuse what it cannot use in one sentence.
Models: tiny ``init-random`` checkpoints loaded with transformers' own Qwen3 class (SDAR's layout, ``model_type``
qwen3); for Fast-dLLM v2 and Dream, its Qwen2 class under a config class named as the published remote code names
it; for LLaDA and LLaDA2, a module with the published classes' parameter names (their checkpoints' names).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import s2d2
import s2d2.hf
from s2d2 import DecodeConfig, ModelLoadError
from s2d2.training.random_init import write_random_model

transformers = pytest.importorskip("transformers")

METHODS = {
    "ar": dict(method="ar"),
    "static": dict(method="static", block_size=4, steps=2),
    "dynamic": dict(method="dynamic", block_size=8, threshold=0.5),
    "s2d2": dict(method="s2d2", block_size=8),
    "s2d2-prefix": dict(method="s2d2", block_size=8, prefix_cache=True),
}
PROMPTS = ["hello world", "12+30=", "The cat sat on the"]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("qwen3"), seed=4, model_type="qwen3")


@pytest.fixture(scope="module")
def loaded(qwen3_dir: Path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(qwen3_dir))
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen3_dir))
    return hf, tok


def _same(a: list[s2d2.Generation], b: list[s2d2.Generation]) -> None:
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.stats.nfe for g in a] == [g.stats.nfe for g in b]


@pytest.mark.parametrize("name", list(METHODS))
def test_it_decodes_as_s2d2_load_does(loaded, qwen3_dir, name):
    hf, tok = loaded
    ours, reference = s2d2.from_transformers(hf, tok), s2d2.load(str(qwen3_dir))
    cfg = DecodeConfig(**METHODS[name], max_new_tokens=24, stop_token_ids=())
    _same(ours.generate(PROMPTS, cfg), reference.generate(PROMPTS, cfg))
    _same(ours.generate(PROMPTS, cfg, batch_size=1), reference.generate(PROMPTS, cfg, batch_size=1))


def test_greedy_s2d2_verifying_every_step_is_ar(loaded):
    ours = s2d2.from_transformers(*loaded)
    ar = ours.generate(PROMPTS, method="ar", max_new_tokens=24, stop_token_ids=())
    every = ours.generate(PROMPTS, method="s2d2", block_size=4, policy="mask_span_length", min_span=1,
                          max_new_tokens=24, stop_token_ids=())
    assert [g.token_ids for g in every] == [g.token_ids for g in ar]


def test_the_weights_are_shared_not_copied(loaded):
    hf, tok = loaded
    ours = s2d2.from_transformers(hf, tok)
    theirs = {p.data_ptr() for p in hf.parameters()}
    assert all(p.data_ptr() in theirs for p in ours.adapter.model.parameters())
    assert ours.dtype == hf.dtype and ours.device == hf.device
    # the tokenizer is the transformers tokenizer's own backend: the same ids
    assert ours.encode("12+30= hello <|im_end|>") == tok.encode("12+30= hello <|im_end|>", add_special_tokens=False)
    before = ours.generate("hello", method="ar", max_new_tokens=8, stop_token_ids=())[0].token_ids
    with torch.no_grad():  # a change to the transformers model is a change to the s2d2 model: one set of weights
        hf.get_output_embeddings().weight.mul_(-1)
    try:
        after = ours.generate("hello", method="ar", max_new_tokens=8, stop_token_ids=())[0].token_ids
    finally:
        with torch.no_grad():
            hf.get_output_embeddings().weight.mul_(-1)
    assert after != before


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_resident_memory_does_not_grow_by_the_model(tmp_path):
    path = write_random_model(tmp_path, seed=1, model_type="qwen3", hidden_size=512, intermediate_size=1536,
                              num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                              vocab_size=8192)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    size = sum(p.numel() * p.element_size() for p in hf.parameters())
    s2d2.from_transformers(hf)  # warm: imports and one-time allocations
    before = _rss()
    ours = s2d2.from_transformers(hf)  # the tokenizer read from the model's directory (name_or_path)
    assert _rss() - before < 0.1 * size, f"{(_rss() - before) / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    assert ours.generate("1+1=", max_new_tokens=4)[0].stats.num_tokens == 4


def test_tied_embeddings_are_shared_too(tmp_path):
    path = write_random_model(tmp_path, seed=2, model_type="qwen3", tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    ours = s2d2.from_transformers(hf)
    assert ours.adapter.model.lm_head is None
    cfg = DecodeConfig(method="s2d2", block_size=4, max_new_tokens=16, stop_token_ids=())
    _same(ours.generate(PROMPTS, cfg), s2d2.load(str(path)).generate(PROMPTS, cfg))


@pytest.mark.parametrize("family, model_type", [("fast_dllm_v2", "Fast_dLLM_Qwen"), ("d2f_dream", "Dream")])
def test_a_qwen2_layout_model_as_its_remote_code_loads_it(family_dir, family, model_type):
    """Fast-dLLM v2's and Dream's published code subclass Qwen2 under their own ``model_type``; the same here, with
    transformers' Qwen2 network and the checkpoint's own config.json fields (bd_size, the mask token)."""
    path = family_dir(family)

    class RemoteConfig(transformers.Qwen2Config):
        pass

    RemoteConfig.model_type = model_type
    config = RemoteConfig(**json.loads((path / "config.json").read_text()))
    hf = transformers.Qwen2ForCausalLM(config).eval()
    from s2d2.checkpoint import load_weights

    missing, unexpected = hf.load_state_dict(load_weights(path), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the checkpoint has no head of its own
    hf.tie_weights()
    hf.name_or_path = str(path)
    ours, reference = s2d2.from_transformers(hf), s2d2.load(str(path))
    assert ours.adapter.family == reference.adapter.family
    assert ours.adapter.default_block_size == reference.adapter.default_block_size
    for name in ("ar", "dynamic", "s2d2"):
        cfg = DecodeConfig(**{k: v for k, v in METHODS[name].items() if k != "block_size"}, max_new_tokens=16,
                           stop_token_ids=(), generation_config="none")
        _same(ours.generate(PROMPTS, cfg), reference.generate(PROMPTS, cfg))


def _one_sentence(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.endswith("."), message
    return message


def test_what_it_cannot_use_is_refused_in_one_sentence(loaded, family_dir):
    hf, tok = loaded
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' in model.config is not supported") as err:
        s2d2.from_transformers(gpt2, tok)
    _one_sentence(err)
    with pytest.raises(ModelLoadError, match="needs a transformers model object") as err:
        s2d2.from_transformers("JetLM/SDAR-1.7B-Chat")
    _one_sentence(err)
    with pytest.raises(ModelLoadError, match="without a fast backend") as err:
        s2d2.from_transformers(hf, object())
    _one_sentence(err)

    norm = hf.model.norm.weight
    try:
        hf.model.norm.weight = torch.nn.Parameter(norm.detach().to(torch.float16))
        with pytest.raises(ModelLoadError, match="float16, float32; s2d2 shares weights of one floating dtype") as err:
            s2d2.from_transformers(hf, tok)
        _one_sentence(err)
        hf.model.norm.weight = torch.nn.Parameter(torch.empty(norm.shape, device="meta"))
        with pytest.raises(ModelLoadError, match="spread over cpu, meta") as err:
            s2d2.from_transformers(hf, tok)
        _one_sentence(err)
    finally:
        hf.model.norm.weight = norm


class _PublishedLayout(torch.nn.Module):
    """A transformers model object as the published remote code of LLaDA (``LLaDAModelLM``) and LLaDA2
    (``LLaDA2MoeModelLM``) loads it, for what ``from_transformers`` reads of one: parameters under the published
    class's names (which are its checkpoint's names: ``from_pretrained`` loads them one to one, routed experts as
    separate modules), a config of its ``model_type``, its directory. The published code itself is never run here."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        from s2d2.checkpoint import load_weights

        fields = json.loads((directory / "config.json").read_text())
        self.config = type("RemoteConfig", (transformers.PretrainedConfig,), {"model_type": fields["model_type"]})(
            **fields)
        self.name_or_path = str(directory)
        for name, tensor in load_weights(directory).items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))


@pytest.mark.parametrize("family", ["d2f_llada", "llada2"])
def test_llada_and_llada2_in_their_published_layout_decode_as_s2d2_load(family_dir, family):
    """LLaDA (OLMo names, fused or separate projections as its checkpoint has them) and LLaDA2 (routed experts, one
    module each): every weight shared, and every method decodes as ``s2d2.load`` of the directory."""
    path = family_dir(family)
    hf = _PublishedLayout(path)
    ours, reference = s2d2.from_transformers(hf), s2d2.load(str(path))
    theirs = {p.data_ptr() for p in hf.parameters()}
    assert all(p.data_ptr() in theirs for p in ours.adapter.model.parameters())
    assert ours.adapter.family == reference.adapter.family
    for name in ("ar", "dynamic", "s2d2"):
        cfg = DecodeConfig(**{k: v for k, v in METHODS[name].items() if k != "block_size"}, max_new_tokens=16,
                           stop_token_ids=(), generation_config="none")
        _same(ours.generate(PROMPTS, cfg), reference.generate(PROMPTS, cfg))
        _same(ours.generate(PROMPTS, cfg, batch_size=1), reference.generate(PROMPTS, cfg, batch_size=1))
    from s2d2.models.moe import MoEMLP

    moes = [m for m in ours.adapter.model.modules() if isinstance(m, MoEMLP)]
    assert bool(moes) == (family == "llada2")
    assert all(m.gate_up is None and len(m.gate) == len(m.up) == len(m.down) == m.config.num_experts for m in moes)
    # what s2d2 writes back as checkpoint tensors are theirs, under their names
    state = ours.adapter.model.hf_state_dict()
    mine = dict(hf.named_parameters())
    assert set(state) == set(mine) and all(torch.equal(state[n], t) for n, t in mine.items())


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """README.md, "Using a model you loaded with transformers": its bash line, then its Python block, as written."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using a model you loaded with transformers", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).split("#")[0].split()
    first, second = re.findall(r"```python\n(.*?)\n```", section, re.S)
    code = first + "\n" + second + "\nassert __import__('torch').equal(ids, same), 'generate and s2d2.hf.generate'\n"
    assert command[:2] == ["s2d2", "init-random"]
    from s2d2.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(command[1:]) == 0
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ids, nfe = out.stdout.strip().rsplit(" ", 1)
    assert len(json.loads(ids)) == 16 and 1 <= int(nfe) <= 16


# --------------------------------------------------------------------------- through transformers' generate


@pytest.fixture(scope="module")
def left_padded(loaded):
    hf, tok = loaded
    tok.padding_side = "left"
    return tok(PROMPTS, return_tensors="pt", padding=True)


def _expected(ours: s2d2.Model, inputs, **fields) -> list[list[int]]:
    """Each row as transformers returns it: the padded input, the generated ids and the stop token that ended it."""
    outs = ours.generate(PROMPTS, DecodeConfig(generation_config="none", **fields))
    return [row + g.token_ids + ([g.stop_token_id] if g.stop_token_id is not None else [])
            for row, g in zip(inputs["input_ids"].tolist(), outs)]


def _strip(rows: list[list[int]], pad: int) -> list[list[int]]:
    out = []
    for row in rows:
        row = list(row)
        while row and row[-1] == pad:
            row.pop()
        out.append(row)
    return out


@pytest.mark.parametrize("fields", [dict(method="s2d2", block_size=8), dict(method="ar"),
                                    dict(method="dynamic", block_size=4, threshold=0.6)], ids=["s2d2", "ar", "dynamic"])
def test_model_generate_with_custom_generate_decodes_with_s2d2(loaded, left_padded, fields):
    hf, tok = loaded
    ours = s2d2.from_transformers(hf, tok)
    out = hf.generate(**left_padded, custom_generate=s2d2.hf.CUSTOM_GENERATE, trust_remote_code=True,
                      max_new_tokens=20, do_sample=False, **fields)
    assert out.shape[0] == len(PROMPTS) and torch.equal(out[:, :left_padded["input_ids"].shape[1]],
                                                       left_padded["input_ids"])
    pad = hf.generation_config.pad_token_id
    want = _expected(ours, left_padded, max_new_tokens=20, temperature=0.0, **fields)
    assert _strip(out.tolist(), pad) == _strip(want, pad)
    direct = s2d2.hf.generate(hf, **left_padded, max_new_tokens=20, do_sample=False, **fields)
    assert torch.equal(direct, out)


def test_generation_config_fields_map_onto_the_decode_config(loaded, left_padded):
    hf, tok = loaded
    n = left_padded["input_ids"].shape[1]
    free = s2d2.hf.generate(hf, **left_padded, max_new_tokens=16, do_sample=False, method="s2d2", block_size=4)
    stop = int(free[1, n + 5])  # row 1's sixth new token ends every row that generates it
    out = s2d2.hf.generate(hf, **left_padded, max_new_tokens=16, do_sample=False, method="s2d2", block_size=4,
                           eos_token_id=stop, pad_token_id=0)
    row, first = out[1, n:].tolist(), free[1, n:].tolist().index(stop)  # where it first generates the stop token
    assert row[:first + 1] == free[1, n:n + first + 1].tolist() and row[first] == stop  # ended by it, kept
    assert set(row[first + 1:]) <= {0}  # then padding
    # max_length counts the input; greedy S2D2 verifying every step is AR through generate too
    ar = s2d2.hf.generate(hf, **left_padded, max_length=n + 12, do_sample=False, method="ar")
    every = s2d2.hf.generate(hf, **left_padded, max_length=n + 12, do_sample=False, method="s2d2", block_size=4,
                             policy="mask_span_length", min_span=1)
    assert ar.shape[1] <= n + 12 and torch.equal(ar, every)
    # sampling follows do_sample / temperature / top_k / top_p, drawn from torch's global generator
    torch.manual_seed(3)
    a = s2d2.hf.generate(hf, **left_padded, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40)
    torch.manual_seed(3)
    b = s2d2.hf.generate(hf, **left_padded, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=40)
    greedy = s2d2.hf.generate(hf, **left_padded, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_what_generate_cannot_honour_is_one_sentence(loaded, left_padded):
    hf, _ = loaded
    for kwargs, message in [(dict(streamer=object()), "does not support streamer"),
                            (dict(return_dict_in_generate=True), "returns the sequences tensor only"),
                            (dict(frobnicate=1), "'frobnicate', which is neither"),
                            (dict(method="beam"), "method must be one of")]:
        with pytest.raises(s2d2.ConfigError, match=message) as err:
            s2d2.hf.generate(hf, **left_padded, max_new_tokens=4, **kwargs)
        _one_sentence(err)


# ------------------------------------------------------------------------------------- lm-eval as the authors run it


def _lm_eval_samples(model: str, model_args: str, out: Path, gen_kwargs: str | None = None) -> list[dict]:
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "s2d2.lm_eval", "--model", model, "--model_args", model_args, "--tasks",
           "s2d2_arith", "--limit", "4", "--device", "cpu", "--output_path", str(out), "--log_samples"]
    if gen_kwargs:
        cmd += ["--gen_kwargs", gen_kwargs]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (samples,) = out.rglob("samples_s2d2_arith_*.jsonl")
    return sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda d: d["doc_id"])


@pytest.mark.slow  # two lm-eval subprocesses
def test_lm_eval_hf_with_s2d2_plugged_in_equals_the_s2d2_model(qwen3_dir, tmp_path):
    """``lm_eval --model hf --gen_kwargs custom_generate=...,method=s2d2`` (transformers' model, s2d2's decoding
    through its generate) and ``--model s2d2`` with the same settings log the same responses; lm-eval's stop
    sequences reach s2d2 as stop strings (its stopping criteria)."""
    settings = "method=dynamic,block_size=8,threshold=0.1"  # many tokens per step: unlike AR's output
    plugged = _lm_eval_samples("hf", f"pretrained={qwen3_dir}", tmp_path / "hf",
                               f"custom_generate={s2d2.hf.CUSTOM_GENERATE},trust_remote_code=True,{settings}")
    ours = _lm_eval_samples("s2d2", f"pretrained={qwen3_dir},{settings}", tmp_path / "s2d2")
    plain = _lm_eval_samples("hf", f"pretrained={qwen3_dir}", tmp_path / "plain")  # transformers' own AR decoding
    assert [d["doc_id"] for d in plugged] == [d["doc_id"] for d in ours] == [0, 1, 2, 3]
    assert [d["resps"] for d in plugged] == [d["resps"] for d in ours]
    assert [d["resps"] for d in plain] != [d["resps"] for d in ours]  # the plugged route really decoded with s2d2


def test_lm_evals_stopping_criteria_become_stop_strings(loaded, left_padded):
    """lm-eval's ``MultiTokenEOSCriteria`` (one per ``until`` string) stop s2d2 where the string is generated."""
    hf, tok = loaded
    from lm_eval.models.utils_hf import stop_sequences_criteria

    n = left_padded["input_ids"].shape[1]
    free = s2d2.hf.generate(hf, **left_padded, max_new_tokens=16, do_sample=False, method="ar")
    text = tok.decode(free[1, n:].tolist(), skip_special_tokens=True)
    stop = text[3:5]  # two characters from the middle of row 1's output
    criteria = stop_sequences_criteria(tok, [stop], n, len(PROMPTS))
    out = s2d2.hf.generate(hf, **left_padded, max_new_tokens=16, do_sample=False, method="ar",
                           stopping_criteria=criteria)
    cut = tok.decode([t for t in out[1, n:].tolist() if t != hf.generation_config.pad_token_id],
                     skip_special_tokens=True)
    assert stop in cut and cut.index(stop) + len(stop) >= len(cut) - 2 and len(cut) < len(text)
    with pytest.raises(s2d2.ConfigError, match="stopping criteria that stop on a string"):
        s2d2.hf.generate(hf, **left_padded, max_new_tokens=4, stopping_criteria=[object()])


@pytest.mark.parametrize("file", [{"temperature": 0.7, "top_p": 0.9}, {"do_sample": True, "temperature": 0.6,
                                                                       "top_k": 20}, {}],
                         ids=["sampling-without-do_sample", "do_sample", "none"])
def test_sampling_defaults_are_read_as_s2d2_load_reads_them(tmp_path, file):
    """The loaded model's generation config gives the defaults its directory's generation_config.json gives
    ``s2d2.load`` (the serving convention: a temperature without do_sample counts)."""
    path = write_random_model(tmp_path, seed=6, model_type="qwen3")
    data = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**data, **file}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    assert s2d2.from_transformers(hf).generation_defaults == s2d2.load(str(path)).generation_defaults
