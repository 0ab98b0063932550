"""Tests for the grammar-generated word problems with held-out productions (s2d2.evaluation.tasks.wordy)."""

from __future__ import annotations

import collections
import random
import re
import time

import pytest

from s2d2.evaluation.tasks import arith, wordy
from s2d2.evaluation.tasks.arith import Problem, extract_answer, parse_step
from s2d2.evaluation.tasks.wordy import HELD_OUT, LEVELS, SPLITS, WordyProblem, generate, split_of

_NUM = r"\d+"
_STEP = rf"{_NUM}[-+*/]{_NUM}={_NUM}"
_TARGET_RE = re.compile(rf"^ {_STEP}(?:\. {_STEP})*\. #### ({_NUM})$")
_PROMPT_RE = re.compile(r"^Q: [^\n]+\nA:$")
_NUMBER_RE = re.compile(r"\d+")

# One regular expression per held-out production, written independently of the generator: each must find its
# production in the text of every generalisation problem that recorded it, and none may match any other split.
_HELD_OUT_TEXT = {
    # a question with more text after it (every other placement ends with the question), or an imperative first
    "place.question_first": re.compile(r"\?\s+\S|^(Work out|Find out|Calculate|Figure out)\b"),
    "ask.embedded": re.compile(r"\b(work out|find out|calculate|figure out) how (many|much)\b", re.IGNORECASE),
    "frame.passive": re.compile(r"\b(is|was|being) (given|handed|sent|paid)\b"),
    "rel.operand": re.compile(r", who (?!is \d+ years old\b)"),
    "join.after_post": re.compile(r"\w after\b"),
    "join.before_pre": re.compile(r"(^|[.?] )Before\b(?! that\b)"),  # "Before that, ..." is join.before_that
}
# the only words of generalisation questions that training questions never contain, up to inflection: two lead
# verbs of the embedded imperative ("Calculate how many ...", "Figure out how many ...")
_NEW_WORDS = {"figure", "calculate"}


@pytest.fixture(scope="module")
def train() -> list[WordyProblem]:
    return generate("train", 4000, seed=1)


@pytest.fixture(scope="module")
def held_out_splits() -> dict[str, list[WordyProblem]]:
    return {s: generate(s, 1200, seed=2) for s in ("validation", "test", "generalisation")}


@pytest.fixture(scope="module")
def every_split(train: list[WordyProblem], held_out_splits: dict[str, list[WordyProblem]]) -> list[WordyProblem]:
    return train + [p for ps in held_out_splits.values() for p in ps]


def test_format_and_arithmetic(every_split: list[WordyProblem]) -> None:
    for p in every_split:
        assert isinstance(p, Problem)
        assert _PROMPT_RE.match(p.prompt), p.prompt
        m = _TARGET_RE.match(p.target)
        assert m, p.target
        assert p.target == " " + ". ".join(p.steps) + f". #### {p.answer}"
        assert int(m.group(1)) == p.answer == parse_step(p.steps[-1])[3]  # the answer is the last result
        assert len(p.steps) == p.level and p.level in LEVELS
        question_numbers = [int(x) for x in _NUMBER_RE.findall(p.question)]
        assert min(question_numbers) >= 2, p.question  # no "1 apples"
        known = set(question_numbers)
        operands = set()
        for i, step in enumerate(p.steps):
            a, op, b, c = parse_step(step)
            if op == "+":
                assert a + b == c and 0 <= a <= 99 and 0 <= b <= 99, step
            elif op == "-":
                assert a - b == c and 0 <= b <= a <= 99, step
            elif op == "*":
                assert a * b == c and 2 <= a <= 12 and 2 <= b <= 12, step
            else:
                assert 2 <= b <= 12 and a % b == 0 and a // b == c and 1 <= c <= 12, step
            assert 0 <= c <= arith.MAX_RESULT
            if i == 0:
                assert a in question_numbers and b in question_numbers, (step, p.question)
            assert a in known and b in known, (step, p)  # a number of the question or an earlier result
            if i + 1 < len(p.steps):  # every result but the last is used by a later step
                assert any(c in parse_step(s)[::2][:2] for s in p.steps[i + 1:]), p
            operands |= {a, b}
            known.add(c)
        # every number of the question is an operand or a distractor
        assert set(question_numbers) <= operands | set(p.distractors), p
        assert p.key.startswith(p.template + "|") and p.template.startswith("wordy:")


def test_text_is_clean(every_split: list[WordyProblem]) -> None:
    for p in every_split:
        q = p.question
        assert q == q.strip() and "  " not in q and "{" not in q and "}" not in q, q
        assert not re.search(r" [,.?]|,,|\.\.|[,.?][A-Za-z]", q), q
        assert q[-1] in "?.", q
        for sentence in re.split(r"(?<=[.?]) ", q):
            assert sentence[:1].isupper() or sentence[:1].isdigit(), (sentence, q)
        assert not re.search(r"\ban (?!hour)[b-df-hj-np-tv-z]", q) and not re.search(r"\ba [aeiou]", q), q
        # side characters have the other gender, so the protagonist's pronouns are never ambiguous
        male = p.entities[0] in wordy._MALES
        assert not re.search(r"\b(she|her|hers)\b" if male else r"\b(he|him|his)\b", q, re.IGNORECASE), q


