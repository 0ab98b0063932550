"""Tests for the synthetic GSM8K-style arithmetic task (s2d2.evaluation.tasks.arith)."""

from __future__ import annotations

import collections
import re
import time

import pytest

from s2d2.evaluation.tasks import arith
from s2d2.evaluation.tasks.arith import Problem, extract_answer, generate, is_correct, parse_step

_NUM = r"\d+"
_STEP = rf"{_NUM}[-+*/]{_NUM}={_NUM}"
_TARGET_RE = re.compile(rf"^ {_STEP}(?:\. {_STEP})*\. #### (-?{_NUM})$")
_PROMPT_RE = re.compile(r"^Q: [^\n]+\nA:$")


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return generate("train", 3000, seed=1)


def test_determinism() -> None:
    a = generate("train", 300, seed=7)
    b = generate("train", 300, seed=7)
    c = generate("train", 300, seed=8)
    assert a == b
    assert [p.key for p in a] != [p.key for p in c]
    assert len({p.key for p in a} & {p.key for p in c}) < 30
    # a shorter request is a prefix of a longer one
    assert generate("train", 100, seed=7) == a[:100]
    assert generate("test", 50, seed=3) == generate("test", 50, seed=3)


def test_splits_are_disjoint() -> None:
    keys = {s: [p.key for p in generate(s, n, seed=0)] for s, n in
            (("train", 2000), ("validation", 500), ("test", 500))}
    sets = {s: set(k) for s, k in keys.items()}
    for s, k in keys.items():
        assert len(k) == len(sets[s]), f"duplicate keys within {s}"
        assert all(arith.split_of(x) == s for x in k)
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    # different seeds never cross splits either
    assert not {p.key for p in generate("test", 300, seed=5)} & sets["train"]
    # identical questions imply identical keys, so no question text crosses splits
    q = {s: {p.question for p in generate(s, n, seed=0)} for s, n in (("train", 2000), ("test", 500))}
    assert not q["train"] & q["test"]


def test_steps_are_arithmetically_valid(problems: list[Problem]) -> None:
    problems = problems + generate("test", 500, seed=2) + generate("validation", 500, seed=3)
    for p in problems:
        assert len(p.steps) == p.level, p
        question_numbers = {int(x) for x in re.findall(r"\d+", p.question)}
        known = set(question_numbers)
        for i, step in enumerate(p.steps):
            a, op, b, c = parse_step(step)
            if op == "+":
                assert a + b == c and a <= 99 and b <= 99 and c <= 198, step
            elif op == "-":
                assert a - b == c and 0 <= b <= a <= 99, step
            elif op == "*":
                assert a * b == c and 2 <= a <= 12 and 2 <= b <= 12, step
            else:
                assert 2 <= b <= 12 and a % b == 0 and a // b == c and 1 <= c <= 12, step
            assert 0 <= c <= 999
            if i == 0:
                assert a in question_numbers and b in question_numbers, (step, p.question)
            # every operand is a number from the question or an earlier result
            assert a in known and b in known, (step, p)
            known.add(c)
        assert parse_step(p.steps[-1])[3] == p.answer
        assert isinstance(p.answer, int) and 0 <= p.answer <= 999


def test_formats(problems: list[Problem]) -> None:
    p0 = Problem(question="Tom has 23 apples. He buys 4 bags with 6 apples each. How many apples does he have now?",
                 steps=("4*6=24", "23+24=47"), answer=47, template="buy_groups", level=2)
    assert p0.prompt == ("Q: Tom has 23 apples. He buys 4 bags with 6 apples each. "
                         "How many apples does he have now?\nA:")
    assert p0.target == " 4*6=24. 23+24=47. #### 47"
    for p in problems:
        assert _PROMPT_RE.match(p.prompt), p.prompt
        m = _TARGET_RE.match(p.target)
        assert m, p.target
        assert int(m.group(1)) == p.answer
        assert p.target == " " + ". ".join(p.steps) + f". #### {p.answer}"
        assert "  " not in p.question and p.question == p.question.strip()
        assert not re.search(r"\b1 [a-z]+s\b", p.question), p.question  # no "1 apples"
        assert p.key.startswith(p.template + "|")


