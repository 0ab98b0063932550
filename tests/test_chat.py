"""Chat templates: rendering equals transformers' ``apply_chat_template``, template keyword arguments
(``enable_thinking``) from the API and the CLI, ``--chat`` end to end, and template errors as one sentence."""

from __future__ import annotations

import json
import shutil

import pytest

import s2d2
from s2d2.cli import main

# A Qwen3-style template written for this test: system turn, a namespace and a reversed loop, tool calls through
# tojson, a raise_exception, and the enable_thinking switch that SDAR's and Qwen3's published templates have.
TEMPLATE = """{%- if messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role not in ('system', 'user', 'assistant') %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}
{%- if m.role != 'system' or not loop.first %}<|im_start|>{{ m.role }}
{{ m.content }}{% if m.tool_calls %}{% for c in m.tool_calls %}
<tool_call>{{ c | tojson }}</tool_call>{% endfor %}{% endif %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>&</b>"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                         "tool_calls": [{"name": "f", "arguments": {"x": "<é>", "n": 1}}]},
     {"role": "user", "content": "c"}],
]


@pytest.fixture(scope="module")
def chat_dir(random_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "m"
    shutil.copytree(random_model_dir, out)
    (out / "chat_template.jinja").write_text(TEMPLATE)  # takes precedence over tokenizer_config.json's
    return out


@pytest.fixture(scope="module")
def chat_model(chat_dir) -> s2d2.Model:
    return s2d2.load(str(chat_dir))


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
def test_rendering_equals_transformers(chat_model, chat_dir, kwargs):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_file=str(chat_dir / "tokenizer.json"))
    reference.chat_template = TEMPLATE
    for messages in CONVERSATIONS:
        for add in (True, False):
            ours = chat_model.apply_chat_template(messages, add_generation_prompt=add, **kwargs)
            theirs = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, **kwargs)
            assert ours == theirs, (messages, add, kwargs)


def test_enable_thinking_reaches_the_template(chat_model):
    messages = CONVERSATIONS[0]
    off = chat_model.apply_chat_template(messages, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat_model.apply_chat_template(messages).endswith("<|im_start|>assistant\n")
    assert chat_model.apply_chat_template(messages, enable_thinking=True) == chat_model.apply_chat_template(messages)


def test_template_errors_are_one_sentence(chat_model):
    with pytest.raises(s2d2.InputError, match=r"cannot render these messages \(unknown role tool\)"):
        chat_model.apply_chat_template([{"role": "tool", "content": "x"}])


def _cli_json(capsys, *args) -> dict:
    assert main(["generate", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_chat_decodes_the_rendered_prompt(chat_model, chat_dir, capsys):
    base = ["What is 2+2?", "--model", str(chat_dir), "--chat", "--max-new-tokens", "8", "--json"]
    plain = _cli_json(capsys, *base)
    thinking_off = _cli_json(capsys, *base, "--chat-template-kwargs", '{"enable_thinking": false}')
    cfg = s2d2.DecodeConfig(max_new_tokens=8)
    for got, kwargs in ((plain, {}), (thinking_off, {"enable_thinking": False})):
        prompt = chat_model.apply_chat_template(CONVERSATIONS[0], **kwargs)
        expected = chat_model.generate(prompt, cfg)[0]
        assert got["token_ids"] == expected.token_ids
        assert got["stats"]["prompt_tokens"] == len(chat_model.encode(prompt))
    # "<think>\n\n</think>\n\n" is 19 more byte tokens in the random model's byte-level tokenizer
    assert thinking_off["stats"]["prompt_tokens"] == plain["stats"]["prompt_tokens"] + 19


@pytest.mark.parametrize("flags, message", [
    (["--chat", "--chat-template-kwargs", "{nope"], "--chat-template-kwargs is not valid JSON"),
    (["--chat", "--chat-template-kwargs", "[1]"], "--chat-template-kwargs must be a JSON object, not list."),
    (["--chat-template-kwargs", '{"enable_thinking": false}'], "--chat-template-kwargs needs --chat."),
    (["--chat", "--chat-template-kwargs", '{"messages": []}'], "cannot set 'messages'"),
])
def test_cli_chat_template_kwargs_errors(chat_dir, capsys, flags, message):
    assert main(["generate", "hi", "--model", str(chat_dir), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("s2d2: error: ") and message in err[0]


def test_bundled_chat_template_renders_the_task_format_as_transformers_does():
    """The bundled model's template (written by the training script) turns a question into the "Q: ...\\nA:" prompt
    the model was trained on, multi-turn and system messages included, exactly as transformers renders it."""
    from transformers import PreTrainedTokenizerFast

    from s2d2.api import bundled_model_dir
    from s2d2.evaluation.tasks import arith
    from s2d2.training.train import CHAT_TEMPLATE

    model = s2d2.load("bundled")
    assert model.chat_template == CHAT_TEMPLATE  # the committed file is what scripts/train_bundled.sh writes
    problem = arith.generate("test", 1, seed=0)[0]
    assert model.apply_chat_template([{"role": "user", "content": problem.question}]) == problem.prompt
    reference = PreTrainedTokenizerFast(tokenizer_file=str(bundled_model_dir() / "tokenizer.json"))
    reference.chat_template = CHAT_TEMPLATE
    turns = [{"role": "system", "content": "Solve."}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert model.apply_chat_template(turns) == reference.apply_chat_template(turns, tokenize=False) == \
        "Solve.\nQ: a\nA: b\nQ: c\nA:"
    with pytest.raises(s2d2.InputError, match="roles"):
        model.apply_chat_template([{"role": "tool", "content": "x"}])
