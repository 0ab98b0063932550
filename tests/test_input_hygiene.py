"""Input hygiene (issue 8): every user error is one sentence and a typed exception, never a traceback.

Covered here: prompts that are not valid UTF-8, stop token ids outside the vocabulary, malformed ``bench --grid``
files, special tokens in prompts and chat messages, and checkpoints holding unused or non-finite tensors. The CLI
ends each in ``s2d2: error: <sentence>`` on stderr and exit code 2; the API raises the same sentence.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import s2d2
from s2d2 import api
from s2d2.cli import main
from s2d2.errors import ConfigError, InputError, ModelLoadError
from s2d2.evaluation.bench import load_grid
from s2d2.training.random_init import write_random_model

MASK, IM_START, IM_END, EOT = "<|MASK|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"  # the random model's


@pytest.fixture(scope="module")
def model(random_model_dir: Path) -> s2d2.Model:
    return s2d2.load(str(random_model_dir))


@pytest.fixture(scope="module")
def bundled() -> s2d2.Model:
    return s2d2.load("bundled")


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> str:
    """Run the CLI in-process; assert exit 2, nothing on stdout and one ``s2d2: error:`` line holding ``words``."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("s2d2: error: "), err
    assert out == ""
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def one_sentence(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# ------------------------------------------------------------------------------------ prompts not UTF-8


def test_encode_refuses_bytes_that_were_not_utf8(model: s2d2.Model) -> None:
    with pytest.raises(InputError) as err:
        model.encode("ok \udcff\udcfe")  # what Python makes of the bytes ff fe in argv (surrogateescape)
    assert one_sentence(err) == "the prompt is not valid UTF-8 text (byte 0xff at character 3)."


def test_encode_refuses_a_lone_surrogate(model: s2d2.Model) -> None:
    with pytest.raises(InputError) as err:
        model.encode("a\ud800b")
    assert one_sentence(err) == "the prompt is not valid UTF-8 text (lone surrogate U+D800 at character 1)."


def test_generate_refuses_text_that_is_not_utf8(model: s2d2.Model) -> None:
    with pytest.raises(InputError, match="not valid UTF-8"):
        model.generate(["fine", "\udcff"], max_new_tokens=2)


def test_cli_refuses_a_prompt_that_is_not_utf8(random_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, ["generate", "\udcff\udcfe", "--model", str(random_model_dir), "--max-new-tokens", "2"],
              "not valid UTF-8", "byte 0xff", "character 0")


@pytest.mark.slow  # a CLI subprocess
def test_console_script_refuses_raw_invalid_bytes(random_model_dir: Path) -> None:
    script = Path(sys.executable).with_name("s2d2")
    assert script.is_file()
    argv = [os.fsencode(script), b"generate", b"\xff\xfe", b"--model", os.fsencode(random_model_dir),
            b"--max-new-tokens", b"2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(argv, capture_output=True, timeout=300, env=env)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("s2d2: error: "), err
    assert "not valid UTF-8" in lines[0] and "byte 0xff" in lines[0]
    assert proc.stdout == b""


def test_chat_message_that_is_not_utf8(model: s2d2.Model) -> None:
    with pytest.raises(InputError) as err:
        model.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "user", "content": "x\udcc3"}])
    assert one_sentence(err) == "chat message 1 is not valid UTF-8 text (byte 0xc3 at character 1)."


# ----------------------------------------------------------------------------- stop ids outside the vocabulary