def test_extract_answer() -> None:
    assert extract_answer(" 4*6=24. 23+24=47. #### 47") == 47
    assert extract_answer("#### 47") == 47
    assert extract_answer("####47") == 47
    assert extract_answer("####   12 apples and more") == 12
    assert extract_answer("#### 47.") == 47
    assert extract_answer("#### -3") == -3
    assert extract_answer("#### 5 #### 9") == 9
    assert extract_answer("#### 5 ####") is None
    assert extract_answer("#### ") is None
    assert extract_answer("4*6=24. 23+24=47.") is None
    assert extract_answer("") is None
    assert extract_answer("### 47") is None


def test_is_correct(problems: list[Problem]) -> None:
    p = problems[0]
    assert is_correct(p, p.target)
    assert is_correct(p, p.target + " trailing")
    assert not is_correct(p, p.target.rsplit("####", 1)[0] + f"#### {p.answer + 1}")
    assert not is_correct(p, " ".join(p.steps))
    assert all(is_correct(q, q.target) for q in problems)


def test_level_balance(problems: list[Problem]) -> None:
    counts = collections.Counter(p.level for p in problems)
    assert set(counts) == {1, 2, 3}
    assert max(counts.values()) - min(counts.values()) <= 1
    only = generate("train", 400, seed=0, levels=(1, 3))
    counts = collections.Counter(p.level for p in only)
    assert set(counts) == {1, 3} and counts[1] == counts[3] == 200
    assert {p.level for p in generate("validation", 50, levels=(2,))} == {2}


def test_template_coverage(problems: list[Problem]) -> None:
    used = collections.Counter(p.template for p in problems)
    assert len(used) >= 12
    assert len(arith.TEMPLATES) >= 12
    assert len({t.name for t in arith.TEMPLATES}) == len(arith.TEMPLATES)
    for t in arith.TEMPLATES:
        assert used[t.name] > 0, t.name
    # every level has several templates, and each template's problems have its level
    by_name = {t.name: t.level for t in arith.TEMPLATES}
    assert all(p.level == by_name[p.template] for p in problems)
    assert {lvl: sum(1 for t in arith.TEMPLATES if t.level == lvl) >= 4 for lvl in (1, 2, 3)} == \
        {1: True, 2: True, 3: True}
    # the wording varies: more distinct question skeletons than templates
    skeletons = {re.sub(r"\d+", "N", p.question) for p in problems}
    assert len(skeletons) > 10 * len(arith.TEMPLATES)
    # the operations all occur
    ops = {parse_step(s)[1] for p in problems for s in p.steps}
    assert ops == {"+", "-", "*", "/"}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        generate("dev", 10)
    with pytest.raises(ValueError):
        generate("train", 10, levels=(4,))
    with pytest.raises(ValueError):
        generate("train", 10, levels=())
    with pytest.raises(ValueError):
        parse_step("4 * 6 = 24")
    assert generate("train", 0) == []


def test_corpus_text() -> None:
    text = arith.corpus_text(20, seed=0)
    assert text.count("####") == 20 and text.startswith("Q: ")


def test_generation_speed() -> None:
    t0 = time.perf_counter()
    out = generate("train", 20000, seed=11)
    assert len(out) == 20000
    assert time.perf_counter() - t0 < 5.0


def test_drills_follow_the_number_rules_and_the_answer_format() -> None:
    import random

    rng = random.Random(0)
    drills = [arith.drill(rng) for _ in range(2000)]
    ops = collections.Counter()
    for d in drills:
        (step,) = d.steps
        a, op, b, c = parse_step(step)
        ops[op] += 1
        assert d.question == f"What is {a}{op}{b}?" and d.answer == c and d.level == 0
        assert {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a // b}[op]() == c
        if op in "+-":
            assert 0 <= a <= arith.MAX_ADD_OPERAND and 0 <= b <= arith.MAX_ADD_OPERAND and c >= 0
        else:
            assert arith.MIN_FACTOR <= b <= arith.MAX_FACTOR
        assert is_correct(d, d.target) and d.target == f" {step}. #### {c}"
    assert set(ops) == {"+", "-", "*", "/"} and ops["+"] > ops["*"]  # carries and borrows get most drills
    assert arith.drill(random.Random(5)) == arith.drill(random.Random(5))
