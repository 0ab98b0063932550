"""What the README, the docs and the bundled model's card quote is what the shipped model gives.

The quotes are found in the documents themselves, so a changed model, loop or example cannot leave them stale:
- a ``s2d2 generate`` line of a bash block with a trailing comment that opens with a quoted string
  (``s2d2 generate "..."   # " 5+7=12. #### 12" (NFE 9)``) is run through the CLI in process: it must print that
  text, and that NFE where one is given; ``s2d2 trace plot`` lines of the same block are run after it;
- a Python block with ``print(...)   # "..." ...`` comments is run (against a server started as the block's
  document's ``s2d2 serve`` line says) and must print those values, up to whitespace;
- every answer (a backticked string with ``####``) in the README's prose is one of the outputs checked above;
- the card's table of checked questions (AR and S2D2 both), its failure examples (AR), and its accuracy table
  against the record ``scripts/model_card_eval.py`` wrote.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import s2d2
from s2d2 import DecodeConfig
from s2d2.cli import build_parser, config_from_args, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CARD = ROOT / "src/s2d2/bundled/README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), CARD]


# ------------------------------------------------------------------------------------------------ reading the docs
def code_blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, text)`` of every fenced block of a Markdown file."""
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.M | re.S)


def prose(path: Path) -> str:
    """The text outside fenced blocks, lines joined (quotes may wrap)."""
    return " ".join(re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S).split())


@dataclass
class Quoted:
    """One ``s2d2`` command line of a bash block, with the output its comment quotes (None: run, not compared)."""

    where: str
    argv: list[str]
    text: str | None
    nfe: int | None


def shell_commands(path: Path) -> list[list[Quoted]]:
    """Per bash block that quotes an output: its ``s2d2 generate`` lines with quotes, and its ``s2d2 trace plot``
    lines. ``NAME="$(printf '...')"`` assignments are expanded where ``"$NAME"`` is used, as a shell would."""
    blocks = []
    for lang, text in code_blocks(path):
        if lang != "bash":
            continue
        variables: dict[str, str] = {}
        commands = []
        for line in text.replace("\\\n", " ").splitlines():
            line = re.sub(r"""\$\(printf '([^']*)'\)""", lambda m: m.group(1).replace("\\n", "\n"), line)
            if m := re.fullmatch(r'(\w+)="([^"]*)"', line.strip()):
                variables[m.group(1)] = m.group(2)
                continue
            for name, value in variables.items():
                line = line.replace(f'"${name}"', shlex.quote(value))
            code, _, comment = line.partition("  #")
            words = shlex.split(code) if code.startswith("s2d2 ") else []
            if words[:2] == ["s2d2", "generate"] and comment.strip().startswith('"'):
                said = shlex.split(comment.strip())[0]
                nfe = re.search(r"NFE (\d+)", comment)
                commands.append(Quoted(f"{path.name}: {code.strip()[:70]}", words[1:], said,
                                       int(nfe.group(1)) if nfe else None))
            elif words[:3] == ["s2d2", "trace", "plot"]:
                commands.append(Quoted(f"{path.name}: {code.strip()}", words[1:], None, None))
        if any(c.text is not None for c in commands):
            blocks.append(commands)
    return blocks


def python_quotes(path: Path) -> list[tuple[str, list[str]]]:
    """Python blocks that print what their comments quote: ``(code, [quoted values in order])``."""
    found = []
    for lang, text in code_blocks(path):
        quotes = [shlex.split(m.group(1)) for m in re.finditer(r"print\(.*?\)\s+#\s*(\".*)$", text, flags=re.M)]
        if lang == "python" and quotes:
            found.append((text, [q for qs in quotes for q in qs]))
    return found