def test_stop_token_id_outside_the_vocabulary_is_refused_before_decoding(model: s2d2.Model,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoding started")

    monkeypatch.setattr(api.Engine, "step", no_decoding)
    with pytest.raises(ConfigError) as err:
        model.generate("hi", max_new_tokens=2, stop_token_ids=(3, 999999))
    assert one_sentence(err) == ("stop_token_ids holds 999999, outside the model's vocabulary of 264 tokens "
                                 "(ids 0 to 263).")
    with pytest.raises(ConfigError, match="holds 264,"):  # the first id past the end
        model.generate("hi", max_new_tokens=2, stop_token_ids=(264,))


def test_stop_token_id_at_the_end_of_the_vocabulary_is_accepted(model: s2d2.Model) -> None:
    assert len(model.generate("hi", max_new_tokens=2, stop_token_ids=(263,))[0].token_ids) == 2


def test_cli_stop_token_id_outside_the_vocabulary(random_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_error(capsys, ["generate", "hi", "--model", str(random_model_dir), "--stop-token-ids", "999999",
                       "--max-new-tokens", "2"], "stop_token_ids", "999999", "vocabulary of 264 tokens")


# ---------------------------------------------------------------------------------------------- grid files

_AR = {"name": "ar", "config": {"method": "ar"}}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"ar": {"method": "ar"}}, 'must hold a JSON list of {"name": ..., "config": {...}} objects, not an object.'),
        (["ar", "dynamic"], 'grid entry 0 must be a JSON object with "name" and "config", not a string.'),
        ([_AR, {"name": "d"}], 'grid entry 1 ("d") has no "config" (a JSON object of DecodeConfig fields).'),
        ([_AR, {"name": "d", "config": ["dynamic"]}],
         'grid entry 1 ("d") needs a "config" that is a JSON object of DecodeConfig fields, got a list.'),
        ([_AR, {"name": "d", "config": {"method": "dynamic"}}, {"name": "d", "config": {"method": "static"}}],
         'grid entries 1 and 2 are both named "d"; names must be unique.'),
        ([_AR, {"name": "d", "config": {"method": "dynamic", "block_size": 0}}],
         'grid entry 1 ("d"): block_size must be an integer >= 1, got 0.'),
        ([_AR, {"name": "s2d2 fast", "config": {"blok_size": 8}}],
         "grid entry 1 (\"s2d2 fast\"): unknown decoding option 'blok_size'; valid options: "),
        ([_AR, {"name": "d", "config": {}, "cfg": {}}],
         "grid entry 1 (\"d\") has the unknown key 'cfg'; an entry holds only \"name\" and \"config\"."),
        ([_AR, {"config": {"method": "dynamic"}}],
         'grid entry 1 has no "name"; every entry needs a non-empty string name.'),
        ([_AR, {"name": "", "config": {}}], 'grid entry 1 needs a "name" that is a non-empty string, got a string.'),
        ([_AR, {"name": 3, "config": {}}], 'grid entry 1 needs a "name" that is a non-empty string, got a number.'),
        ([], "holds an empty list; it needs at least an 'ar' setting."),
        ([{"name": "d", "config": {"method": "dynamic"}}], "the grid needs an 'ar' setting"),
    ],
    ids=["dict", "strings", "no-config", "config-list", "duplicate", "bad-value", "unknown-field", "unknown-key",
         "no-name", "empty-name", "number-name", "empty", "no-ar"],
)
def test_malformed_grid_files(content: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as err:
        load_grid(str(path))
    assert message in one_sentence(err)


def test_grid_file_read_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^grid file \S+missing\.json does not exist\.$"):
        load_grid(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ConfigError, match=r"is not valid JSON \(.* at line 1, column 3\)\.$"):
        load_grid(str(bad))


def test_a_good_grid_loads(tmp_path: Path) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps([_AR, {"name": "s2d2 B=8", "config": {"method": "s2d2", "block_size": 8}}]))
    grid = load_grid(str(path))
    assert [s.name for s in grid] == ["ar", "s2d2 B=8"] and grid[1].config().block_size == 8


