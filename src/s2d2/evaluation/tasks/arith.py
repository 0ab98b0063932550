"""GSM8K-style grade-school math word problems, generated from seeded templates.

Format
------
Every problem is a prompt and a target (the text the model must generate)::

    prompt = "Q: <question>\\nA:"
    target = " <step>. <step>. #### <answer>"

Each step is an equation ``a<op>b=c`` with ``op`` one of ``+ - * /`` and no spaces inside it; the steps are
joined by ``". "`` and the last one is followed by ``". #### <answer>"``. Example::

    Q: Tom has 23 apples. He buys 4 bags with 6 apples each. How many apples does he have now?
    A: 4*6=24. 23+24=47. #### 47

The model ends its output with an end-of-sequence token after the answer; that token is not part of the text.

Templates and levels
--------------------
Twenty templates (see :data:`TEMPLATES`), each with three phrasings chosen at random, cover one-, two- and
three-step problems: addition, subtraction, comparisons ("how many more ... than ..."), rates ("x km per hour
for y hours"), unit prices, sharing equally, and chains where an intermediate result is reused by the next
step. A template's level (1, 2 or 3) is its number of steps. The step order is fixed per template, so a
problem has exactly one correct solution text.

Numbers (chosen to keep the task learnable by a small model)
-------------------------------------------------------------
* ``+`` and ``-``: both operands 0..99 (intermediate results included), sums up to 198, never a negative
  difference;
* ``*``: both factors 2..12 (products <= 144);
* ``/``: always exact, divisor 2..12, quotient 1..12 (dividend <= 144);
* every intermediate and final result is a non-negative integer <= 999 (in practice <= 198).

Splits
------
A problem's :attr:`Problem.key` names its template, entities (names, objects, units, ...) and numbers, but not
its phrasing, so two problems that differ only in wording share a key. The split a key belongs to is fixed by
``sha256(key)`` (bucket mod 100: test < 5, validation < 10, train otherwise), so ``train``, ``validation`` and
``test`` never share a problem, for any seeds. :func:`generate` rejection-samples until it has ``n`` distinct
keys of the requested split. Note that the arithmetic facts themselves (e.g. ``7*8=56``) are few and shared by
all splits: held-out accuracy measures new wording and new combinations over known facts.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "Problem",
    "Template",
    "TEMPLATES",
    "SPLITS",
    "LEVELS",
    "MAX_ADD_OPERAND",
    "MIN_FACTOR",
    "MAX_FACTOR",
    "MAX_QUOTIENT",
    "MAX_RESULT",
    "generate",
    "drill",
    "extract_answer",
    "is_correct",
    "parse_step",
    "split_of",
    "make_key",
    "Chain",
    "Reject",
    "MALE_NAMES",
    "FEMALE_NAMES",
    "ITEMS",
    "CURRENCIES",
    "THINGS",
    "template_names",
    "corpus_text",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
LEVELS: tuple[int, ...] = (1, 2, 3)

MAX_ADD_OPERAND = 99  # operands of + and -
MIN_FACTOR = 2  # factors of *, and divisors of /
MAX_FACTOR = 12
MAX_QUOTIENT = 12
MAX_RESULT = 999

# sha256(key) mod 100 below each bound -> that split (the first that holds); otherwise train
SPLIT_BOUNDS: tuple[tuple[str, int], ...] = (("test", 5), ("validation", 10))


# --------------------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One word problem with its worked solution.

    ``numbers`` and ``entities`` are the template's sampled inputs; together with ``template`` they make the
    problem's :attr:`key`. A hand-made Problem may leave them empty (its key is then just the template name).
    """

    question: str
    steps: tuple[str, ...]
    answer: int
    template: str
    level: int
    numbers: tuple[int, ...] = ()
    entities: tuple[str, ...] = ()

    @property
    def prompt(self) -> str:
        """``"Q: <question>\\nA:"``."""
        return f"Q: {self.question}\nA:"

    @property
    def target(self) -> str:
        """``" <step>. <step>. #### <answer>"`` (no end-of-sequence token)."""
        return _target(self.steps, self.answer)

    @property
    def key(self) -> str:
        """Canonical identity: template name, entity choices and numbers (not the phrasing)."""
        return make_key(self.template, self.entities, self.numbers)


def _target(steps: Sequence[str], answer: int) -> str:
    return " " + ". ".join(steps) + f". #### {answer}"


def make_key(template: str, entities: Sequence[str], numbers: Sequence[int]) -> str:
    return f"{template}|{'|'.join(entities)}|{','.join(map(str, numbers))}"