def test_distractors_never_occur_in_the_target(every_split: list[WordyProblem]) -> None:
    with_distractors = [p for p in every_split if p.distractors]
    assert len(with_distractors) > 0.4 * len(every_split)
    for p in with_distractors:
        target_numbers = {int(x) for x in _NUMBER_RE.findall(p.target)}
        question_numbers = [int(x) for x in _NUMBER_RE.findall(p.question)]
        for d in p.distractors:
            assert d not in target_numbers, (d, p)
            assert d in question_numbers, (d, p)
    assert any(len(p.distractors) == 2 for p in with_distractors)


def test_determinism_and_prefixes() -> None:
    a = generate("train", 300, seed=7)
    assert a == generate("train", 300, seed=7)
    assert generate("train", 120, seed=7) == a[:120]
    b = generate("train", 300, seed=8)
    assert [p.key for p in a] != [p.key for p in b]
    assert len({p.key for p in a} & {p.key for p in b}) < 5
    assert generate("generalisation", 80, seed=3) == generate("generalisation", 80, seed=3)


def test_splits_are_disjoint(train: list[WordyProblem], held_out_splits: dict[str, list[WordyProblem]]) -> None:
    keys = {"train": [p.key for p in train], **{s: [p.key for p in ps] for s, ps in held_out_splits.items()}}
    assert set(keys) == set(SPLITS)
    for s, ks in keys.items():
        assert len(ks) == len(set(ks)), f"duplicate keys within {s}"
        assert all(split_of(k) == s for k in ks)
    for s1 in SPLITS:
        for s2 in SPLITS:
            if s1 < s2:
                assert not set(keys[s1]) & set(keys[s2]), (s1, s2)
    # other seeds do not cross splits either, and no question text is shared
    assert not {p.key for p in generate("test", 300, seed=5)} & set(keys["train"])
    questions = {s: {p.question for p in ps} for s, ps in held_out_splits.items()}
    questions["train"] = {p.question for p in train}
    assert not questions["train"] & (questions["test"] | questions["validation"] | questions["generalisation"])
    # same meaning, same target: the key fixes the solution
    by_key: dict[str, str] = {}
    for p in train + generate("train", 4000, seed=1)[:500]:
        assert by_key.setdefault(p.key, p.target) == p.target


def test_held_out_productions(train: list[WordyProblem], held_out_splits: dict[str, list[WordyProblem]]) -> None:
    assert set(HELD_OUT) == set(_HELD_OUT_TEXT)
    seen = train + held_out_splits["validation"] + held_out_splits["test"]
    for p in seen:
        assert p.productions, p
        assert not set(p.productions) & set(HELD_OUT), (p.productions, p.question)
        for name, rx in _HELD_OUT_TEXT.items():
            assert not rx.search(p.question), (name, p.question)
    gen = held_out_splits["generalisation"]
    used = collections.Counter()
    for p in gen:
        held = set(p.productions) & set(HELD_OUT)
        assert held, p  # every generalisation problem uses at least one held-out production
        used.update(held)
        for name in held:
            assert _HELD_OUT_TEXT[name].search(p.question), (name, p.question)
    # every held-out production is exercised, each in a fair share of the split
    assert set(used) == set(HELD_OUT), used
    assert min(used.values()) >= 0.04 * len(gen), used
    # held-out productions cover all levels and domains
    assert {p.level for p in gen} == set(LEVELS)
    assert {p.template.split(":")[1] for p in gen} == set(wordy.DOMAINS)
    # the productions that all splits share are many; training sees nearly all of the non-held-out ones
    train_prods = {x for p in train for x in p.productions}
    gen_prods = {x for p in gen for x in p.productions} - set(HELD_OUT)
    assert len(gen_prods - train_prods) <= 3, gen_prods - train_prods


def test_generalisation_adds_no_words_beyond_its_frames(held_out_splits: dict[str, list[WordyProblem]]) -> None:
    """The held-out frames are new constructions of known words (compared up to inflection)."""
    lemma = {form.split()[0]: verb[0].split()[0] for verb in wordy._V.values() for form in verb}

    def words(ps: list[WordyProblem]) -> set[str]:
        return {lemma.get(w, w) for p in ps for w in re.findall(r"[a-z']+", p.question.lower())}

    train_words = words(generate("train", 12000, seed=4))
    new = words(held_out_splits["generalisation"]) - train_words
    assert new <= _NEW_WORDS, new