def words(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------ the checks
@pytest.fixture(scope="module")
def bundled() -> s2d2.Model:
    return s2d2.load("bundled")


@pytest.fixture(scope="module")
def readme_outputs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Quoted, str, str]]:
    """Every quoted command of every document run once: ``(command, stdout, stderr)``."""
    results = []
    for path in DOCS:
        for block in shell_commands(path):
            folder = tmp_path_factory.mktemp("commands")
            for command in block:
                out, err = io.StringIO(), io.StringIO()
                here = os.getcwd()
                os.chdir(folder)  # files a command writes (--trace, -o) land in the block's own folder
                try:
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                        code = main(command.argv)
                finally:
                    os.chdir(here)
                assert code == 0, f"{command.where}: exit {code}: {err.getvalue()}"
                results.append((command, out.getvalue(), err.getvalue()))
    return results


def test_the_docs_quote_commands_and_the_harness_finds_them():
    commands = [c for path in DOCS for block in shell_commands(path) for c in block]
    assert sum(c.text is not None for c in commands) >= 3 and any(c.nfe is not None for c in commands)
    assert any(c.argv[:2] == ["trace", "plot"] for c in commands)
    assert python_quotes(README)


def test_every_quoted_command_prints_what_the_docs_say(readme_outputs):
    for command, out, err in readme_outputs:
        if command.text is None:
            continue
        assert out == command.text + "\n", f"{command.where}: prints {out!r}, the docs say {command.text!r}"
        if command.nfe is not None:
            assert f" NFE {command.nfe}" in err, f"{command.where}: {err.strip()}, the docs say NFE {command.nfe}"


def test_the_picture_commands_draw(readme_outputs):
    plots = [c for c, _, _ in readme_outputs if c.text is None]
    assert plots and all(p.argv[:2] == ["trace", "plot"] for p in plots)


def test_every_answer_the_readme_prose_quotes_was_printed(readme_outputs):
    printed = [words(out) for _, out, _ in readme_outputs] + [words(q) for _, qs in python_quotes(README) for q in qs]
    answers = re.findall(r"`([^`]*#### ?\d*[^`]*)`", prose(README))
    answers = [a for a in answers if re.search(r"\d", a.split("####")[0])]  # answers, not the format `#### n`
    assert answers
    for answer in answers:
        assert any(words(answer) in p for p in printed), f"the README quotes `{answer}`, which nothing checked prints"


def test_the_python_examples_print_what_their_comments_say(bundled, monkeypatch):
    from test_server import start_server, stop_server

    serve = next(line.partition("  #")[0] for _, text in code_blocks(README) for line in text.splitlines()
                 if line.startswith("s2d2 serve "))
    ns = build_parser().parse_args(shlex.split(serve)[1:])
    server = start_server(bundled, model_name=ns.served_model_name or ns.model, max_batch=ns.max_batch,
                          max_queue=ns.max_queue, timeout_s=ns.timeout, defaults=config_from_args(ns))
    try:
        for code, quoted in python_quotes(README):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(code.replace(f"http://127.0.0.1:{ns.port}", server.url), {})  # noqa: S102 (our own README)
            assert words(out.getvalue()) == words(" ".join(quoted)), code
    finally:
        stop_server(server)


# ------------------------------------------------------------------------------------------------ the model card
def card_section(title: str) -> str:
    text = CARD.read_text(encoding="utf-8")
    start = text.index(title)
    return text[start:text.index("\n## ", start)]


def test_the_cards_checked_questions_are_answered_so_by_ar_and_s2d2(bundled):
    rows = re.findall(r"^\| ([^|]+\?) \| `([^`]+)` \|$", card_section("## What it can and cannot answer"), flags=re.M)
    assert len(rows) >= 4
    prompts = [f"Q: {q}\nA:" for q, _ in rows]
    for cfg in (DecodeConfig(method="ar"), DecodeConfig(method="s2d2")):
        assert [o.text for o in bundled.generate(prompts, cfg)] == [a for _, a in rows], cfg.method
    example = re.search(r"```\n(Q: .*?)\n(A:.*?)\n```", CARD.read_text(encoding="utf-8")).groups()
    assert "A:" + bundled.generate(example[0] + "\nA:", DecodeConfig(method="ar"))[0].text == example[1]