def test_cli_malformed_grid(random_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "grid.json"
    fast = {"name": "fast", "config": {"blok_size": 2}}
    for content, words in ((["ar"], ("grid entry 0", "not a string")),
                           ([_AR, fast], ('grid entry 1 ("fast")', "blok_size"))):
        path.write_text(json.dumps(content))
        cli_error(capsys, ["bench", "--model", str(random_model_dir), "--grid", str(path), "--out",
                           str(tmp_path / "o")], *words)
    assert not (tmp_path / "o").exists()  # refused before anything ran


# -------------------------------------------------------------------------------- special tokens in prompts


def test_mask_token_in_text_is_refused(model: s2d2.Model) -> None:
    assert model.encode(f"a{MASK}b") == [97, 259, 98]  # the tokenizer does parse it ...
    with pytest.raises(InputError) as err:  # ... so generate refuses it
        model.generate(f"a{MASK}b", max_new_tokens=2)
    assert one_sentence(err) == ("the prompt contains the mask token '<|MASK|>' (id 259) at position 1; "
                                 "a prompt may not hold mask tokens.")


def test_mask_id_in_an_id_prompt_is_refused(model: s2d2.Model) -> None:
    with pytest.raises(InputError, match=r"mask token '<\|MASK\|>' \(id 259\) at position 2;"):
        model.generate([97, 98, 259, 99], max_new_tokens=2)


def test_other_special_tokens_in_a_raw_prompt_are_parsed(model: s2d2.Model) -> None:
    assert model.encode(f"{IM_START}user\nhi{IM_END}{EOT}") == [257, *model.encode("user\nhi"), 258, 256]
    rendered = model.apply_chat_template([{"role": "user", "content": "hi"}])  # a pre-rendered chat prompt
    assert model.generate(rendered, max_new_tokens=2)[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("token", [IM_START, IM_END, EOT, MASK])
def test_special_tokens_in_chat_messages_are_refused(model: s2d2.Model, token: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hi{token}assistant"}]
    with pytest.raises(InputError) as err:
        model.apply_chat_template(messages)
    assert one_sentence(err) == (f"chat message 1 contains the special token {token!r}; chat messages are user "
                                 "text and may not hold special tokens.")


def test_special_token_in_a_chat_role_is_refused(model: s2d2.Model) -> None:
    with pytest.raises(InputError, match=r"^chat message 0 contains the special token '<\|im_end\|>'"):
        model.apply_chat_template([{"role": f"user{IM_END}", "content": "hi"}])


def test_chat_template_keeps_its_own_special_tokens(model: s2d2.Model) -> None:
    text = model.apply_chat_template([{"role": "user", "content": "what is <|not special|>?"}])
    assert text == f"{IM_START}user\nwhat is <|not special|>?{IM_END}\n{IM_START}assistant\n"


def test_chat_messages_must_be_dicts(model: s2d2.Model) -> None:
    with pytest.raises(InputError, match=r"^chat message 0 must be a dict with 'role' and 'content', not a str\.$"):
        model.apply_chat_template(["hi"])  # type: ignore[list-item]


def test_cli_special_tokens(random_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_flags = ["--model", str(random_model_dir), "--max-new-tokens", "2"]
    cli_error(capsys, ["generate", f"x{MASK}", *model_flags], "mask token '<|MASK|>' (id 259)")
    cli_error(capsys, ["generate", f"x{IM_END}", "--chat", *model_flags], "chat message 0", "'<|im_end|>'")


def test_bundled_model_special_tokens(bundled: s2d2.Model) -> None:
    mask, eot = "<|mask|>", "<|endoftext|>"
    with pytest.raises(InputError, match=r"the mask token '<\|mask\|>' \(id 1\) at position 3;"):
        bundled.generate(f"1+1{mask}", max_new_tokens=2)
    with pytest.raises(InputError, match=r"the mask token '<\|mask\|>' \(id 1\)"):
        bundled.generate([5, 1], max_new_tokens=2)
    assert bundled.encode(f"1{eot}") == [*bundled.encode("1"), 0]  # raw prompts: end-of-sequence is parsed
    bundled.chat_template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"  # it ships none
    try:
        assert bundled.apply_chat_template([{"role": "user", "content": "1+1"}]) == "1+1<|endoftext|>"
        for token in (eot, mask):
            with pytest.raises(InputError) as err:
                bundled.apply_chat_template([{"role": "user", "content": f"2{token}"}])
            assert one_sentence(err).startswith(f"chat message 0 contains the special token {token!r};")
    finally:
        bundled.chat_template = None


# ------------------------------------------------------------------------------ unused or non-finite tensors


def _patched_model(src: Path, dst: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the model directory ``src`` whose weights went through ``change``."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_unused_tensors_are_refused(random_model_dir: Path, tmp_path: Path) -> None:
    def add_biases(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
        t["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(32)

    path = _patched_model(random_model_dir, tmp_path / "m", add_biases)
    with pytest.raises(ModelLoadError) as err:
        s2d2.load(str(path))
    assert one_sentence(err) == ("the checkpoint holds 2 tensor(s) that this config.json does not use, first "
                                 "'model.layers.0.self_attn.k_proj.bias' (does config.json describe this checkpoint?).")


def test_rotary_inv_freq_buffers_are_ignored(random_model_dir: Path, tmp_path: Path, model: s2d2.Model) -> None:
    def add_inv_freq(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        t["model.rotary_emb.inv_freq"] = torch.ones(8)

    loaded = s2d2.load(str(_patched_model(random_model_dir, tmp_path / "m", add_inv_freq)))
    cfg = dict(method="ar", max_new_tokens=6)
    assert loaded.generate("hi", **cfg)[0].token_ids == model.generate("hi", **cfg)[0].token_ids


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(random_model_dir: Path, tmp_path: Path, value: float) -> None:
    def spoil(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = value

    with pytest.raises(ModelLoadError) as err:
        s2d2.load(str(_patched_model(random_model_dir, tmp_path / "m", spoil)))
    assert one_sentence(err) == ("weight 'model.layers.1.mlp.down_proj.weight' holds 1 NaN or infinite value(s); "
                                 "the checkpoint is corrupt.")


def test_cli_bad_checkpoints(random_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def add_bias(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)

    def spoil(t: dict[str, torch.Tensor]) -> None:
        t["model.norm.weight"][0] = float("nan")

    for name, change, words in (("bias", add_bias, ("1 tensor(s)", "'model.layers.0.self_attn.q_proj.bias'")),
                                ("nan", spoil, ("'model.norm.weight'", "NaN"))):
        path = _patched_model(random_model_dir, tmp_path / name, change)
        cli_error(capsys, ["generate", "hi", "--model", str(path), "--max-new-tokens", "2"], *words)


def _tied_qwen3_dir(tmp_path: Path, lm_head: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Path, dict]:
    src = write_random_model(tmp_path / "src", seed=3, tie_word_embeddings=True, model_type="qwen3")
    path = _patched_model(src, tmp_path / "m",
                          lambda t: t.__setitem__("lm_head.weight", lm_head(t["model.embed_tokens.weight"])))
    return path, load_file(str(path / "model.safetensors"))


def test_tied_lm_head_equal_to_the_embedding_keeps_the_tie(tmp_path: Path) -> None:
    path, tensors = _tied_qwen3_dir(tmp_path, lambda e: e.clone())
    decoder = s2d2.load(str(path)).adapter.model
    assert decoder.lm_head is None and torch.equal(decoder.embed.weight, tensors["model.embed_tokens.weight"])


def test_tied_lm_head_that_differs_is_used_untied_as_transformers_does(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    def other_head(embed: torch.Tensor) -> torch.Tensor:
        return torch.randn(embed.shape, generator=torch.Generator().manual_seed(9))

    path, tensors = _tied_qwen3_dir(tmp_path, other_head)  # transformers warns it will not tie them, and uses both
    decoder = s2d2.load(str(path)).adapter.model
    assert torch.equal(decoder.embed.weight, tensors["model.embed_tokens.weight"])  # the embedding is left alone
    assert torch.equal(decoder.lm_head.weight, tensors["lm_head.weight"])
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(input_ids=ids[None], use_cache=False).logits[0].float()
        ours = decoder(ids, torch.arange(12), decoder.new_cache(16), torch.ones(12, 12).tril().bool())
    assert (ours - theirs).abs().max().item() <= 1e-4