def test_levels_are_balanced(train: list[WordyProblem]) -> None:
    counts = collections.Counter(p.level for p in train)
    assert set(counts) == {1, 2, 3, 4}
    assert max(counts.values()) - min(counts.values()) <= 1
    only = generate("validation", 200, seed=0, levels=(1, 4))
    counts = collections.Counter(p.level for p in only)
    assert set(counts) == {1, 4} and counts[1] == counts[4] == 100
    assert {p.level for p in generate("generalisation", 40, levels=(2,))} == {2}


def test_variety(train: list[WordyProblem]) -> None:
    sample = train[:2000]
    # domains, operations, shapes
    assert {p.template.split(":")[1] for p in sample} == set(wordy.DOMAINS)
    assert {parse_step(s)[1] for p in sample for s in p.steps} == {"+", "-", "*", "/"}
    assert len({p.template for p in sample}) > 150
    # many distinct productions, combinations of them, question forms and sentence frames
    productions = collections.Counter(x for p in sample for x in p.productions)
    assert len(productions) > 200
    assert len({x for x in productions if x.startswith("ask.")}) >= 25
    assert len({x for x in productions if x.startswith(("ev.", "start.", "final.", "rate.", "pk."))}) >= 120
    assert len({x for x in productions if x.startswith(("join.", "conn.", "place.", "if."))}) >= 12
    assert len({p.productions for p in sample}) > 0.95 * len(sample)
    names = set(wordy._MALES) | set(wordy._FEMALES)
    frames = {" ".join("NAME" if w in names else w for w in re.sub(r"\d+", "N", p.question).split())
              for p in sample}
    assert len(frames) > 0.97 * len(sample)
    # the same shape of computation is worded in many ways
    by_template = collections.defaultdict(list)
    for p in sample:
        by_template[p.template].append(p)
    for ps in by_template.values():
        if len(ps) >= 8:
            assert len({p.productions for p in ps}) >= 0.8 * len(ps), ps[0].template


def test_one_meaning_many_wordings() -> None:
    rng = random.Random(0)
    for level in LEVELS:
        m = wordy._draw_meaning(rng, level)
        wordings = [wordy._realise(m, random.Random(i), generalisation=False) for i in range(40)]
        questions = {q for q, _ in wordings}
        assert len(questions) >= 25, (level, questions)
        # the solution depends on the meaning only
        problems = {wordy._problem(m, q, prods).target for q, prods in wordings}
        assert problems == {arith._target(m.steps, m.answer)}


def test_is_correct(train: list[WordyProblem]) -> None:
    assert wordy.is_correct is arith.is_correct
    for p in train[:200]:
        assert arith.is_correct(p, p.target)
        assert arith.is_correct(p, p.target + " trailing")
        assert not arith.is_correct(p, p.target.rsplit("####", 1)[0] + f"#### {p.answer + 1}")
        assert extract_answer(p.target) == p.answer


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        generate("dev", 10)
    with pytest.raises(ValueError):
        generate("train", -1)
    with pytest.raises(ValueError):
        generate("train", 10, levels=(5,))
    with pytest.raises(ValueError):
        generate("train", 10, levels=())
    assert generate("generalisation", 0) == []


def test_generation_speed() -> None:
    t0 = time.perf_counter()
    assert len(generate("train", 10_000, seed=11)) == 10_000
    assert time.perf_counter() - t0 < 6.0


def test_trained_siblings_of_the_held_out_productions(held_out_splits):
    """Each held-out production but rel.operand has a trained construction needing the same reading skill; the
    siblings occur in train and are told as documented (question first only with the story in its if-clause,
    events against time order only as the story's last two clauses)."""
    train = wordy.generate("train", 3000, seed=5)
    by_name = collections.defaultdict(list)
    for p in train:
        for name in p.productions:
            by_name[name].append(p)
    for name in ("place.question_if", "ask.wants_to_know", "join.before_that", "join.but_first"):
        assert len(by_name[name]) >= 20, (name, len(by_name[name]))
    assert sum(len(v) for k, v in by_name.items() if k.startswith("ev.objects.") and k.endswith(".passive")) >= 10
    for p in by_name["place.question_if"]:
        last = re.split(r"(?<=[.?]) ", p.question)[-1]
        assert last.endswith(("?", ".")) and " if " in last, p.question
    for p in by_name["ask.wants_to_know"]:
        assert re.search(r"(wants to know|wanted to know|asks|asked|wonders|wondered|The question is) how "
                         r"(many|much|far)", p.question), p.question
    for p in by_name["join.before_that"] + by_name["join.but_first"]:
        # the reversed pair ends the story: only the question, facts or distractors may follow it
        tail = re.split(r"Before that, |, but first ", p.question)[1]
        assert not re.search(r"\b(Then|Later|Next|Afterwards|After that|Finally)\b", tail), p.question