def test_the_cards_failure_examples_are_what_ar_answers(bundled):
    text = " ".join(card_section("## What it can and cannot answer").split())
    shown = re.findall(r'"([^"]+[?.])" (?:gives )?` ?([^`]*####[^`]*)`', text)
    final = re.findall(r'"([^"]+[?.])" gives (\d+)\b', text)
    assert len(shown) >= 3 and final
    outs = bundled.generate([f"Q: {q}\nA:" for q, _ in shown + final], DecodeConfig(method="ar"))
    for (question, answer), out in zip(shown, outs):
        assert words(out.text) == words(answer), question
    for (question, number), out in zip(final, outs[len(shown):]):
        assert out.text.rsplit("####", 1)[-1].strip() == number, question


def test_the_cards_accuracy_table_is_the_recorded_run():
    """The card's table (scripts/model_card_eval.py --n 500, recorded in benchmarks/bundled-wordy/model_card.md):
    every accuracy, per-level accuracy and tokens per forward of every row and split is the record's."""
    record = (ROOT / "benchmarks/bundled-wordy/model_card.md").read_text(encoding="utf-8")
    recorded: dict[tuple[str, str], list[str]] = {}
    for split, body in re.findall(r"\*\*(\w+ \w+)\*\* \(500 problems\)\n\n(.*?)(?:\n\n|\n?\Z)", record, flags=re.S):
        for row in body.splitlines()[2:]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            recorded[(split, cells[0])] = [cells[1], cells[2].replace("%", "") + "%", cells[3]]
    table = card_section("## Accuracy and cost per decoding method")
    rows = [[c.strip() for c in r.strip("|").split("|")] for r in table.splitlines() if r.startswith("| ")][2:]
    assert len(rows) >= 15
    for cells in rows:
        name = cells[0]
        key = {k[1] for k in recorded if k[1] == name or k[1].startswith(name + " t=")}
        assert len(key) == 1, name
        (full,) = key
        card = {"wordy test": [cells[1], cells[2], cells[3]], "wordy generalisation": [cells[4], None, cells[5]],
                "arith test": [cells[6], None, cells[7]]}
        for split, (acc, by_level, tpf) in card.items():
            want = recorded[(split, full)]
            assert acc.strip("*") == want[0] and tpf == want[2], (name, split)
            if by_level is not None:
                assert by_level.replace("%", "").split(" / ") == want[1].replace("%", "").split(" / "), name


def test_the_recorded_ar_row_is_what_the_shipped_model_scores(bundled):
    """One row of the record re-run: AR on the first 500 arith test problems (batched, a few seconds; exact
    figures)."""
    from s2d2.evaluation.evaluate import evaluate

    record = (ROOT / "benchmarks/bundled-wordy/model_card.md").read_text(encoding="utf-8")
    body = record[record.index("**arith test** (500 problems)"):]
    cells = [c.strip() for c in re.search(r"^\| ar \|.*$", body, flags=re.M).group(0).strip("|").split("|")]
    result = evaluate(bundled, DecodeConfig(method="ar"), "arith", 500, "test")
    assert f"{result.accuracy:.1%}" == cells[1] and f"{result.stats.to_dict()['tokens_per_forward']:.2f}" == cells[3]


def test_no_help_text_shows_an_unexplained_none():
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001 (argparse has no API)
        assert "(default: None)" not in " ".join(sub.format_help().split()), name


def test_the_help_of_train_names_the_recipe():
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    assert "scripts/train_bundled.sh" in " ".join(train.format_help().split())


def test_make_run_asks_a_question_the_model_answers_as_the_makefile_says(bundled):
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    problem = re.search(r"^PROBLEM := (.*)$", makefile, flags=re.M).group(1).replace("\\n", "\n")
    answer = re.search(r"the answer is (\d+)", makefile).group(1)
    for method in ("ar", "s2d2"):  # `make run` decodes with the default method, S2D2
        assert bundled.generate(problem, DecodeConfig(method=method))[0].text.endswith(f"#### {answer}")