def split_of(key: str, bounds: Sequence[tuple[str, int]] = SPLIT_BOUNDS) -> str:
    """The split that a problem key belongs to: the first of ``bounds`` (``(split, bound)`` pairs, bounds rising)
    whose bound exceeds the key's hash bucket (``sha256(key)`` mod 100), else ``"train"``."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    return next((split for split, bound in bounds if bucket < bound), "train")


# --------------------------------------------------------------------------------------------------------------
# Answer checking
# --------------------------------------------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"\s*(-?)\s*(\d+)")
_STEP_RE = re.compile(r"^(\d+)([-+*/])(\d+)=(-?\d+)$")


def extract_answer(text: str) -> int | None:
    """The integer after the last ``####`` in ``text``, or None.

    Spaces around the number, a leading minus sign and trailing text are tolerated (``"#### 47"``,
    ``"####47."``, ``"#### -3 apples"``); no ``####`` or no number right after the last one gives None.
    """
    pos = text.rfind("####")
    if pos < 0:
        return None
    m = _ANSWER_RE.match(text, pos + 4)
    if m is None:
        return None
    value = int(m.group(2))
    return -value if m.group(1) else value


def is_correct(problem: Problem, generated_text: str) -> bool:
    """Whether the answer extracted from ``generated_text`` equals ``problem.answer``."""
    return extract_answer(generated_text) == problem.answer


def parse_step(step: str) -> tuple[int, str, int, int]:
    """Parse an equation ``"a<op>b=c"`` into ``(a, op, b, c)``; raises ValueError when it is malformed."""
    m = _STEP_RE.match(step)
    if m is None:
        raise ValueError(f"not an equation a<op>b=c: {step!r}")
    return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))


# --------------------------------------------------------------------------------------------------------------
# Step recording with the number rules
# --------------------------------------------------------------------------------------------------------------


class Reject(Exception):
    """A sampled number set breaks a rule; the caller draws again."""


class Chain:
    """Records solution steps, enforcing the number rules of the module docstring."""

    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps: list[str] = []

    def add(self, a: int, b: int) -> int:
        if not (0 <= a <= MAX_ADD_OPERAND and 0 <= b <= MAX_ADD_OPERAND):
            raise Reject
        c = a + b
        self.steps.append(f"{a}+{b}={c}")
        return c

    def sub(self, a: int, b: int) -> int:
        if not (0 <= b <= a <= MAX_ADD_OPERAND):
            raise Reject
        c = a - b
        self.steps.append(f"{a}-{b}={c}")
        return c

    def mul(self, a: int, b: int) -> int:
        if not (MIN_FACTOR <= a <= MAX_FACTOR and MIN_FACTOR <= b <= MAX_FACTOR):
            raise Reject
        c = a * b
        self.steps.append(f"{a}*{b}={c}")
        return c

    def div(self, a: int, b: int) -> int:
        if not (MIN_FACTOR <= b <= MAX_FACTOR) or a % b:
            raise Reject
        c = a // b
        if not 1 <= c <= MAX_QUOTIENT:
            raise Reject
        self.steps.append(f"{a}/{b}={c}")
        return c


# --------------------------------------------------------------------------------------------------------------
# Entities
# --------------------------------------------------------------------------------------------------------------

MALE_NAMES = ("Tom", "Ben", "Sam", "Leo", "Max", "Omar", "Ravi", "Jack", "Noah", "Luis", "Ken", "Yusuf", "Eli",
              "Finn", "Hugo", "Ivan", "Jonas", "Kofi", "Marco", "Pablo")
FEMALE_NAMES = ("Anna", "Sara", "Mia", "Lily", "Emma", "Zoe", "Nina", "Priya", "Lucy", "Maya", "Aiko", "Chloe",
                "Ella", "Fatima", "Grace", "Hana", "Ines", "Julia", "Lena", "Rosa")
# name -> (subject, possessive, object) pronouns
_PRONOUNS: dict[str, tuple[str, str, str]] = {
    **{n: ("he", "his", "him") for n in MALE_NAMES},
    **{n: ("she", "her", "her") for n in FEMALE_NAMES},
}
_NAMES: tuple[str, ...] = MALE_NAMES + FEMALE_NAMES

_OBJECTS = ("apples", "coins", "marbles", "stickers", "pencils", "cards", "stamps", "shells", "cookies",
            "balloons", "beads", "buttons", "eggs", "oranges", "crayons", "candies")
_CONTAINERS = (("bag", "bags"), ("box", "boxes"), ("pack", "packs"), ("jar", "jars"), ("basket", "baskets"),
               ("tin", "tins"))
ITEMS = (("notebook", "notebooks"), ("pen", "pens"), ("sandwich", "sandwiches"), ("ticket", "tickets"),
         ("toy", "toys"), ("mug", "mugs"), ("cake", "cakes"), ("book", "books"), ("plant", "plants"),
         ("ball", "balls"), ("kite", "kites"), ("hat", "hats"))
CURRENCIES = ("dollars", "euros", "pounds")
_GROUPS = ("friends", "cousins", "classmates", "teammates", "neighbours")
_TRAVEL = ("drives", "cycles", "rides", "sails", "travels", "skates")
_DISTANCE = ("km", "miles")
_PERIODS = ("day", "week")
# (past-tense verb, unit) for "did <total> <unit> over several periods"
_TOTALS = (("read", "pages"), ("ran", "km"), ("saved", "dollars"), ("cycled", "miles"), ("wrote", "pages"),
           ("swam", "laps"), ("practised for", "minutes"))
# (present verb, unit) for "<verb> <rate> <unit> a day"
_ACTS = (("reads", "pages"), ("runs", "km"), ("writes", "lines"), ("swims", "laps"), ("cycles", "miles"),
         ("practises for", "minutes"))
# (thing, unit, present verb, gerund) for "a <thing> has <n> <unit>"
_WORKS = (("book", "pages", "reads", "reading"), ("report", "pages", "writes", "writing"),
          ("puzzle", "pieces", "places", "placing"), ("comic", "pages", "colours", "colouring"))
_CLUBS = ("class", "club", "camp", "choir")
THINGS = ("bike", "game", "jacket", "radio", "watch", "lamp")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(_NAMES, 2)
    return a, b


# --------------------------------------------------------------------------------------------------------------
# Templates. Each sampler returns (question, entities, numbers, steps, answer); every phrasing of a template
# mentions all of its entities and numbers, so the key (which leaves the phrasing out) identifies the content.
# --------------------------------------------------------------------------------------------------------------

_Sample = tuple[str, tuple[str, ...], tuple[int, ...], list[str], int]


def _t_add_more(rng: random.Random) -> _Sample:
    n1, n2 = _two_names(rng)
    obj = rng.choice(_OBJECTS)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.add(a, b)
    q = rng.choice((
        f"{n1} has {a} {obj}. {n2} gives {o} {b} more {obj}. How many {obj} does {n1} have now?",
        f"{n1} had {a} {obj}. Then {n2} gave {o} another {b} {obj}. How many {obj} does {n1} have in total?",
        f"{n1} collects {obj} and already has {a}. {_cap(s)} gets {b} more from {n2}. "
        f"How many {obj} does {s} have now?",
    ))
    return q, (n1, n2, obj), (a, b), ch.steps, r


def _t_take_away(rng: random.Random) -> _Sample:
    n1, n2 = _two_names(rng)
    obj = rng.choice(_OBJECTS)
    a = rng.randint(10, 99)
    b = rng.randint(2, a - 1)
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.sub(a, b)
    q = rng.choice((
        f"{n1} has {a} {obj}. {_cap(s)} gives {b} of them to {n2}. How many {obj} does {n1} have left?",
        f"{n1} had {a} {obj} and gave {b} {obj} to {n2}. How many {obj} does {s} have now?",
        f"There were {a} {obj} in {n1}'s bag. {n2} took {b} of them. How many {obj} are left in the bag?",
    ))
    return q, (n1, n2, obj), (a, b), ch.steps, r


def _t_compare_more(rng: random.Random) -> _Sample:
    n1, n2 = _two_names(rng)
    obj = rng.choice(_OBJECTS)
    a = rng.randint(10, 99)
    b = rng.randint(2, a - 1)
    ch = Chain()
    r = ch.sub(a, b)
    q = rng.choice((
        f"{n1} has {a} {obj} and {n2} has {b} {obj}. How many more {obj} does {n1} have than {n2}?",
        f"{n2} has {b} {obj}. {n1} has {a} {obj}. How many more {obj} does {n1} have than {n2}?",
        f"{n1} collected {a} {obj}, while {n2} collected {b}. How many more {obj} did {n1} collect than {n2}?",
    ))
    return q, (n1, n2, obj), (a, b), ch.steps, r


def _t_rate_distance(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    verb, unit = rng.choice(_TRAVEL), rng.choice(_DISTANCE)
    speed, hours = rng.randint(2, 12), rng.randint(2, 12)
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.mul(speed, hours)
    q = rng.choice((
        f"{n1} {verb} at {speed} {unit} per hour for {hours} hours. How many {unit} does {s} travel?",
        f"Moving at a steady {speed} {unit} per hour, {n1} {verb} for {hours} hours. "
        f"How far does {s} go in {unit}?",
        f"{n1} {verb} for {hours} hours at a speed of {speed} {unit} per hour. How many {unit} does {s} cover?",
    ))
    return q, (n1, verb, unit), (speed, hours), ch.steps, r


def _t_unit_price(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    (item, items), cur = rng.choice(ITEMS), rng.choice(CURRENCIES)
    count, price = rng.randint(2, 12), rng.randint(2, 12)
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.mul(count, price)
    q = rng.choice((
        f"One {item} costs {price} {cur}. {n1} buys {count} {items}. How many {cur} does {s} pay?",
        f"{n1} buys {count} {items} for {price} {cur} each. How many {cur} does {s} spend?",
        f"{_cap(items)} cost {price} {cur} each. How many {cur} does {n1} need to buy {count} {items}?",
    ))
    return q, (n1, item, cur), (count, price), ch.steps, r


def _t_share_equally(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    obj, group = rng.choice(_OBJECTS), rng.choice(_GROUPS)
    d, k = rng.randint(2, 12), rng.randint(1, 12)
    total = d * k
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.div(total, d)
    q = rng.choice((
        f"{n1} has {total} {obj} and shares them equally among {p} {d} {group}. "
        f"How many {obj} does each of them get?",
        f"{n1} divides {total} {obj} equally between {p} {d} {group}. How many {obj} does each one get?",
        f"{n1} wants to give {total} {obj} to {p} {d} {group} so that each gets the same number. "
        f"How many {obj} does each get?",
    ))
    return q, (n1, obj, group), (total, d), ch.steps, r


def _t_per_period(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    (did, unit), period = rng.choice(_TOTALS), rng.choice(_PERIODS)
    d, k = rng.randint(2, 12), rng.randint(1, 12)
    total = d * k
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.div(total, d)
    q = rng.choice((
        f"{n1} {did} {total} {unit} in {d} {period}s, the same amount each {period}. "
        f"How many {unit} is that each {period}?",
        f"In {d} {period}s {n1} {did} {total} {unit}, the same number every {period}. "
        f"How many {unit} per {period} is that?",
        f"Over {d} {period}s, {n1} {did} a total of {total} {unit}, equally each {period}. "
        f"How many {unit} did {s} do each {period}?",
    ))
    return q, (n1, did, unit, period), (total, d), ch.steps, r


def _t_buy_groups(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    obj, (box, boxes) = rng.choice(_OBJECTS), rng.choice(_CONTAINERS)
    a, count, each = rng.randint(2, 99), rng.randint(2, 12), rng.randint(2, 12)
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.add(a, ch.mul(count, each))
    q = rng.choice((
        f"{n1} has {a} {obj}. {_cap(s)} buys {count} {boxes} with {each} {obj} each. "
        f"How many {obj} does {s} have now?",
        f"{n1} already has {a} {obj}. Then {s} gets {count} {boxes} of {obj}, each holding {each} {obj}. "
        f"How many {obj} does {n1} have in total?",
        f"There are {each} {obj} in each {box}. {n1} buys {count} {boxes} and already had {a} {obj}. "
        f"How many {obj} does {s} have now?",
    ))
    return q, (n1, obj, box), (a, count, each), ch.steps, r


def _t_money_left(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    (item, items), cur = rng.choice(ITEMS), rng.choice(CURRENCIES)
    count, price = rng.randint(2, 12), rng.randint(2, 12)
    if count * price >= MAX_ADD_OPERAND:
        raise Reject
    money = rng.randint(count * price + 1, MAX_ADD_OPERAND)
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.sub(money, ch.mul(count, price))
    q = rng.choice((
        f"{n1} has {money} {cur}. {_cap(s)} buys {count} {items} that cost {price} {cur} each. "
        f"How many {cur} does {s} have left?",
        f"{n1} goes shopping with {money} {cur} and buys {count} {items} at {price} {cur} each. "
        f"How many {cur} does {s} have left?",
        f"{_cap(items)} cost {price} {cur} each. {n1} has {money} {cur} and buys {count} of them. "
        f"How many {cur} are left?",
    ))
    return q, (n1, item, cur), (money, count, price), ch.steps, r


def _t_trip_extra(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    verb, unit = rng.choice(_TRAVEL), rng.choice(_DISTANCE)
    speed, hours, extra = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 99)
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.add(ch.mul(speed, hours), extra)
    q = rng.choice((
        f"{n1} {verb} at {speed} {unit} per hour for {hours} hours and then another {extra} {unit}. "
        f"How many {unit} does {s} travel in total?",
        f"First {n1} {verb} for {hours} hours at {speed} {unit} per hour. After that {s} goes {extra} more "
        f"{unit}. What is the total distance in {unit}?",
        f"At {speed} {unit} per hour, {n1} {verb} for {hours} hours. Then {s} adds {extra} {unit} more. "
        f"How many {unit} is that altogether?",
    ))
    return q, (n1, verb, unit), (speed, hours, extra), ch.steps, r


def _t_times_as_many(rng: random.Random) -> _Sample:
    n1, n2 = _two_names(rng)
    obj = rng.choice(_OBJECTS)
    a, k = rng.randint(2, 12), rng.randint(2, 12)
    ch = Chain()
    r = ch.add(a, ch.mul(a, k))
    q = rng.choice((
        f"{n1} has {a} {obj}. {n2} has {k} times as many {obj} as {n1}. "
        f"How many {obj} do they have together?",
        f"{n2} owns {k} times as many {obj} as {n1}, who owns {a}. "
        f"How many {obj} do the two of them own altogether?",
        f"{n1} has {a} {obj}, and {n2} has {k} times that number. "
        f"How many {obj} do {n1} and {n2} have in total?",
    ))
    return q, (n1, n2, obj), (a, k), ch.steps, r


def _t_work_left(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    thing, unit, verb, gerund = rng.choice(_WORKS)
    rate, days = rng.randint(2, 12), rng.randint(2, 12)
    if rate * days >= MAX_ADD_OPERAND:
        raise Reject
    total = rng.randint(rate * days + 1, MAX_ADD_OPERAND)
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.sub(total, ch.mul(rate, days))
    q = rng.choice((
        f"{n1}'s {thing} has {total} {unit}. {_cap(s)} {verb} {rate} {unit} a day for {days} days. "
        f"How many {unit} are left?",
        f"{n1} {verb} {rate} {unit} every day for {days} days. {_cap(p)} {thing} has {total} {unit}. "
        f"How many {unit} are still left?",
        f"There are {total} {unit} in {n1}'s {thing}. After {days} days of {gerund} {rate} {unit} a day, "
        f"how many {unit} remain?",
    ))
    return q, (n1, thing), (total, rate, days), ch.steps, r


def _t_compare_product(rng: random.Random) -> _Sample:
    n1, n2 = _two_names(rng)
    obj, (box, boxes) = rng.choice(_OBJECTS), rng.choice(_CONTAINERS)
    count, each = rng.randint(2, 12), rng.randint(2, 12)
    prod = count * each
    if prod > MAX_ADD_OPERAND:
        raise Reject
    other = rng.randint(2, prod - 1)
    ch = Chain()
    r = ch.sub(ch.mul(count, each), other)
    q = rng.choice((
        f"{n1} buys {count} {boxes} with {each} {obj} in each. {n2} has {other} {obj}. "
        f"How many more {obj} does {n1} have than {n2}?",
        f"{n2} has {other} {obj}. {n1} has {count} {boxes} of {obj} with {each} in each {box}. "
        f"How many more {obj} does {n1} have than {n2}?",
        f"{n1} fills {count} {boxes} with {each} {obj} each, and {n2} has {other} {obj}. "
        f"How many more {obj} does {n1} have?",
    ))
    return q, (n1, n2, obj, box), (count, each, other), ch.steps, r


def _t_share_after_gain(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    obj, group = rng.choice(_OBJECTS), rng.choice(_GROUPS)
    d, k = rng.randint(2, 12), rng.randint(2, 12)
    total = d * k
    a = rng.randint(2, total - 2)
    b = total - a
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.div(ch.add(a, b), d)
    q = rng.choice((
        f"{n1} has {a} {obj} and gets {b} more. {_cap(s)} shares all of them equally among {p} {d} {group}. "
        f"How many {obj} does each get?",
        f"{n1} picked {a} {obj} in the morning and {b} in the afternoon. {_cap(s)} splits them equally "
        f"between {p} {d} {group}. How many {obj} does each one get?",
        f"{n1} found {a} {obj}, then {b} more. {_cap(s)} gives all of them to {p} {d} {group}, the same number "
        f"to each. How many {obj} does each get?",
    ))
    return q, (n1, obj, group), (a, b, d), ch.steps, r


def _t_shop_total(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    (_, items1), (_, items2) = rng.sample(ITEMS, 2)
    cur = rng.choice(CURRENCIES)
    c1, p1, c2, p2 = (rng.randint(2, 12) for _ in range(4))
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.add(ch.mul(c1, p1), ch.mul(c2, p2))
    q = rng.choice((
        f"{n1} buys {c1} {items1} at {p1} {cur} each and {c2} {items2} at {p2} {cur} each. "
        f"How many {cur} does {s} spend in total?",
        f"{_cap(items1)} cost {p1} {cur} each and {items2} cost {p2} {cur} each. "
        f"{n1} buys {c1} {items1} and {c2} {items2}. What is the total cost in {cur}?",
        f"At the market {n1} gets {c1} {items1} for {p1} {cur} each, then {c2} {items2} for {p2} {cur} each. "
        f"How many {cur} does {s} pay altogether?",
    ))
    return q, (n1, items1, items2, cur), (c1, p1, c2, p2), ch.steps, r


def _t_compare_rates(rng: random.Random) -> _Sample:
    n1, n2 = _two_names(rng)
    verb, unit = rng.choice(_ACTS)
    r1, d1, r2, d2 = (rng.randint(2, 12) for _ in range(4))
    if not r2 * d2 < r1 * d1 <= MAX_ADD_OPERAND:
        raise Reject
    ch = Chain()
    r = ch.sub(ch.mul(r1, d1), ch.mul(r2, d2))
    q = rng.choice((
        f"{n1} {verb} {r1} {unit} a day for {d1} days. {n2} {verb} {r2} {unit} a day for {d2} days. "
        f"How many more {unit} does {n1} do than {n2}?",
        f"For {d1} days {n1} {verb} {r1} {unit} each day, and for {d2} days {n2} {verb} {r2} {unit} each day. "
        f"How many more {unit} is that for {n1} than for {n2}?",
        f"{n2} {verb} {r2} {unit} a day for {d2} days, while {n1} {verb} {r1} {unit} a day for {d1} days. "
        f"How many more {unit} does {n1} do than {n2}?",
    ))
    return q, (n1, n2, verb), (r1, d1, r2, d2), ch.steps, r


def _t_collect_share(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    obj, (box, boxes), group = rng.choice(_OBJECTS), rng.choice(_CONTAINERS), rng.choice(_GROUPS)
    d, k = rng.randint(2, 12), rng.randint(2, 12)
    count, each = rng.randint(2, 12), rng.randint(2, 12)
    a = d * k - count * each
    if a < 2:
        raise Reject
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.div(ch.add(a, ch.mul(count, each)), d)
    q = rng.choice((
        f"{n1} has {a} {obj}. {_cap(s)} buys {count} {boxes} with {each} {obj} in each. Then {s} shares all "
        f"{p} {obj} equally among {p} {d} {group}. How many {obj} does each get?",
        f"{n1} starts with {a} {obj} and adds {count} {boxes} of {each} {obj} each. {_cap(s)} splits all of "
        f"them equally between {p} {d} {group}. How many {obj} does each one get?",
        f"There are {each} {obj} in a {box}. {n1} has {a} {obj} and buys {count} {boxes}. {_cap(s)} gives all "
        f"the {obj} to {p} {d} {group}, the same number to each. How many {obj} does each get?",
    ))
    return q, (n1, obj, box, group), (a, count, each, d), ch.steps, r


def _t_trip_remaining(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    verb, unit = rng.choice(_TRAVEL), rng.choice(_DISTANCE)
    speed, hours = rng.randint(2, 12), rng.randint(2, 12)
    done = speed * hours
    if done > MAX_ADD_OPERAND - 4:
        raise Reject
    extra = rng.randint(2, MAX_ADD_OPERAND - 2 - done)
    total = rng.randint(done + extra + 1, MAX_ADD_OPERAND)
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.sub(total, ch.add(ch.mul(speed, hours), extra))
    q = rng.choice((
        f"A trip is {total} {unit} long. {n1} {verb} at {speed} {unit} per hour for {hours} hours, and then "
        f"{extra} more {unit}. How many {unit} are left?",
        f"{n1} plans a trip of {total} {unit}. {_cap(s)} {verb} for {hours} hours at {speed} {unit} per hour, then "
        f"another {extra} {unit}. How many {unit} does {s} still have to go?",
        f"{n1} {verb} at {speed} {unit} per hour for {hours} hours and then {extra} {unit} more. The whole trip "
        f"is {total} {unit}. How many {unit} are still left?",
    ))
    return q, (n1, verb, unit), (total, speed, hours, extra), ch.steps, r


def _t_savings_split(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    cur, thing, group = rng.choice(CURRENCIES), rng.choice(THINGS), rng.choice(_GROUPS)
    weekly, weeks = rng.randint(2, 12), rng.randint(2, 12)
    saved = weekly * weeks
    d, k = rng.randint(2, 12), rng.randint(1, 12)
    rest = d * k
    spent = saved - rest
    if spent < 2 or saved > MAX_ADD_OPERAND:
        raise Reject
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.div(ch.sub(ch.mul(weekly, weeks), spent), d)
    q = rng.choice((
        f"{n1} saves {weekly} {cur} every week for {weeks} weeks. {_cap(s)} spends {spent} {cur} on a {thing} "
        f"and shares the rest equally among {p} {d} {group}. How many {cur} does each get?",
        f"For {weeks} weeks {n1} puts away {weekly} {cur} a week. After buying a {thing} for {spent} {cur}, "
        f"{s} splits what is left equally between {p} {d} {group}. How many {cur} does each one get?",
        f"{n1} saved {weekly} {cur} a week for {weeks} weeks, paid {spent} {cur} for a {thing}, and gave the "
        f"rest to {p} {d} {group} in equal parts. How many {cur} did each get?",
    ))
    return q, (n1, cur, thing, group), (weekly, weeks, spent, d), ch.steps, r


def _t_team_supplies(rng: random.Random) -> _Sample:
    n1 = rng.choice(_NAMES)
    club, obj = rng.choice(_CLUBS), rng.choice(_OBJECTS)
    size, teams, each = rng.randint(2, 12), rng.randint(2, 12), rng.randint(2, 12)
    people = size * teams
    boys = rng.randint(max(2, people - MAX_ADD_OPERAND), min(people - 2, MAX_ADD_OPERAND))  # people >= 4
    girls = people - boys
    s, p, o = _PRONOUNS[n1]
    ch = Chain()
    r = ch.mul(ch.div(ch.add(boys, girls), size), each)
    q = rng.choice((
        f"A {club} has {boys} boys and {girls} girls. {n1} puts them into groups of {size}. Each group gets "
        f"{each} {obj}. How many {obj} does {n1} hand out?",
        f"There are {boys} boys and {girls} girls in {n1}'s {club}. {_cap(s)} makes groups of {size} children "
        f"and gives every group {each} {obj}. How many {obj} does {s} need?",
        f"{n1} splits a {club} of {boys} boys and {girls} girls into groups of {size}, and each group receives "
        f"{each} {obj}. How many {obj} are given out in total?",
    ))
    return q, (n1, club, obj), (boys, girls, size, each), ch.steps, r


@dataclass(frozen=True)
class Template:
    """A problem template: its name, level (= number of solution steps) and sampler."""

    name: str
    level: int
    sample: Callable[[random.Random], _Sample]


TEMPLATES: tuple[Template, ...] = (
    Template("add_more", 1, _t_add_more),
    Template("take_away", 1, _t_take_away),
    Template("compare_more", 1, _t_compare_more),
    Template("rate_distance", 1, _t_rate_distance),
    Template("unit_price", 1, _t_unit_price),
    Template("share_equally", 1, _t_share_equally),
    Template("per_period", 1, _t_per_period),
    Template("buy_groups", 2, _t_buy_groups),
    Template("money_left", 2, _t_money_left),
    Template("trip_extra", 2, _t_trip_extra),
    Template("times_as_many", 2, _t_times_as_many),
    Template("work_left", 2, _t_work_left),
    Template("compare_product", 2, _t_compare_product),
    Template("share_after_gain", 2, _t_share_after_gain),
    Template("shop_total", 3, _t_shop_total),
    Template("compare_rates", 3, _t_compare_rates),
    Template("collect_share", 3, _t_collect_share),
    Template("trip_remaining", 3, _t_trip_remaining),
    Template("savings_split", 3, _t_savings_split),
    Template("team_supplies", 3, _t_team_supplies),
)


def template_names(level: int | None = None) -> list[str]:
    """Names of all templates, or of those of one level."""
    return [t.name for t in TEMPLATES if level is None or t.level == level]


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def generate_distinct(split: str, n: int, seed: int, levels: Iterable[int], *, namespace: str,
                      splits: Sequence[str], all_levels: Sequence[int], split_of: Callable[[str], str],
                      draw: Callable[[random.Random, int], tuple[str, Callable[[], Any]]]) -> list[Any]:
    """The sampling loop of a problem generator: ``n`` problems of ``split`` with distinct keys, levels balanced
    exactly (consecutive groups hold one problem of each requested level in a random order, a last partial group
    excepted), deterministic for the arguments, and ``generate(split, m)`` a prefix of ``generate(split, n)``.

    ``draw(rng, level)`` returns a candidate's key and a function that builds the problem (called only when the
    key is new and ``split_of(key) == split``, so rejected candidates cost no wording). ``namespace`` seeds the
    generator's own random stream.
    """
    if split not in splits:
        raise ValueError(f"split must be one of {tuple(splits)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lv = tuple(dict.fromkeys(int(x) for x in levels))
    if not lv or any(x not in all_levels for x in lv):
        raise ValueError(f"levels must be a non-empty subset of {tuple(all_levels)}, got {tuple(levels)!r}")
    digest = hashlib.sha256(f"{namespace}|{split}|{seed}".encode("utf-8")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    out: list[Any] = []
    seen: set[str] = set()
    order: list[int] = []
    attempts, max_attempts = 0, 10_000 + 200 * n
    while len(out) < n:
        if not order:
            order = list(lv)
            rng.shuffle(order)
        attempts += 1
        if attempts > max_attempts:
            raise RuntimeError(f"could not find {n} distinct {split} problems at levels {lv} "
                               f"(found {len(out)} in {attempts - 1} draws)")
        key, build = draw(rng, order[-1])
        if key in seen or split_of(key) != split:
            continue
        seen.add(key)
        order.pop()
        out.append(build())
    return out


def generate(split: str, n: int, seed: int = 0, levels: Iterable[int] = LEVELS) -> list[Problem]:
    """``n`` distinct problems of ``split`` ("train", "validation" or "test"), deterministic for the arguments.

    Levels are balanced exactly: the output is made of consecutive groups holding one problem of each requested
    level in a random order (a last, partial group excepted). Within a level the template is drawn uniformly
    (a number set that breaks a rule is redrawn within the same template).
    Candidates whose key hashes to another split, or repeats a key already drawn, are rejected, so the splits
    share no problem for any seeds. ``generate(split, m, seed)`` is a prefix of ``generate(split, n, seed)``
    for ``m < n``.
    """
    by_level = {x: [t for t in TEMPLATES if t.level == x] for x in LEVELS}

    def draw(rng: random.Random, level: int) -> tuple[str, Callable[[], Problem]]:
        tmpl = rng.choice(by_level[level])
        while True:  # redraw numbers within the template, so templates stay uniform within a level
            try:
                question, entities, numbers, steps, answer = tmpl.sample(rng)
                break
            except Reject:
                pass
        return (make_key(tmpl.name, entities, numbers),
                lambda: Problem(question, tuple(steps), answer, tmpl.name, tmpl.level, numbers, entities))

    return generate_distinct(split, n, seed, levels, namespace="s2d2.tasks.arith", splits=SPLITS, all_levels=LEVELS,
                             split_of=split_of, draw=draw)


# (operation, share of drills): + and - carry the most errors of word-problem solutions (a wrong carry or borrow)
_DRILL_OPS = (("+", 0.35), ("-", 0.35), ("*", 0.15), ("/", 0.15))


def drill(rng: random.Random) -> Problem:
    """One bare-equation problem for training (level 0, never in a split), within the number rules above, e.g.
    ``Q: What is 37+93?`` / `` 37+93=130. #### 130``. Word problems exercise each arithmetic fact only a few
    times per epoch; drills let a small model learn carries and borrows directly."""
    op = rng.choices([o for o, _ in _DRILL_OPS], weights=[w for _, w in _DRILL_OPS])[0]
    chain = Chain()
    if op == "+":
        a, b = rng.randint(0, MAX_ADD_OPERAND), rng.randint(0, MAX_ADD_OPERAND)
        c = chain.add(a, b)
    elif op == "-":
        a = rng.randint(0, MAX_ADD_OPERAND)
        b = rng.randint(0, a)
        c = chain.sub(a, b)
    elif op == "*":
        a, b = rng.randint(MIN_FACTOR, MAX_FACTOR), rng.randint(MIN_FACTOR, MAX_FACTOR)
        c = chain.mul(a, b)
    else:
        b, q = rng.randint(MIN_FACTOR, MAX_FACTOR), rng.randint(1, MAX_QUOTIENT)
        a = b * q
        c = chain.div(a, b)
    return Problem(f"What is {a}{op}{b}?", tuple(chain.steps), c, "drill", 0, (a, b))


def corpus_text(n: int, seed: int = 0) -> str:
    """``n`` training problems as ``prompt + target`` strings joined by newlines (for tokenizer training)."""
    return "\n".join(p.prompt + p.target for p in generate("train", n, seed))
