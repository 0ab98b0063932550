"""Grade-school arithmetic word problems from a compositional grammar, with grammar productions held out.

:mod:`s2d2.evaluation.tasks.arith` writes each problem from one of 20 templates with 3 fixed phrasings. This module writes
the same kind of problems from a small grammar instead: a problem's *meaning* (what happens to whose quantity,
with which numbers) is drawn first, then it is put into words by choosing, at every choice point, one of
several *productions* (sentence frames, clause orders, connectives, question forms, ...). Six productions are
never used by ``train``, ``validation`` and ``test``; the ``generalisation`` split uses at least one of them in
every problem, so a model trained on ``train`` meets sentence frames there that it has never seen.

Format (identical to :mod:`~s2d2.evaluation.tasks.arith`, so its checker and the training code apply unchanged)
---------------------------------------------------------------------------------------------------------------
::

    prompt = "Q: <question>\\nA:"
    target = " <step>. <step>. #### <answer>"

Each step is an equation ``a<op>b=c`` with ``op`` one of ``+ - * /`` and no spaces; the steps are joined by
``". "`` and followed by ``". #### <answer>"``, the answer being the result of the last step. Problems are
:class:`WordyProblem` objects, a subclass of :class:`~s2d2.evaluation.tasks.arith.Problem`, so ``prompt``, ``target``,
``key`` and :func:`~s2d2.evaluation.tasks.arith.is_correct` work on them as they are. A level-3 example (``train``)::

    Q: There are 23 apples in Tom's basket. He buys 4 bags of 6 apples before giving 5 apples to Ann. Ann is
       9 years old. How many apples does Tom have now?
    A: 4*6=24. 23+24=47. 47-5=42. #### 42

and a wording of the same meaning with held-out productions, as the ``generalisation`` split would write it if
the meaning's key fell there (a key belongs to exactly one split)::

    Q: Work out how many apples Tom has now. There are 23 apples in his basket. Before giving 5 apples to
       Ann, he buys 4 bags of 6 apples. Ann is 9 years old.

Numbers (the rules of :mod:`~s2d2.evaluation.tasks.arith`, enforced by its step recorder ``Chain``)
---------------------------------------------------------------------------------------------------
* ``+`` and ``-``: both operands 0..99, intermediate results included; never a negative difference;
* ``*``: both factors 2..12;
* ``/``: exact, divisor 2..12, quotient 1..12 (here always 2..12);
* every result is a non-negative integer <= 999 (in practice <= 198).

Every number written in a question is at least 2 (no "1 apples"), and every one of them is either an operand of
the solution or a distractor.

Meaning: one quantity through time
----------------------------------
A problem follows one quantity of one protagonist. The *domain* fixes the quantity: ``objects`` (apples,
stickers, shells, eggs, toy cars, ...), ``money`` (dollars, euros, pounds), ``mass`` (kg of flour, rice, sand,
...) or ``progress`` (km or miles walked, run, cycled, skated; pages read or written; minutes of piano or violin;
laps or lengths swum). The story (its *shape*, :attr:`~s2d2.evaluation.tasks.arith.Problem.template`) is

* a **start**: ``have`` (the protagonist has ``n``; 0 steps), ``prod`` (``c`` groups of ``e``; 1 step) or
  ``times`` (``k`` times as much as another person, who has ``a``; 1 step; not for progress);
* 0 to 4 **events** in time order: ``add`` / ``sub`` a number (1 step) or ``add_prod`` / ``sub_prod`` ``c``
  groups of ``e`` (2 steps: the product, then the sum or difference). Each event has a *kind* that selects its
  verbs and frames (objects: receive, buy, pick, bake, collect, find, win / give, lose, eat, use, sell, and
  packs, groups of people and per-day amounts; money: earn, receive, find, win / spend, give, donate, lose, and
  hourly pay, weekly savings or pocket money, items at a price, daily spending; mass: buy, receive, deliver /
  use, sell, give, and bags of a weight, daily use; progress only adds: more distance, pages, minutes, or a
  rate);
* a **final**: ``total`` (how much now; 0 steps), ``share`` (equally among ``d`` people or into ``d``
  containers; 1), ``groups`` (into groups of ``d``, or items at ``d`` each: how many; 1), ``compare`` with
  another person's amount (1), ``compare_prod`` with another person's ``c`` groups of ``e`` (2), or ``goal``
  (how much is missing to reach ``T``; 1). Progress stories end with total, compare or goal.

The **level** is the number of steps, 1 to 4; each result but the last is used by a later step. Zero to two
**distractor** sentences add numbers that the solution does not use (ages, class sizes, school grades, opening
hours, temperatures, distances or walking times to places, other people's other things); a distractor number
never equals any operand or result of the solution. People other than the protagonist always have the other
gender and are never referred to by pronouns, so every "he"/"she"/"his"/"her" means the protagonist; the
protagonist is named at the first mention and whenever the previous sentence did not mention them.

Canonical solution: the target is a function of the meaning alone
------------------------------------------------------------------
The steps follow the story's *time order*, whatever order the text tells it in: the start's product
(``prod``: ``c*e``; ``times``: ``k*a``), then each event in time order (a product ``c*e`` right before the sum or
difference that uses it, the running amount always first: ``s+x``, ``s-x``), then the final (``share`` /
``groups``: ``s/d``; ``compare``: the other person's product first when there is one, then the larger amount
minus the smaller; ``goal``: ``T-s``). Products are always *number of groups* times *amount per group*: boxes x
box size, items x price, hours x speed or pay, days x amount per day, people x amount each, laps x lap length.
So all problems with the same key (the meaning) have the same target however they are worded, and a question
has exactly one correct target text.

Grammar: the choice points (each problem records the productions it used in :attr:`WordyProblem.productions`)
------------------------------------------------------------------------------------------------------------
* **placement** of the question: ``place.last`` (the story, then the question), ``place.if_setup`` ("If Tom has
  23 apples, buys ... and gives ..., how many ...?", coordinated with ``if.and`` / ``if.and_then``),
  ``place.question_if`` (the question first, the whole story in its if-clause: "How many apples does Tom have
  now if he has 23 apples, buys ... and gives ...?"), ``place.if_final`` (the story, then "If he shares all his
  apples equally among his 4 friends, how many ...?"; also for the other person's amount and the goal), and the
  held-out ``place.question_first``;
* **tense** of the story: ``tense.present`` / ``tense.past`` (questions follow it, or ask about "now");
* **frames** of the start, events and final: ``start.<domain>.<frame>`` ("Tom has 23 apples", "There are 23
  apples in Tom's basket", "Tom starts the day with ...", "Tom keeps ... in his ...", "Tom has a collection of
  ...", "Tom has saved ...", "Tom has already cycled ..."), ``start.times.fact`` with ``times.before`` /
  ``times.after``, ``ev.<domain>.<kind>.<frame>`` (e.g. receive: "Ann gives him 5 apples" / "he gets 5 apples
  from Ann"; give: "he gives 5 apples to Ann" / "he gives Ann 5 of his apples" / "he gives away 5 of his apples
  to Ann" / "Ann takes 5 of his apples"; lose: "5 of his apples get lost"; collect: "he adds 5 stamps to his
  collection"; things as the subject of a passive: "5 of his apples are given to Ann / are eaten / are used /
  are sold" (``ev.objects.<kind>.passive``); money: "he buys a lamp for 9 dollars" / "he pays 9 dollars for a lamp" / "a lamp costs 9
  dollars" + "he buys a lamp"; ...), ``final.<share|groups>.<frame>`` ("he shares all his apples equally among
  his 4 friends", "... between ...", "he gives all his apples to his 4 friends so that each gets the same
  number", "he puts all his apples equally into 4 baskets", "he packs them into bags of 6", "he fills bags
  that hold 6 apples each with all his apples", "he spends all his money on pens that cost 3 dollars each",
  ...) told as a story clause (``final.clause``), with "wants to" (``final.wants``), inside the question
  ("How many apples does each friend get if he shares ...?", ``final.in_question``) or as ``place.if_final``;
  each frame draws its verb from synonyms (gets/receives, buys/purchases, finds/picks up/comes across,
  gives/hands/sends, saves/puts away/sets aside, ...);
* **group phrases** (``pk.*``): "4 bags of 6 apples", "4 bags with 6 apples in each", "4 bags that hold 6 apples
  each", "4 bags of apples with 6 in each", or a separate fact ("Each bag holds 6 apples." / "There are 6 apples
  in each bag." / "A bag of flour weighs 6 kg.") that ``fact.before`` / ``fact.after`` / ``fact.start`` places
  before or after its sentence or at the start of the story;
* **rates** (``rate.*``): "for 3 hours at 8 km per hour", "at 8 km an hour for 3 hours", "for 3 hours at a
  speed of 8 km per hour", "3 laps of a track that is 8 km long", "6 pages a day for 4 days", "every day",
  "for 4 days, ... each day" (fronted by ``adv.front``), "4 chapters of 6 pages each", "4 songs that last 6
  minutes each", and facts ("His speed is 8 km per hour.", "One lap of the track is 8 km.", "Each chapter has
  6 pages.");
* **joins** of consecutive clauses (``join.*``): separate sentences (``join.sentence``) opened by a connective
  (``conn.none``, ``conn.then``, ``conn.after_that``, ``conn.later``, ``conn.next``, ``conn.afterwards``,
  ``conn.finally``), coordination ("... and ...", "..., and then ...": ``join.and``, ``join.and_then``,
  ``join.list3``), "After buying 4 bags of apples, he ..." (``join.after_pre``) and "He ... before giving 5
  apples to Ann." (``join.before_post``), with a gerund when both clauses are the protagonist's and a finite
  clause otherwise; and, for the last two clauses of the story only, against time order in two main clauses:
  "He gives 5 apples to Ann. Before that, he buys 4 bags of 6 apples." (``join.before_that``) and "He gives 5
  apples to Ann, but first he buys 4 bags of 6 apples." (``join.but_first``) (a "Then" after either would be
  ambiguous, so nothing follows them);
* **time adverbs** of progress stories (``time.days`` "on Monday, ... on Tuesday", ``time.parts`` "in the
  morning ... in the afternoon", ``time.none``), at the end or fronted (``adv.end``, ``adv.front``);
* the final's **facts**: the other person's amount (``cmp.start``, ``cmp.end``) and the goal (``goal.*``
  frames, ``gfact.start``, ``gfact.end``, or "How many more apples does he need to have 80?",
  ``goal.in_question``);
* **question forms** (``ask.<final>.<form>``, more than 30): "How many apples does he have now / in the end /
  left?", "... end up with?", "What is the number of apples that he has now?", "How much money ...?", "How
  many km does he cycle in total / altogether?", "How far ...?", "How many apples does each friend get /
  receive?", "... each of them ...?", "How many apples are there in each basket / go into each basket?", "How
  many bags does he fill / need?", "How many pens does he buy / can he buy?", "How many more (fewer) apples
  does he have than Ann?", "How many apples more than Ann does he have?", "How many more apples does Ann have
  than him?", "What is the difference between ...?", "How many more apples does he need?", "How many apples
  short of his goal is he?", "How many pages does she still have to read?", ...; and, for the story placed
  last, a statement with the wh-clause in statement word order (``ask.wants_to_know``:
  "Tom wants to know / asks / wonders how many apples he has now.", "The question is how many ...");
* **distractors** (``dis.<kind>``), placed by ``dis.start`` / ``dis.middle`` / ``dis.end``; an age of a person
  of the story may instead be a relative clause at the end of that person's sentence ("... to Ann, who is 9
  years old.", ``rel.distractor``).

Held-out productions (:data:`HELD_OUT`), used by the generalisation split only
-----------------------------------------------------------------------------
* ``place.question_first``: the question comes before the story ("How many apples does Tom have now? He had
  23 apples. ..."); ``train`` asks first only with the whole story in the question's if-clause
  (``place.question_if``);
* ``ask.embedded``: the question is an imperative with an embedded wh-clause in statement word order, ending
  in a full stop ("Work out / Find out / Calculate / Figure out how many apples Tom has now."); ``train`` has
  such clauses only after a statement (``ask.wants_to_know``: "Tom wonders how many apples he has now.");
* ``frame.passive``: passive transfers with the protagonist as subject ("he is given 5 apples by Ann", "she is
  sent 3 boxes of 6 cards by Ben", "he is paid 8 dollars an hour for 4 hours of walking dogs", "she is given 5
  dollars a week by Ann for 6 weeks"); the only other passives have the protagonist's things as subject ("5 of
  his apples are given to Ann");
* ``rel.operand``: a non-restrictive who-relative clause that carries a number of the solution ("Tom, who has
  23 apples, buys ...", "Tom has 3 times as many shells as Ann, who has 6.", "How many more apples does Tom
  have than Ann, who has 30?"); ``train`` sees who-relatives only as ``rel.distractor`` ("..., who is 9 years
  old"), whose number is never used;
* ``join.after_post``: a later event first, the earlier one in a trailing after-clause ("He gives 5 apples to
  Ann after buying 4 bags of 6 apples.");
* ``join.before_pre``: a later event in a leading before-clause, then the earlier one ("Before giving 5 apples
  to Ann, he buys 4 bags of 6 apples.").

The last two tell two events against their time order, so the order of the numbers in the text differs from
the order of the steps; ``train`` has after- and before-clauses only in time order (``join.after_pre``,
``join.before_post``), and tells events against time order only in two main clauses that end the story
(``join.before_that``, ``join.but_first``).

Each held-out production but ``rel.operand`` has a *sibling* in the trained grammar (named above): a different
construction that needs the same reading skill (find the question wherever it is; read a wh-clause in
statement order; take a passive's subject as the thing moved; put the steps in time order when the text does
not). The siblings widen what the training distribution covers while the held-out constructions themselves stay
unseen; bundled model v3, trained without them, scores 30.4% AR greedy on ``generalisation`` and v4, trained with
them on the same budget, 54.8% (the model card has the figures per production: they helped most where the skill is
where to look, question placement and statement word order). The held-out frames are new constructions of known words: up to inflection, the only
words of generalisation questions that training questions lack are "calculate" and "figure" (two of the
embedded question's lead verbs); the tests check this on samples.

Why no training problem can contain them: every choice between productions goes through one method
(``_Story.pick``), which drops the held-out names from the options unless the split is ``generalisation``, and
the text of a held-out production is written only by the branch that picked it. So a ``train``, ``validation``
or ``test`` problem cannot contain a held-out frame, for any seed. For a ``generalisation`` problem one of the
held-out productions that its meaning allows is drawn first (question-first and embedded questions always fit;
the others need a receiving event; a start or comparison with an amount; or two events, or an event before a
share or groups final) and taken at its first choice point; other held-out productions may follow at a lower
rate, and the problem is reworded in the rare case that none reached the text. The tests check this on the
recorded productions and, independently, on the text with one regular expression per held-out production.

Splits
------
A problem's key names its meaning (domain, shape, kinds, people, things, numbers and distractors), not its
wording. The split of a key is fixed by ``sha256(key)`` (bucket mod 100: ``test`` < 5, ``validation`` < 10,
``generalisation`` < 15, ``train`` otherwise), so the four splits never share a meaning, for any seeds, and in
addition only ``generalisation`` is worded with held-out productions. :func:`generate` draws meanings,
rejects those of other splits or already drawn before wording them, and balances the levels as
:func:`s2d2.evaluation.tasks.arith.generate` does. 10,000 ``train`` problems take about a second; the other splits, 17 times
rarer, about 0.6 s per 1,000.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from itertools import product
from typing import Callable, Iterable, Sequence

from s2d2.evaluation.tasks import arith
from s2d2.evaluation.tasks.arith import (
    CURRENCIES,
    FEMALE_NAMES,
    ITEMS,
    MALE_NAMES,
    MAX_ADD_OPERAND,
    THINGS,
    Chain,
    Problem,
    Reject,
    is_correct,
    make_key,
)

__all__ = [
    "WordyProblem",
    "SPLITS",
    "LEVELS",
    "DOMAINS",
    "HELD_OUT",
    "generate",
    "split_of",
    "is_correct",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test", "generalisation")
LEVELS: tuple[int, ...] = (1, 2, 3, 4)
DOMAINS: tuple[str, ...] = ("objects", "money", "mass", "progress")

#: The productions used only by the ``generalisation`` split, with what each one writes.
HELD_OUT: dict[str, str] = {
    "place.question_first": "the question before the story",
    "ask.embedded": "an imperative with an embedded wh-clause ('Work out how many apples Tom has now.')",
    "frame.passive": "a passive transfer with the protagonist as subject ('he is given 5 apples by Ann')",
    "rel.operand": "a who-relative clause carrying a number of the solution ('Tom, who has 23 apples, ...')",
    "join.after_post": "a later event, then the earlier one in a trailing after-clause",
    "join.before_pre": "a later event in a leading before-clause, then the earlier one",
}

_SPLIT_BOUNDS = (("test", 5), ("validation", 10), ("generalisation", 15))


def split_of(key: str) -> str:
    """The split (one of :data:`SPLITS`) that a problem key belongs to (hash buckets 5 / 5 / 5 / 85)."""
    return arith.split_of(key, _SPLIT_BOUNDS)


@dataclass(frozen=True)
class WordyProblem(Problem):
    """A :class:`~s2d2.evaluation.tasks.arith.Problem` with the grammar productions its question used and the numbers of
    its distractor sentences (which never occur in the solution). ``template`` names the meaning's shape
    (``wordy:<domain>:<start>:<events>:<final>``); ``entities`` and ``numbers`` complete the meaning."""

    productions: tuple[str, ...] = ()
    distractors: tuple[int, ...] = ()


# --------------------------------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------------------------------

BASE, PRES, PAST, GER, PP = range(5)
_Verb = tuple[str, str, str, str, str]


def _verb(base: str, past: str = "", pp: str = "", ger: str = "", pres: str = "") -> _Verb:
    """(base, 3rd person present, past, gerund, past participle); irregular forms name the head word only."""
    head, _, tail = base.partition(" ")
    tail = " " + tail if tail else ""
    cons_y = head.endswith("y") and head[-2:-1] not in ("a", "e", "i", "o", "u")
    if not pres:
        if head.endswith(("s", "sh", "ch", "x", "z", "o")):
            pres = head + "es"
        else:
            pres = head[:-1] + "ies" if cons_y else head + "s"
    if not past:
        past = head + "d" if head.endswith("e") else (head[:-1] + "ied" if cons_y else head + "ed")
    if not ger:
        ger = head[:-1] + "ing" if head.endswith("e") and not head.endswith("ee") else head + "ing"
    pp = pp or past
    return (base, pres + tail, past + tail, ger + tail, pp + tail)


_V: dict[str, _Verb] = {
    "have": ("have", "has", "had", "having", "had"),
    "be": ("be", "is", "was", "being", "been"),
    "there be": ("be", "are", "were", "being", "been"),  # with a plural subject
    "get lost": ("get lost", "get lost", "got lost", "getting lost", "got lost"),  # with a plural subject
    "be given": ("be given", "is given", "was given", "being given", "been given"),
    "be handed": ("be handed", "is handed", "was handed", "being handed", "been handed"),
    "be sent": ("be sent", "is sent", "was sent", "being sent", "been sent"),
    "be paid": ("be paid", "is paid", "was paid", "being paid", "been paid"),
    # passives with a plural subject, the things ("5 of his apples are sold"): never the protagonist
    **{f"be {pp} pl": (f"be {pp}", f"are {pp}", f"were {pp}", f"being {pp}", f"been {pp}")
       for pp in ("given", "eaten", "used", "sold")},
    **{b: _verb(b) for b in (
        "hand", "receive", "purchase", "pick", "pick up", "collect", "gather", "bake", "add", "use", "use up",
        "earn", "save", "donate", "start", "share", "divide", "pack", "fill", "want", "walk", "cycle", "hike",
        "skate", "play", "work", "order", "practise", "practise the piano", "practise the violin", "hand out")},
    "give": _verb("give", "gave", "given", "giving"),
    "give away": _verb("give away", "gave", "given", "giving"),
    "get": _verb("get", "got", "got", "getting"),
    "buy": _verb("buy", "bought", "bought"),
    "find": _verb("find", "found", "found"),
    "make": _verb("make", "made", "made"),
    "win": _verb("win", "won", "won", "winning"),
    "lose": _verb("lose", "lost", "lost", "losing"),
    "eat": _verb("eat", "ate", "eaten"),
    "sell": _verb("sell", "sold", "sold"),
    "take": _verb("take", "took", "taken", "taking"),
    "put away": _verb("put away", "put", "put", "putting"),
    "put": _verb("put", "put", "put", "putting"),
    "spend": _verb("spend", "spent", "spent"),
    "pay": _verb("pay", "paid", "paid"),
    "keep": _verb("keep", "kept", "kept"),
    "begin": _verb("begin", "began", "begun", "beginning"),
    "split": _verb("split", "split", "split", "splitting"),
    "run": _verb("run", "ran", "run", "running"),
    "jog": _verb("jog", "jogged", "jogged", "jogging"),
    "swim": _verb("swim", "swam", "swum", "swimming"),
    "read": _verb("read", "read", "read"),
    "write": _verb("write", "wrote", "written", "writing"),
    "bring": _verb("bring", "brought", "brought"),
    "send": _verb("send", "sent", "sent"),
    "come across": _verb("come across", "came", "come", "coming"),
    "set aside": _verb("set aside", "set", "set", "setting"),
}

_PP = {"eat": "eaten", "use": "used", "sell": "sold"}
_MALES: tuple[str, ...] = MALE_NAMES + ("Adam", "Dev", "Felix", "Oscar", "Theo", "Kai", "Raj", "Tariq", "Wei", "Arjun")
_FEMALES: tuple[str, ...] = FEMALE_NAMES + ("Amira", "Bea", "Clara", "Dina", "Eva", "Freya", "Keiko", "Mei", "Olga",
                                            "Tara")
_HE, _SHE = ("he", "his", "him"), ("she", "her", "her")

_PLURAL = {"bag": "bags", "box": "boxes", "basket": "baskets", "crate": "crates", "bowl": "bowls", "jar": "jars",
           "tin": "tins", "tray": "trays", "carton": "cartons", "pack": "packs", "sheet": "sheets",
           "bucket": "buckets", "sack": "sacks", "envelope": "envelopes"}


@dataclass(frozen=True)
class _Obj:
    plural: str
    containers: tuple[str, ...]
    gains: tuple[str, ...]  # event kinds that add: receive buy pick bake collect find win
    losses: tuple[str, ...]  # event kinds that take away: give lose eat use sell
    use_for: str = ""  # purpose phrase for "use"

    @property
    def name(self) -> str:
        return self.plural

    @property
    def hobby(self) -> bool:
        """Whether people keep a collection of them."""
        return self.plural in _HOBBIES


def _obj(plural: str, containers: str, gains: str, losses: str, use_for: str = "") -> _Obj:
    return _Obj(plural, tuple(containers.split()), tuple(gains.split()), tuple(losses.split()), use_for)


_HOBBIES = frozenset({"stickers", "stamps", "cards", "marbles", "shells", "pebbles", "feathers", "acorns", "postcards",
                      "badges", "toy cars"})
_OBJECTS: tuple[_Obj, ...] = (
    _obj("apples", "bag box basket crate", "buy pick receive", "eat give sell"),
    _obj("oranges", "bag box crate basket", "buy pick receive", "eat give sell"),
    _obj("pears", "bag basket box", "buy pick receive", "eat give sell"),
    _obj("plums", "bag basket bowl", "buy pick receive", "eat give sell"),
    _obj("lemons", "bag basket crate", "buy pick receive", "use give sell", "to make lemonade"),
    _obj("strawberries", "basket box bowl", "buy pick receive", "eat give sell"),
    _obj("cookies", "box jar tin tray", "buy bake receive", "eat give sell"),
    _obj("muffins", "box tray basket", "buy bake receive", "eat give sell"),
    _obj("cupcakes", "box tray", "buy bake receive", "eat give sell"),
    _obj("candies", "bag jar box", "buy receive win", "eat give"),
    _obj("eggs", "carton box basket", "buy collect receive", "use give sell", "to bake a cake"),
    _obj("stickers", "pack sheet", "buy receive win collect", "use give lose", "to decorate a card"),
    _obj("stamps", "pack sheet", "buy receive collect", "use give lose", "on letters"),
    _obj("cards", "pack box", "buy receive win", "give lose sell"),
    _obj("marbles", "bag jar tin box", "buy receive win find", "give lose"),
    _obj("shells", "bag bucket jar", "collect find receive", "give lose"),
    _obj("pebbles", "bag bucket jar", "collect find receive", "give lose"),
    _obj("feathers", "bag box", "collect find receive", "give lose use", "to make a hat"),
    _obj("acorns", "bag bucket basket", "collect find receive", "give lose"),
    _obj("beads", "bag box jar", "buy receive find", "use give lose", "to make a necklace"),
    _obj("buttons", "box jar tin", "buy receive find", "use give lose", "to make a picture"),
    _obj("pencils", "box pack", "buy receive find", "give lose"),
    _obj("crayons", "box pack", "buy receive", "give lose"),
    _obj("balloons", "pack bag", "buy receive", "give lose"),
    _obj("postcards", "pack box", "buy receive collect", "give sell"),
    _obj("badges", "box bag", "buy receive win collect", "give lose"),
    _obj("toy cars", "box bag", "buy receive win", "give lose sell"),
)
_OBJ_VERB = {"buy": ("buy", "purchase"), "pick": ("pick",), "bake": ("bake", "make"), "collect": ("collect", "gather"),
             "find": ("find", "pick up"), "win": ("win",), "eat": ("eat",), "use": ("use", "use up"),
             "sell": ("sell",)}


@dataclass(frozen=True)
class _Stuff:
    name: str
    use_for: str
    containers: tuple[str, ...]


_STUFF: tuple[_Stuff, ...] = (
    _Stuff("flour", "to bake bread", ("bag", "sack")),
    _Stuff("rice", "to cook dinner", ("bag", "sack")),
    _Stuff("sugar", "to make jam", ("bag", "box")),
    _Stuff("sand", "for a sandpit", ("bag", "sack")),
    _Stuff("soil", "for the garden", ("bag", "sack")),
    _Stuff("potatoes", "to make soup", ("bag", "sack", "crate")),
    _Stuff("bird seed", "to feed the birds", ("bag", "box")),
    _Stuff("clay", "to make pots", ("bag", "box")),
)


@dataclass(frozen=True)
class _Act:
    """A progress activity: its verb (with object), units, amount phrase and rate style."""

    name: str
    verbs: tuple[str, ...]
    units: tuple[str, ...]
    amount: str  # "{n} {u}" or "for {n} {u}"
    style: str  # "speed" (per hour), "daily" (per day) + group phrases
    group: tuple[str, str, str] = ("", "", "")  # (verb, "c <groups>" phrase, fact about one group)
    short: str = ""  # the verb without its object, for later mentions


_ACTS: tuple[_Act, ...] = (
    _Act("walk", ("walk", "hike"), ("km", "miles"), "{n} {u}", "speed"),
    _Act("run", ("run", "jog"), ("km", "miles"), "{n} {u}", "speed"),
    _Act("cycle", ("cycle",), ("km", "miles"), "{n} {u}", "speed"),
    _Act("skate", ("skate",), ("km",), "{n} {u}", "speed"),
    _Act("read", ("read",), ("pages",), "{n} {u}", "daily",
         ("read", "{c} chapters of {e} pages each", "each chapter {has} {e} pages")),
    _Act("write", ("write",), ("pages", "lines"), "{n} {u}", "daily"),
    _Act("piano", ("practise the piano",), ("minutes",), "for {n} {u}", "daily",
         ("play", "{c} songs that {last} {e} minutes each", "each song {lasts} {e} minutes"), "practise"),
    _Act("violin", ("practise the violin",), ("minutes",), "for {n} {u}", "daily",
         ("play", "{c} pieces that {last} {e} minutes each", "each piece {lasts} {e} minutes"), "practise"),
    _Act("swim", ("swim",), ("laps", "lengths"), "{n} {u}", "daily",
         ("swim", "{c} sets of {e} {u}", "each set {has} {e} {u}")),
)

_MEMBERS: tuple[tuple[str, str], ...] = (("friend", "friends"), ("cousin", "cousins"), ("classmate", "classmates"),
                                         ("neighbour", "neighbours"), ("teammate", "teammates"))
_JOBS = ("washing cars", "walking dogs", "selling lemonade", "helping in the garden", "mowing lawns",
         "delivering newspapers")
_MONEY_ITEMS = ITEMS + (("comic", "comics"), ("pencil case", "pencil cases"), ("puzzle", "puzzles"))
_GOAL_THINGS = THINGS + ("skateboard", "guitar", "tent", "camera", "scooter")
_OTHER_PEOPLE = ("sister", "brother", "cousin")
_PETS = ("dog", "cat", "rabbit", "parrot")
_PLACES = ("shop", "library", "market", "museum", "pool")
_DESTINATIONS = ("school", "park", "library", "station")


# --------------------------------------------------------------------------------------------------------------
# Meanings
# --------------------------------------------------------------------------------------------------------------

_COST = {"have": 0, "prod": 1, "times": 1, "add": 1, "sub": 1, "add_prod": 2, "sub_prod": 2,
         "total": 0, "share": 1, "groups": 1, "compare": 1, "compare_prod": 2, "goal": 1}
_DOMAIN_SHAPES = {
    "objects": (("have", "prod", "times"), ("add", "sub", "add_prod", "sub_prod"),
                ("total", "share", "groups", "compare", "compare_prod", "goal")),
    "money": (("have", "prod", "times"), ("add", "sub", "add_prod", "sub_prod"),
              ("total", "share", "groups", "compare", "compare_prod", "goal")),
    "mass": (("have", "prod", "times"), ("add", "sub", "add_prod", "sub_prod"),
             ("total", "share", "groups", "compare", "compare_prod", "goal")),
    "progress": (("have", "prod"), ("add", "add_prod"), ("total", "compare", "compare_prod", "goal")),
}
_MAX_EVENTS = 4


def _shapes() -> dict[str, dict[int, list[tuple[str, tuple[str, ...], str]]]]:
    out: dict[str, dict[int, list[tuple[str, tuple[str, ...], str]]]] = {}
    for dom, (starts, events, finals) in _DOMAIN_SHAPES.items():
        by_level: dict[int, list[tuple[str, tuple[str, ...], str]]] = {lv: [] for lv in LEVELS}
        for k in range(_MAX_EVENTS + 1):
            for evs in product(events, repeat=k):
                for s in starts:
                    for f in finals:
                        lv = _COST[s] + sum(_COST[e] for e in evs) + _COST[f]
                        if lv in by_level:
                            by_level[lv].append((s, evs, f))
        out[dom] = by_level
    return out


_SHAPES = _shapes()
# dividends s with a divisor d and a quotient s/d both in 2..12
_NICE = tuple(sorted({d * q for d in range(2, 13) for q in range(2, 13)}))
_NICE_SET = frozenset(_NICE)


@dataclass
class _El:
    """One element of a story: its start, an event or its final."""

    shape: str
    kind: str = ""
    n: int = 0  # plain amount (have/add/sub), the other amount (compare), the goal (goal), the base (times)
    c: int = 0  # number of groups, multiplier (times), divisor (share) or group size (groups)
    e: int = 0  # amount per group
    who: str = ""  # another person
    noun: tuple[str, str] = ("", "")  # (singular, plural): a container, item, group of people, ...
    extra: str = ""  # a job, a thing, a verb kind, ...

    def desc(self) -> str:
        return "/".join((self.shape, self.kind, self.who, self.noun[1], self.extra))


@dataclass
class _Meaning:
    level: int
    domain: str
    lex: object  # _Obj, currency name, _Stuff or _Act
    unit: str
    p: str
    male: bool
    start: _El
    events: list[_El]
    final: _El
    distractors: list[tuple[str, int, str]]  # (kind, value, argument)
    steps: tuple[str, ...] = ()
    answer: int = 0
    before_final: int = 0  # the protagonist's amount when the final comes

    @property
    def elements(self) -> list[_El]:
        return [self.start, *self.events, self.final]

    @property
    def template(self) -> str:
        return f"wordy:{self.domain}:{self.start.shape}:{'.'.join(e.shape for e in self.events) or '-'}:" \
               f"{self.final.shape}"

    @property
    def entities(self) -> tuple[str, ...]:
        lex = self.lex if isinstance(self.lex, str) else self.lex.name  # type: ignore[attr-defined]
        return (self.p, lex, self.unit, *(e.desc() for e in self.elements),
                *(f"d/{k}/{a}" for k, _, a in self.distractors))

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(x for e in self.elements for x in (e.n, e.c, e.e)) + tuple(v for _, v, _ in self.distractors)

    @property
    def key(self) -> str:
        return make_key(self.template, self.entities, self.numbers)


def _kinds(domain: str, lex: object, shape: str) -> tuple[str, ...]:
    if domain == "objects":
        assert isinstance(lex, _Obj)
        if shape == "add":
            return lex.gains
        if shape == "sub":
            return lex.losses
        if shape == "add_prod":
            daily = tuple(k for k in lex.gains if k in ("pick", "bake", "collect", "find"))
            return ("receive_packs",) + (("buy_packs",) if "buy" in lex.gains else ()) + (("daily",) if daily else ())
        daily = tuple(k for k in lex.losses if k in ("eat", "use", "sell"))
        return ("give_each",) + (("sell_packs",) if "sell" in lex.losses else ()) + (("daily",) if daily else ())
    if domain == "money":
        return {"add": ("earn", "receive", "find", "win"), "sub": ("spend_on", "give", "donate", "lose"),
                "add_prod": ("earn_rate", "save_rate", "allowance"),
                "sub_prod": ("buy_items", "spend_rate", "give_each")}[shape]
    if domain == "mass":
        return {"add": ("buy", "receive", "deliver"), "sub": ("use", "sell", "give"),
                "add_prod": ("buy_bags", "receive_bags"), "sub_prod": ("use_rate", "sell_bags", "give_each")}[shape]
    return {"add": ("more",), "add_prod": ("rate",)}[shape]


class _Pool:
    """Draws distinct items of a sequence lazily. When all are taken, a strict pool rejects the meaning (a
    container or group named twice could get two different sizes); another one repeats an item."""

    __slots__ = ("rng", "items", "taken", "strict")

    def __init__(self, rng: random.Random, items: Sequence, strict: bool = False) -> None:
        self.rng, self.items, self.taken, self.strict = rng, items, set(), strict

    def take(self):  # noqa: ANN201 - the type of the items
        if len(self.taken) >= len(self.items):
            if self.strict:
                raise Reject
            return self.rng.choice(self.items)
        while True:
            x = self.rng.choice(self.items)
            if x not in self.taken:
                self.taken.add(x)
                return x


def _draw_meaning(rng: random.Random, level: int) -> _Meaning:
    domain = rng.choice(DOMAINS)
    shape = rng.choice(_SHAPES[domain][level])
    for _ in range(1000):
        try:
            return _build_meaning(rng, level, domain, shape)
        except Reject:
            pass
    raise RuntimeError(f"no numbers found for {domain} {shape}")  # pragma: no cover - every shape is feasible


def _build_meaning(rng: random.Random, level: int, domain: str,
                   shape: tuple[str, tuple[str, ...], str]) -> _Meaning:
    s_shape, ev_shapes, f_shape = shape
    male = rng.random() < 0.5
    p = rng.choice(_MALES if male else _FEMALES)
    names = _Pool(rng, _FEMALES if male else _MALES)  # the other gender: "he"/"she" is never ambiguous
    lex: object
    if domain == "objects":
        lex = rng.choice(_OBJECTS)
        unit = lex.plural
        conts = _Pool(rng, lex.containers, strict=True)
    elif domain == "money":
        lex = rng.choice(CURRENCIES)
        unit = lex
        conts = _Pool(rng, ("envelope", "jar", "tin"), strict=True)
    elif domain == "mass":
        lex = rng.choice(_STUFF)
        unit = "kg"
        conts = _Pool(rng, lex.containers, strict=True)
    else:
        lex = rng.choice(_ACTS)
        unit = rng.choice(lex.units)
        conts = _Pool(rng, ("bag",))
    members = _Pool(rng, _MEMBERS, strict=True)
    items = _Pool(rng, _MONEY_ITEMS)

    def container() -> tuple[str, str]:
        c = conts.take()
        return (c, _PLURAL[c])

    start = _El(s_shape)
    if s_shape == "prod":
        if domain == "money":
            start.kind = rng.choice(("earn_rate", "save_rate"))
        elif domain == "progress":
            start.kind = "rate"
        else:
            start.kind = "packs"
            start.noun = container()
    elif s_shape == "times":
        start.who = names.take()
    events = []
    for sh in ev_shapes:
        ev = _El(sh, rng.choice(_kinds(domain, lex, sh)))
        if ev.kind in ("receive", "give", "receive_packs", "allowance", "receive_bags"):
            ev.who = names.take()
        if ev.kind in ("buy_packs", "receive_packs", "sell_packs", "buy_bags", "receive_bags", "sell_bags"):
            ev.noun = container()
        elif ev.kind == "give_each":
            ev.noun = members.take()
        elif ev.kind == "buy_items":
            ev.noun = items.take()
        elif ev.kind == "daily":
            assert isinstance(lex, _Obj)
            pool = ("pick", "bake", "collect", "find") if sh == "add_prod" else ("eat", "use", "sell")
            ev.extra = rng.choice([k for k in (lex.gains if sh == "add_prod" else lex.losses) if k in pool])
        elif ev.kind in ("earn", "earn_rate"):
            ev.extra = rng.choice(_JOBS)
        elif ev.kind == "spend_on":
            ev.extra = rng.choice(_GOAL_THINGS)
        elif ev.kind == "spend_rate":
            ev.extra = rng.choice(("lunch", "bus fares", "snacks", "parking"))
        events.append(ev)
    final = _El(f_shape)
    if f_shape == "share":
        if domain in ("objects", "mass") and rng.random() < 0.4:
            final.kind, final.noun = "containers", container()
        else:
            final.kind, final.noun = "people", members.take()
    elif f_shape == "groups":
        if domain == "money":
            final.kind, final.noun = "items", items.take()
        else:
            final.kind, final.noun = "containers", container()
    elif f_shape in ("compare", "compare_prod"):
        final.who = names.take()
        if f_shape == "compare_prod" and domain != "progress":
            final.noun = container()
    elif f_shape == "goal" and domain == "money":
        final.extra = rng.choice(_GOAL_THINGS)
    if start.kind == "earn_rate":
        start.extra = rng.choice(_JOBS)

    m = _Meaning(level, domain, lex, unit, p, male, start, events, final, [])
    _sample_numbers(rng, m)
    _sample_distractors(rng, m, names)
    return m


def _sample_numbers(rng: random.Random, m: _Meaning) -> None:
    """Draws the numbers front to back within the rules (raising Reject to redraw) and records the steps."""
    els = m.elements
    fin = m.final.shape

    def need(i: int) -> str:  # what the amount after element i is used for
        if i + 1 < len(els) - 1:
            return "pm"
        return {"share": "div", "groups": "div", "total": "none"}.get(fin, "pm")

    ri = rng.randint
    st = m.start
    nd = need(0)
    if st.shape == "have":
        s = rng.choice([x for x in _NICE if x <= MAX_ADD_OPERAND]) if nd == "div" else ri(5, 95)
        st.n = s
    elif st.shape == "prod":
        st.c = ri(2, 12)
        st.e = ri(2, min(12, MAX_ADD_OPERAND // st.c) if nd == "pm" else 12)
        s = st.c * st.e
    else:  # times: k times a
        st.n = ri(2, 12)
        st.c = ri(2, min(12, MAX_ADD_OPERAND // st.n) if nd == "pm" else 12)
        s = st.c * st.n
    for i, ev in enumerate(m.events, start=1):
        nd = need(i)
        limit = {"pm": MAX_ADD_OPERAND, "div": 144, "none": 198}[nd]
        if ev.shape == "add":
            hi = min(MAX_ADD_OPERAND, limit - s)
            if nd == "div":
                cands = [x for x in _NICE if s + 2 <= x <= s + hi]
                if not cands:
                    raise Reject
                ev.n = rng.choice(cands) - s
            else:
                if hi < 2:
                    raise Reject
                ev.n = ri(2, hi)
            s += ev.n
        elif ev.shape == "sub":
            if s < 4:
                raise Reject
            if nd == "div":
                cands = [x for x in _NICE if 2 <= x <= s - 2]
                if not cands:
                    raise Reject
                ev.n = s - rng.choice(cands)
            else:
                ev.n = ri(2, s - 2)
            s -= ev.n
        elif ev.shape == "add_prod":
            ev.c = ri(2, 12)
            emax = min(12, (limit - s) // ev.c, MAX_ADD_OPERAND // ev.c)
            es = [e for e in range(2, emax + 1) if nd != "div" or s + ev.c * e in _NICE_SET]
            if not es:
                raise Reject
            ev.e = rng.choice(es)
            s += ev.c * ev.e
        else:  # sub_prod
            cmax = min(12, (s - 2) // 2)
            if cmax < 2:
                raise Reject
            ev.c = ri(2, cmax)
            emax = min(12, (s - 2) // ev.c)
            es = [e for e in range(2, emax + 1) if nd != "div" or s - ev.c * e in _NICE_SET]
            if not es:
                raise Reject
            ev.e = rng.choice(es)
            s -= ev.c * ev.e
    f = m.final
    m.before_final = s
    if fin in ("share", "groups"):
        ds = [d for d in range(2, 13) if s % d == 0 and 2 <= s // d <= 12]
        if not ds:
            raise Reject
        f.c = rng.choice(ds)
    elif fin == "compare":
        f.n = ri(2, MAX_ADD_OPERAND - 1)
        if f.n >= s:
            f.n += 1
    elif fin == "compare_prod":
        f.c = ri(2, 12)
        f.e = ri(2, min(12, MAX_ADD_OPERAND // f.c))
        if f.c * f.e == s:
            raise Reject
    elif fin == "goal":
        if s > MAX_ADD_OPERAND - 2:
            raise Reject
        f.n = ri(s + 2, MAX_ADD_OPERAND)

    ch = Chain()
    if st.shape == "have":
        s = st.n
    elif st.shape == "prod":
        s = ch.mul(st.c, st.e)
    else:
        s = ch.mul(st.c, st.n)
    for ev in m.events:
        if ev.shape == "add":
            s = ch.add(s, ev.n)
        elif ev.shape == "sub":
            s = ch.sub(s, ev.n)
        elif ev.shape == "add_prod":
            s = ch.add(s, ch.mul(ev.c, ev.e))
        else:
            s = ch.sub(s, ch.mul(ev.c, ev.e))
    if fin in ("share", "groups"):
        s = ch.div(s, f.c)
    elif fin == "compare":
        s = ch.sub(max(s, f.n), min(s, f.n))
    elif fin == "compare_prod":
        o = ch.mul(f.c, f.e)
        s = ch.sub(max(s, o), min(s, o))
    elif fin == "goal":
        s = ch.sub(f.n, s)
    if len(ch.steps) != m.level:  # pragma: no cover - the shape tables guarantee it
        raise AssertionError((m.template, ch.steps))
    m.steps, m.answer = tuple(ch.steps), s


_NUM_RE = re.compile(r"\d+")
# distractor kind -> (lowest value, highest value)
_DISTRACTOR_RANGES = {
    "age_p": (6, 14), "age_q": (6, 14), "relative_age": (2, 17), "pet_age": (2, 15), "other_has": (2, 60),
    "also_has": (2, 60), "class_size": (15, 32), "grade": (2, 6), "opens": (7, 11), "lives": (2, 9),
    "temperature": (12, 34), "walk_minutes": (5, 30),
}


def _sample_distractors(rng: random.Random, m: _Meaning, names: _Pool) -> None:
    count = rng.choice((0, 0, 0, 1, 1, 1, 1, 2, 2))
    if not count:
        return
    taken = {int(x) for s in m.steps for x in _NUM_RE.findall(s)}
    kinds = list(_DISTRACTOR_RANGES)
    if m.domain == "progress" and m.unit in ("km", "miles"):
        kinds.remove("lives")
    if m.unit == "minutes":
        kinds.remove("walk_minutes")
    if any(e.noun == ("classmate", "classmates") for e in m.elements):
        kinds.remove("class_size")
    people = [e.who for e in m.elements if e.who]
    for kind in rng.sample(kinds, count):
        lo, hi = _DISTRACTOR_RANGES[kind]
        for _ in range(20):
            x = rng.randint(lo, hi)
            if x not in taken:
                break
        else:
            continue
        taken.add(x)
        arg = ""
        if kind == "age_q":
            arg = rng.choice(people) if people and rng.random() < 0.7 else names.take()
        elif kind in ("other_has", "also_has"):
            obj = m.unit
            while obj == m.unit:
                obj = rng.choice(_OBJECTS).plural
            arg = f"{names.take()}/{obj}" if kind == "other_has" else obj
        elif kind == "relative_age":
            arg = rng.choice(_OTHER_PEOPLE)
        elif kind == "pet_age":
            arg = rng.choice(_PETS)
        elif kind == "opens":
            arg = rng.choice(_PLACES)
        elif kind in ("lives", "walk_minutes"):
            arg = rng.choice(_DESTINATIONS)
        m.distractors.append((kind, x, arg))


# --------------------------------------------------------------------------------------------------------------
# Realisation
# --------------------------------------------------------------------------------------------------------------

# placeholders for the protagonist, resolved left to right: the first mention is the name, later ones pronouns
S, O, G, N = "{S}", "{O}", "{G}", "{N}"
_REF_RE = re.compile(r"\{([SOGN])\}")


class _Cl:
    """A clause: subject, verb (all forms) and the rest; ``adv`` is an adverbial that may be fronted."""

    __slots__ = ("subj", "verb", "rest", "adv", "front", "role", "end", "rel", "dayok", "partok")

    def __init__(self, subj: str, verb: _Verb, rest: str, adv: str = "", front: bool = False, end: str = "",
                 dayok: bool = True) -> None:
        self.subj, self.verb, self.rest, self.adv, self.front, self.end = subj, verb, rest, adv, front, end
        self.role = "event"
        self.rel = ""  # a relative-clause subject NP replacing the protagonist's placeholder
        self.dayok = dayok and not adv  # may take "on Monday"
        self.partok = self.dayok  # may take "in the morning" (not when it lasts hours)

    @property
    def psub(self) -> bool:
        return self.subj == S

    def vp(self, form: int, adv: bool = True) -> str:
        s = self.verb[form] + (" " + self.rest if self.rest else "")
        return s + (" " + self.adv if adv and self.adv else "")

    def fin(self, form: int, subj: str = "", adv: bool = True) -> str:
        return f"{subj or self.rel or self.subj} {self.vp(form, adv)}"


@dataclass
class _Fact:
    text: str  # without the full stop, may start in lower case
    anchor: int  # index of the clause it belongs to, -1 for none
    where: str = ""  # "start", "before", "after", "end"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


class _Story:
    """Puts one meaning into words; every choice between productions goes through :meth:`pick`."""

    def __init__(self, m: _Meaning, rng: random.Random, gen: bool, target: str | None) -> None:
        self.m, self.rng, self.gen, self.target = m, rng, gen, target
        self.used: set[str] = set()
        self.t = PRES
        self.clauses: list[_Cl] = []
        self.facts: list[_Fact] = []
        self.pending_rel = ""
        self.pron = _HE if m.male else _SHE
        d = m.domain
        self.kg = rng.choice(("kg", "kilograms")) if d == "mass" else ""
        self.X = m.lex.name if d == "mass" else ""  # type: ignore[attr-defined]
        if d == "objects":
            self.U = m.unit
        elif d == "money":
            self.U = m.unit
        elif d == "mass":
            assert isinstance(m.lex, _Stuff)
            self.U = f"{self.kg} of {m.lex.name}"
        else:
            self.U = m.unit
        if d == "progress":
            assert isinstance(m.lex, _Act)
            self.act_verb = _V[rng.choice(m.lex.verbs)]

    # -- choices -------------------------------------------------------------------------------------------
    def pick(self, options: Sequence[tuple], record: bool = True) -> tuple:
        """One option ``(name, weight, ...)``: held-out names only in the generalisation split; a pending target
        production is taken as soon as it is offered."""
        if not self.gen:
            options = [o for o in options if o[0] not in HELD_OUT]
        else:
            options = [(o[0], o[1] * 0.3, *o[2:]) if o[0] in HELD_OUT and o[0] != self.target else o
                       for o in options]
        options = [o for o in options if o[1] > 0]
        if not options:  # pragma: no cover - every choice point offers a training option
            raise AssertionError("no production left")
        if self.target is not None:
            for o in options:
                if o[0] == self.target:
                    self.target = None
                    if record:
                        self.used.add(o[0])
                    return o
        x = self.rng.random() * sum(o[1] for o in options)
        for o in options:
            x -= o[1]
            if x < 0:
                break
        if record:
            self.used.add(o[0])
        return o

    def V(self, *names: str) -> _Verb:
        return _V[self.rng.choice(names)]

    def tt(self, pres: str, past: str) -> str:
        return pres if self.t == PRES else past

    def amt(self, n: int | str) -> str:
        """An amount of the story's quantity ("23 apples", "23 kg of flour", "for 23 minutes")."""
        if self.m.domain == "progress":
            assert isinstance(self.m.lex, _Act)
            return self.m.lex.amount.format(n=n, u=self.m.unit)
        return f"{n} {self.U}"

    def more(self) -> str:
        return self.rng.choice(("more ", "", "more "))

    # -- the story -------------------------------------------------------------------------------------------
    def run(self) -> str:
        m = self.m
        tgt = self.target
        has_action = m.final.shape in ("share", "groups")
        w_if_setup = 0.0 if tgt in ("join.after_post", "join.before_pre", "rel.operand") else 1.2
        w_if_final = 0.0 if m.final.shape == "total" or tgt in ("join.after_post", "join.before_pre") or (
            tgt == "rel.operand" and not m.events) else 1.2
        self.placement = self.pick([("place.last", 6.0), ("place.if_setup", w_if_setup),
                                    ("place.question_if", 0.8 * w_if_setup), ("place.if_final", w_if_final),
                                    ("place.question_first", 1.5)])[0]
        # the whole story inside one if-clause, before the question or after it
        self.if_story = self.placement in ("place.if_setup", "place.question_if")
        if self.placement in ("place.if_setup", "place.question_if", "place.if_final"):
            self.t = PRES
            self.used.add("tense.present")
        else:
            self.t = PRES if self.pick([("tense.present", 1), ("tense.past", 1)])[0] == "tense.present" else PAST
        # a final action must be a clause of the story when a held-out join or relative needs it
        self.force_action_clause = has_action and self.placement != "place.if_final" and (
            (tgt in ("join.after_post", "join.before_pre") and len(m.events) < 2)
            or (tgt == "rel.operand" and not m.events and m.start.shape == "have"))
        self.start()
        for ev in m.events:
            self.event(ev)
        question = self.final()
        if m.domain == "progress":
            self.time_adverbs()
        for f in self.facts:
            if not f.where:
                f.where = self.pick([("fact.before", 3), ("fact.after", 2), ("fact.start", 1)])[0][5:]
        if self.placement == "place.if_setup":
            sentences = [f.text for f in self.facts] + self.distractor_texts([]) + [f"if {self.if_body()}, {question}"]
        elif self.placement == "place.question_if":  # "How many ... if he has 23 apples and buys ...?", last
            sentences = [f.text for f in self.facts] + self.distractor_texts([]) + \
                        [f"{question[:-1]} if {self.if_body()}{question[-1]}"]
        else:
            sentences = self.story_sentences()
            if self.placement == "place.if_final":
                sentences.append(f"if {self.if_trigger}, {question}")
            elif self.placement == "place.question_first":
                sentences.insert(0, question)
            else:
                sentences.append(question)
        return self.resolve(sentences)

    # -- start ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        m, st = self.m, self.m.start
        d, U = m.domain, self.U
        # the relative clause needs a following clause of the protagonist: an event or the final's action
        can_rel = not self.if_story and bool(m.events or (
            m.final.shape in ("share", "groups") and self.placement != "place.if_final"))
        if st.shape == "have":
            n = st.n
            have = _V["have"]
            if d == "progress":
                act = self.act_verb
                opts = [("start.progress.seg", 3, lambda: _Cl(S, act, self.amt(n))),
                        ("start.progress.already", 1, lambda: _Cl(S, have, f"already {act[PP]} {self.amt(n)}",
                                                                  dayok=False))]
                rel_rest = f"{self.tt('has', 'had')} already {act[PP]} {self.amt(n)}"
            else:
                if d == "objects":  # a container that the story does not count in
                    used = {e.noun[0] for e in m.elements}
                    free = [c for c in m.lex.containers if c not in used] or ["room"]  # type: ignore[union-attr]
                    place = f"{G} {self.rng.choice(free)}"
                elif d == "money":
                    place = f"{G} {self.rng.choice(('wallet', 'piggy bank', 'purse'))}"
                else:
                    place = f"{G} {self.rng.choice(('shed', 'kitchen', 'garage', 'store room'))}"
                opts = [(f"start.{d}.has", 4, lambda: _Cl(S, have, f"{n} {U}")),
                        (f"start.{d}.keeps_in", 1, lambda: _Cl(S, self.V("keep", "have"), f"{n} {U} in {place}")),
                        (f"start.{d}.starts_with", 1, lambda: _Cl(S, self.V("start", "begin"),
                                                                  f"the {'week' if d == 'money' else 'day'} with "
                                                                  f"{n} {U}")),
                        (f"start.{d}.there_are", 1.5, lambda: _Cl("there", _V["there be"], f"{n} {U} in {place}"))]
                if d == "money":
                    opts.append(("start.money.saved", 1, lambda: _Cl(S, have, f"saved {n} {U}")))
                if d == "objects" and m.lex.hobby:  # type: ignore[union-attr]
                    opts.append(("start.objects.collection", 1, lambda: _Cl(S, have, f"a collection of {n} {U}")))
                rel_rest = f"{self.tt('has', 'had')} {n} {U}"
            if can_rel:
                opts.append(("rel.operand", 1.5, None))
            name, _, build = self.pick(opts)
            if name == "rel.operand":
                self.pending_rel = f"{N}, who {rel_rest},"
                return
            cl = build()
            cl.role = "start"
            self.clauses.append(cl)
        elif st.shape == "prod":
            cl, fact = self.prod_clause(st, start=True)
            cl.role = "start"
            self.add(cl, fact)
        else:  # times: k times as many as another person, who has a
            q, k, a = st.who, st.c, st.n
            have = _V["have"]
            if d == "objects":
                comp = f"{k} times as many {U} as {q}"
            elif d == "money":
                comp = self.rng.choice((f"{k} times as many {U} as {q}", f"{k} times as much money as {q}"))
            else:
                comp = f"{k} times as much {m.lex.name} as {q}"  # type: ignore[union-attr]
            opts = [("start.times.fact", 3, None), ("rel.operand", 1.5 if not self.if_story else 0,
                                                   None)]
            name = self.pick(opts)[0]
            if name == "rel.operand":
                unit = "" if d == "objects" else f" {U}"  # "as many shells as Ann, who has 6"
                cl = _Cl(S, have, f"{comp}, who {self.tt('has', 'had')} {a}{unit}")
                cl.role, cl.dayok = "start", False
                cl.end = "#closed"  # nothing may follow it in its sentence
                self.clauses.append(cl)
            else:
                cl = _Cl(S, have, comp)
                cl.role = "start"
                self.clauses.append(cl)
                where = self.pick([("times.before", 3), ("times.after", 1)])[0][6:]
                fact = self.rng.choice((f"{q} {self.tt('has', 'had')} {a} {U}",
                                        f"{q} {self.tt('owns', 'owned')} {a} {U}" if d == "objects" else
                                        f"{q} {self.tt('has', 'had')} {a} {U}"))
                self.facts.append(_Fact(fact, len(self.clauses) - 1, where))

    def add(self, cl: _Cl, fact: str = "") -> None:
        if self.pending_rel:
            cl.rel, self.pending_rel = self.pending_rel, ""
        self.clauses.append(cl)
        if fact:
            self.facts.append(_Fact(fact, len(self.clauses) - 1))

    # -- group phrases and rates ----------------------------------------------------------------------------
    def packs(self, c: int, e: int, noun: tuple[str, str], unit: str, of_only: bool = False) -> tuple[str, str]:
        """``c`` containers holding ``e`` each: (noun phrase, fact sentence or "")."""
        sg, pl = noun
        hold, there = self.tt("hold", "held"), self.tt("are", "were")
        if self.m.domain == "mass":
            X, kg = self.X, self.kg
            weighs = self.tt("weighs", "weighed")
            opts = [("pk.mass.of_that_weigh", 2, f"{c} {pl} of {X} that {self.tt('weigh', 'weighed')} {e} {kg} each",
                     ""),
                    ("pk.mass.with_in_each", 0 if of_only else 1, f"{c} {pl} of {X} with {e} {kg} in each", ""),
                    ("pk.mass.fact", 1.5, f"{c} {pl} of {X}",
                     self.rng.choice((f"each {sg} of {X} {weighs} {e} {kg}", f"a {sg} of {X} {weighs} {e} {kg}")))]
        else:
            money = self.m.domain == "money"  # "4 envelopes of 5 dollars" reads badly
            opts = [("pk.of", 0 if money else 2, f"{c} {pl} of {e} {unit}", ""),
                    ("pk.with_in_each", 0 if of_only else 1, f"{c} {pl} with {e} {unit} in each", ""),
                    ("pk.that_hold", 0 if of_only else 1, f"{c} {pl} that {hold} {e} {unit} each", ""),
                    ("pk.of_with", 0 if of_only or money else 1, f"{c} {pl} of {unit} with {e} in each", ""),
                    ("pk.fact", 1.5, f"{c} {pl} of {unit}",
                     self.rng.choice((f"each {sg} {self.tt('holds', 'held')} {e} {unit}",
                                      f"there {there} {e} {unit} in each {sg}")))]
        _, _, np, fact = self.pick(opts)
        return np, fact

    def rate(self, c: int, e: int, verb: _Verb, subj: str, groups: bool = True) -> tuple[_Cl, str]:
        """A progress segment of ``c`` periods or groups of ``e`` each."""
        act = self.m.lex
        assert isinstance(act, _Act)
        u = self.m.unit
        per = self.rng.choice(("per hour", "an hour"))
        # a fact about "the track", "each chapter", "his speed" is unambiguous only when there is one rate
        one = sum(e.shape in ("prod", "add_prod", "compare_prod") for e in self.m.elements) == 1
        if act.style == "speed":
            def hours(cl: _Cl) -> _Cl:
                cl.partok = False
                return cl
            opts = [("rate.for_at", 2, lambda: (hours(_Cl(subj, verb, f"for {c} hours at {e} {u} {per}")), "")),
                    ("rate.at_for", 1, lambda: (hours(_Cl(subj, verb, f"at {e} {u} {per} for {c} hours")), "")),
                    ("rate.speed", 1, lambda: (hours(_Cl(subj, verb, f"for {c} hours at a speed of {e} {u} "
                                                                     f"per hour")), "")),
                    ("rate.laps", 1, lambda: (_Cl(subj, verb, f"{c} laps of a track that {self.tt('is', 'was')} "
                                                              f"{e} {u} long", dayok=False), "")),
                    ("rate.fact_lap", 1 if one else 0, lambda: (_Cl(subj, verb, f"{c} laps of the track"),
                                                  f"one lap of the track {self.tt('is', 'was')} {e} {u}"))]
            if subj == S:
                opts.append(("rate.fact_speed", 1 if one else 0,
                             lambda: (hours(_Cl(subj, verb, f"for {c} hours")),
                                      f"{G} speed {self.tt('is', 'was')} {e} {u} per hour")))
        else:
            a = act.amount.format(n=e, u=u)
            opts = [("rate.a_day", 2, lambda: (_Cl(subj, verb, f"{a} a day for {c} days", dayok=False), "")),
                    ("rate.every_day", 1, lambda: (_Cl(subj, verb, f"{a} every day for {c} days", dayok=False), "")),
                    ("rate.each_day", 1, lambda: (_Cl(subj, verb, f"{a} each day", adv=f"for {c} days", front=True),
                                               ""))]
            if act.group[0] and groups:
                gv, phrase, fact = act.group
                conj = {"last": self.tt("last", "lasted"), "lasts": self.tt("lasts", "lasted"),
                        "has": self.tt("has", "had")}
                opts.append(("rate.groups", 1, lambda: (_Cl(subj, _V[gv], phrase.format(c=c, e=e, u=u, **conj)),
                                                        "")))
                np = phrase.split(" that ")[0].split(" of ")[0].split(" with ")[0]
                opts.append(("rate.fact_group", 1 if one else 0, lambda: (_Cl(subj, _V[gv], np.format(c=c)),
                                                            fact.format(e=e, u=u, **conj))))
        return self.pick(opts)[2]()

    def prod_clause(self, el: _El, start: bool = False) -> tuple[_Cl, str]:
        """The clause of a start or event that is ``c`` groups of ``e``."""
        d, U, c, e = self.m.domain, self.U, el.c, el.e
        if d == "progress":
            cl, fact = self.rate(c, e, self.act_verb, S)
            return cl, fact
        if d == "money":
            if el.kind == "earn_rate":
                job = el.extra
                opts = [("ev.money.earn_rate.an_hour", 2, lambda: _Cl(S, self.V("earn", "make"),
                                                                      f"{e} {U} an hour for {c} hours")),
                        ("ev.money.earn_rate.works", 1, lambda: _Cl(S, _V["work"], f"for {c} hours at {e} {U} an "
                                                                                   f"hour {job}")),
                        ("ev.money.earn_rate.job", 1, lambda: _Cl(S, _V["earn"], f"{e} {U} per hour {job} for "
                                                                  f"{c} hours")),
                        ("frame.passive", 1, lambda: _Cl(S, _V["be paid"], f"{e} {U} an hour for {c} hours of {job}"))]
                return self.pick(opts)[2](), ""
            if el.kind == "save_rate":
                opts = [("ev.money.save_rate.a_week", 2, lambda: _Cl(S, self.V("save", "put away", "set aside"),
                                                                     f"{e} {U} a week for {c} weeks")),
                        ("ev.money.save_rate.every_week", 1, lambda: _Cl(S, self.V("save", "put away"),
                                                                         f"{e} {U} every week for {c} weeks")),
                        ("ev.money.save_rate.each_week", 1, lambda: _Cl(S, _V["save"], f"{e} {U} each week",
                                                                    adv=f"for {c} weeks", front=True))]
                return self.pick(opts)[2](), ""
        np, fact = self.packs(c, e, el.noun, U)
        verb = self.V("have", "buy") if start else self.V("buy", "get")
        self.used.add(f"ev.{d}.packs.{verb[BASE]}")
        return _Cl(S, verb, np), fact

    # -- events -----------------------------------------------------------------------------------------------
    def event(self, ev: _El) -> None:
        d = self.m.domain
        need_p = bool(self.pending_rel)
        if d == "progress":
            opts = self.progress_event(ev)
        elif d == "money":
            opts = self.money_event(ev)
        elif d == "mass":
            opts = self.mass_event(ev)
        else:
            opts = self.objects_event(ev)
        if need_p:
            opts = [o for o in opts if o[3]]
        prefix = f"ev.{d}.{ev.kind}."
        opts = [((o[0] if "." in o[0] else prefix + o[0]), *o[1:]) for o in opts]
        res = self.pick(opts)[2]()
        cl, fact = res if isinstance(res, tuple) else (res, "")
        self.add(cl, fact)

    def objects_event(self, ev: _El) -> list[tuple]:
        U, n, c, e, q, k = self.U, ev.n, ev.c, ev.e, ev.who, ev.kind
        lex = self.m.lex
        assert isinstance(lex, _Obj)
        mo = self.more()
        V = self.V
        if k == "receive":
            return [("giver", 1, lambda: _Cl(q, V("give", "hand"), f"{O} {n} {mo}{U}"), False),
                    ("from", 1.5, lambda: _Cl(S, V("get", "receive"), f"{n} {mo}{U} from {q}", end=q), True),
                    ("frame.passive", 1, lambda: _Cl(S, V("be given", "be handed", "be sent"),
                                                     f"{n} {mo}{U} by {q}", end=q), True)]
        if k in ("buy", "pick", "bake", "collect", "find", "win"):
            verbs = _OBJ_VERB[k]
            place = {"buy": ("at the shop", "at the market"), "pick": ("in the garden", "at the farm"),
                     "bake": ("for a party", "in the evening"), "collect": ("at the weekend", "on a walk"),
                     "find": ("on the way home", "in the park"), "win": ("in a game", "at the fair")}[k]
            opts = [("verb", 2, lambda: _Cl(S, V(*verbs), f"{n} {mo}{U}"), True),
                    ("verb_place", 1, lambda: _Cl(S, V(*verbs), f"{n} {mo}{U} {self.rng.choice(place)}"), True)]
            if k == "collect" and lex.hobby:
                opts.append(("add_to", 1, lambda: _Cl(S, V("add"), f"{n} {U} to {G} collection"), True))
            if k == "find":
                opts.append(("comes_across", 1, lambda: _Cl(S, V("come across"), f"{n} {mo}{U}"), True))
            return opts
        if k == "give":
            return [("give_to", 2, lambda: _Cl(S, V("give", "hand", "send"), f"{n} {U} to {q}", end=q), True),
                    ("give_dative", 1, lambda: _Cl(S, V("give"), f"{q} {n} of {G} {U}"), True),
                    ("give_away", 1, lambda: _Cl(S, V("give away"), f"{n} of {G} {U} to {q}", end=q), True),
                    ("take", 1, lambda: _Cl(q, V("take"), f"{n} of {G} {U}"), False),
                    ("passive", 0.8, lambda: _Cl(f"{n} of {G} {U}", _V["be given pl"], f"to {q}", end=q), False)]
        if k == "lose":
            return [("verb", 2, lambda: _Cl(S, V("lose"), f"{n} {U}"), True),
                    ("verb_of", 1, lambda: _Cl(S, V("lose"), f"{n} of {G} {U}"), True),
                    ("get_lost", 1, lambda: _Cl(f"{n} of {G} {U}", _V["get lost"], ""), False)]
        if k in ("eat", "use", "sell"):
            verbs = _OBJ_VERB[k]
            opts = [("verb", 2, lambda: _Cl(S, V(*verbs), f"{n} {U}"), True),
                    ("verb_of", 1, lambda: _Cl(S, V(*verbs), f"{n} of {G} {U}"), True),
                    ("passive", 0.6, lambda: _Cl(f"{n} of {G} {U}", _V[f"be {_PP[k]} pl"], ""), False)]
            if k == "use" and lex.use_for:
                opts.append(("verb_for", 1, lambda: _Cl(S, V("use"), f"{n} {U} {lex.use_for}"), True))
            if k == "sell":
                opts.append(("verb_place", 1, lambda: _Cl(S, V("sell"), f"{n} of {G} {U} at the market"), True))
            return opts
        if k == "buy_packs":
            return [("buy", 1, lambda: self.prod_clause(ev), True)]
        if k == "receive_packs":
            def rp(frame: str) -> tuple[_Cl, str]:
                np, fact = self.packs(c, e, ev.noun, U, of_only=True)
                if frame == "giver":
                    return _Cl(q, V("give", "hand"), f"{O} {np}"), fact
                if frame == "from":
                    return _Cl(S, V("get", "receive"), f"{np} from {q}", end=q), fact
                return _Cl(S, V("be given", "be sent"), f"{np} by {q}", end=q), fact
            return [("giver", 1, lambda: rp("giver"), False), ("from", 1, lambda: rp("from"), True),
                    ("frame.passive", 1, lambda: rp("passive"), True)]
        if k == "sell_packs":
            def sp() -> tuple[_Cl, str]:
                np, fact = self.packs(c, e, ev.noun, U)
                return _Cl(S, V("sell", "give away"), np), fact
            return [("sell", 1, sp, True)]
        if k == "daily":
            verbs = _OBJ_VERB[ev.extra]
            return [("a_day", 2, lambda: _Cl(S, V(*verbs), f"{e} {U} a day for {c} days", dayok=False), True),
                    ("every_day", 1, lambda: _Cl(S, V(*verbs), f"{e} {U} every day for {c} days", dayok=False), True),
                    ("each_day", 1, lambda: _Cl(S, V(*verbs), f"{e} {U} each day", adv=f"for {c} days",
                                                 front=True), True)]
        # give_each
        mpl = ev.noun[1]
        return [("each_of", 1, lambda: _Cl(S, V("give"), f"each of {G} {c} {mpl} {e} {U}"), True),
                ("to_each", 1, lambda: _Cl(S, V("give", "hand out"), f"{e} {U} to each of {G} {c} {mpl}"), True),
                ("dative_each", 1, lambda: _Cl(S, V("give"), f"{G} {c} {mpl} {e} {U} each"), True)]

    def money_event(self, ev: _El) -> list[tuple]:
        U, n, c, e, q, k = self.U, ev.n, ev.c, ev.e, ev.who, ev.kind
        V = self.V
        mo = self.more()
        if k == "earn":
            job = ev.extra
            by = self.rng.choice(("", "by "))
            return [("by", 2, lambda: _Cl(S, V("earn", "make"), f"{n} {mo}{U} {by}{job}"), True),
                    ("for", 1, lambda: _Cl(S, V("get", "earn"), f"{n} {U} for {job}"), True)]
        if k == "receive":
            return [("giver", 1, lambda: _Cl(q, V("give", "hand"), f"{O} {n} {mo}{U}"), False),
                    ("from", 1.5, lambda: _Cl(S, V("get", "receive"), f"{n} {mo}{U} from {q}", end=q), True),
                    ("gift", 1, lambda: _Cl(S, V("get", "receive"), f"{n} {U} from {q} as a gift"), True),
                    ("frame.passive", 1, lambda: _Cl(S, V("be given", "be sent"), f"{n} {mo}{U} by {q}", end=q),
                     True)]
        if k == "find":
            where = self.rng.choice(("in an old coat", "on the street", "under the sofa"))
            return [("verb", 1, lambda: _Cl(S, V("find"), f"{n} {U} {where}"), True)]
        if k == "win":
            where = self.rng.choice(("in a contest", "in a quiz", "in a raffle"))
            return [("verb", 1, lambda: _Cl(S, V("win"), f"{n} {U} {where}"), True)]
        if k == "spend_on":
            th = ev.extra
            a = "an" if th[0] in "aeiou" else "a"
            return [("spend_on", 2, lambda: _Cl(S, V("spend"), f"{n} {U} on {a} {th}"), True),
                    ("buy_for", 1, lambda: _Cl(S, V("buy"), f"{a} {th} for {n} {U}"), True),
                    ("pay_for", 1, lambda: _Cl(S, V("pay"), f"{n} {U} for {a} {th}"), True),
                    ("fact", 1, lambda: (_Cl(S, V("buy"), f"{a} {th}"),
                                         f"{a} {th} {self.tt('costs', 'cost')} {n} {U}"), True)]
        if k == "give":
            return [("give_to", 2, lambda: _Cl(S, V("give", "hand", "send"), f"{n} {U} to {q}", end=q), True),
                    ("give_dative", 1, lambda: _Cl(S, V("give", "send"), f"{q} {n} {U}"), True)]
        if k == "donate":
            return [("donate", 1, lambda: _Cl(S, V("donate"), f"{n} {U} to a charity"), True),
                    ("give", 1, lambda: _Cl(S, V("give"), f"{n} {U} to charity"), True)]
        if k == "lose":
            where = self.rng.choice(("on the bus", "at the fair", "on the way home"))
            return [("verb", 1, lambda: _Cl(S, V("lose"), f"{n} {U} {where}"), True)]
        if k in ("earn_rate", "save_rate"):
            return [("rate", 1, lambda: self.prod_clause(ev), True)]
        if k == "allowance":
            return [("giver", 1, lambda: _Cl(q, V("give"), f"{O} {e} {U} a week for {c} weeks"), False),
                    ("from", 1, lambda: _Cl(S, V("get", "receive"), f"{e} {U} a week from {q} for {c} weeks"),
                     True),
                    ("frame.passive", 1, lambda: _Cl(S, V("be given", "be sent"),
                                                     f"{e} {U} a week by {q} for {c} weeks"), True)]
        if k == "buy_items":
            isg, ipl = ev.noun
            cost = self.tt("cost", "cost")
            a = "an" if isg[0] in "aeiou" else "a"
            return [("at_each", 2, lambda: _Cl(S, V("buy"), f"{c} {ipl} at {e} {U} each"), True),
                    ("that_cost", 1, lambda: _Cl(S, V("buy"), f"{c} {ipl} that {cost} {e} {U} each"), True),
                    ("for_each", 1, lambda: _Cl(S, V("buy"), f"{c} {ipl} for {e} {U} each"), True),
                    ("fact", 1.5, lambda: (_Cl(S, V("buy"), f"{c} {ipl}"), self.rng.choice((
                        f"{ipl} {cost} {e} {U} each", f"each {isg} {self.tt('costs', 'cost')} {e} {U}",
                        f"{a} {isg} {self.tt('costs', 'cost')} {e} {U}"))), True)]
        if k == "spend_rate":
            what = ev.extra
            return [("a_day", 2, lambda: _Cl(S, V("spend"), f"{e} {U} a day on {what} for {c} days", dayok=False),
                     True),
                    ("each_day", 1, lambda: _Cl(S, V("spend"), f"{e} {U} on {what} each day", adv=f"for {c} days",
                                                 front=True), True)]
        # give_each
        mpl = ev.noun[1]
        return [("each_of", 1, lambda: _Cl(S, V("give"), f"each of {G} {c} {mpl} {e} {U}"), True),
                ("to_each", 1, lambda: _Cl(S, V("give"), f"{e} {U} to each of {G} {c} {mpl}"), True)]

    def mass_event(self, ev: _El) -> list[tuple]:
        U, n, c, e, q, k = self.U, ev.n, ev.c, ev.e, ev.who, ev.kind
        lex = self.m.lex
        assert isinstance(lex, _Stuff)
        X, kg, V = lex.name, self.kg, self.V
        if k == "buy":
            return [("more", 2, lambda: _Cl(S, V("buy", "order"), f"{n} more {U}"), True),
                    ("another", 1, lambda: _Cl(S, V("buy", "get"), f"another {n} {kg} of {X}"), True)]
        if k == "receive":
            return [("giver", 1, lambda: _Cl(q, V("give", "bring"), f"{O} {n} {U}"), False),
                    ("from", 1.5, lambda: _Cl(S, V("get", "receive"), f"{n} {U} from {q}", end=q), True),
                    ("frame.passive", 1, lambda: _Cl(S, V("be given", "be sent"), f"{n} {U} by {q}", end=q),
                     True)]
        if k == "deliver":
            return [("truck", 1, lambda: _Cl("a truck", V("bring"), f"{O} {n} more {U}"), False),
                    ("delivery", 1.5, lambda: _Cl(S, V("get", "receive"), f"a delivery of {n} {U}"), True)]
        if k == "use":
            return [("purpose", 2, lambda: _Cl(S, V("use"), f"{n} {U} {lex.use_for}"), True),
                    ("verb", 1, lambda: _Cl(S, V("use", "use up"), f"{n} {U}"), True)]
        if k == "sell":
            return [("verb", 1, lambda: _Cl(S, V("sell"), f"{n} {U}"), True),
                    ("verb_place", 1, lambda: _Cl(S, V("sell"), f"{n} {U} at the market"), True)]
        if k == "give":
            return [("give_to", 2, lambda: _Cl(S, V("give"), f"{n} {U} to {q}", end=q), True),
                    ("give_dative", 1, lambda: _Cl(S, V("give"), f"{q} {n} {U}"), True)]
        if k == "buy_bags":
            return [("buy", 1, lambda: self.prod_clause(ev), True)]
        if k == "receive_bags":
            def rb(frame: str) -> tuple[_Cl, str]:
                np, fact = self.packs(c, e, ev.noun, U, of_only=True)
                if frame == "giver":
                    return _Cl(q, V("give", "bring"), f"{O} {np}"), fact
                if frame == "from":
                    return _Cl(S, V("get", "receive"), f"{np} from {q}"), fact
                return _Cl(S, V("be given", "be sent"), f"{np} by {q}"), fact
            return [("giver", 1, lambda: rb("giver"), False), ("from", 1, lambda: rb("from"), True),
                    ("frame.passive", 1, lambda: rb("passive"), True)]
        if k == "sell_bags":
            def sb() -> tuple[_Cl, str]:
                np, fact = self.packs(c, e, ev.noun, U)
                return _Cl(S, V("sell"), np), fact
            return [("sell", 1, sb, True)]
        if k == "use_rate":
            return [("a_day", 2, lambda: _Cl(S, V("use"), f"{e} {U} a day for {c} days", dayok=False), True),
                    ("each_day", 1, lambda: _Cl(S, V("use"), f"{e} {U} each day", adv=f"for {c} days", front=True),
                     True)]
        mpl = ev.noun[1]  # give_each
        return [("each_of", 1, lambda: _Cl(S, V("give"), f"each of {G} {c} {mpl} {e} {U}"), True),
                ("to_each", 1, lambda: _Cl(S, V("give"), f"{e} {U} to each of {G} {c} {mpl}"), True)]

    def progress_event(self, ev: _El) -> list[tuple]:
        n, act = ev.n, self.act_verb
        short = self.m.lex.short  # type: ignore[union-attr]
        if short and self.rng.random() < 0.6:
            act = _V[short]
        if ev.kind == "more":
            return [("another", 1, lambda: _Cl(S, act, self.amt(f"another {n}")), True),
                    ("more", 1, lambda: _Cl(S, act, self.amt(f"{n} more")), True),
                    ("further", 1, lambda: _Cl(S, act, self.amt(f"a further {n}")), True)]
        return [("rate", 1, lambda: self.prod_clause(ev), True)]

    def time_adverbs(self) -> None:
        cls = [c for c in self.clauses if c.role in ("start", "event")]
        ok = all(c.dayok for c in cls) and len(cls) >= 2
        parts_ok = ok and len(cls) <= 3 and all(c.partok for c in cls)
        name = self.pick([("time.none", 2), ("time.days", 1.5 if ok else 0), ("time.parts", 1.5 if parts_ok else 0)])[0]
        if name == "time.days":
            days = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
            first = self.rng.randint(0, 7 - len(cls))
            for i, c in enumerate(cls):
                c.adv = f"on {days[first + i]}"
        elif name == "time.parts":
            parts = ("in the morning", "in the afternoon", "in the evening")
            first = self.rng.randint(0, 3 - len(cls))
            for i, c in enumerate(cls):
                c.adv = parts[first + i]

    # -- final ----------------------------------------------------------------------------------------------
    def final(self) -> str:
        """Adds the final's clause or facts and returns the question (lower-case start, with its mark)."""
        f = self.m.final
        self.if_trigger = ""
        if f.shape in ("share", "groups"):
            return self.final_action()
        if f.shape in ("compare", "compare_prod"):
            return self.final_compare()
        if f.shape == "goal":
            return self.final_goal()
        return self.ask_total()

    def ask(self, direct: list[tuple[str, float, str]], embedded: str) -> str:
        """Picks a question form: the direct ones, a statement that someone wants to know (the embedded clause
        in statement word order, as a sentence of the story), or the held-out embedded imperative."""
        lead = self.rng.choice(("work out", "find out", "calculate", "figure out"))
        opts = list(direct) + [("ask.embedded", 1.0, f"{lead} {embedded}.")]
        if self.placement == "place.last":
            know = self.rng.choice((f"{S} {self.tt('wants', 'wanted')} to know", f"{S} {self.tt('asks', 'asked')}",
                                    f"{S} {self.tt('wonders', 'wondered')}", "the question is"))
            opts.append(("ask.wants_to_know", 0.8, f"{know} {embedded}."))
        return self.pick(opts)[2]

    def ask_total(self) -> str:
        m, U, t = self.m, self.U, self.t
        do = "does" if t == PRES else "did"
        has = self.tt("has", "had")
        if m.domain == "progress":
            v = self.act_verb
            fin = v[PRES] if t == PRES else v[PAST]
            direct = [("ask.total.in_total", 2, f"how many {U} {do} {S} {v[BASE]} in total?"),
                      ("ask.total.altogether", 1, f"how many {U} {do} {S} {v[BASE]} altogether?"),
                      ("ask.total.number", 1, f"what {self.tt('is', 'was')} the total number of {U} that {S} "
                                              f"{fin}?")]
            if U in ("km", "miles"):
                direct.append(("ask.total.how_far", 1, f"how far {do} {S} {v[BASE]} in total, in {U}?"))
            return self.ask(direct, f"how many {U} {S} {fin} in total")
        now = "now" if t == PRES else "in the end"
        direct = [("ask.total.have_now", 2, f"how many {U} does {S} have now?"),
                  ("ask.total.in_the_end", 1, f"how many {U} {do} {S} have in the end?"),
                  ("ask.total.end_up", 1, f"how many {U} {do} {S} end up with?"),
                  ("ask.total.number", 1, f"what {self.tt('is', 'was')} the number of {U} that {S} {has} {now}?")]
        if m.events and m.events[-1].shape in ("sub", "sub_prod"):
            direct.append(("ask.total.left", 2, f"how many {U} {do} {S} have left?"))
        if m.domain == "money":
            direct.append(("ask.total.how_much", 1, f"how much money {do} {S} have {now}?"))
        return self.ask(direct, f"how many {U} {S} {has} {now}")

    def final_action(self) -> str:
        """share / groups: the action as a clause of the story, inside the question or in an if-clause."""
        m, f = self.m, self.m.final
        d, U, x = m.domain, self.U, f.c
        V = self.V
        sg, pl = f.noun
        if d == "objects":
            allof = f"all {G} {U}"
        elif d == "money":
            allof = self.rng.choice((f"all {G} money", "all the money"))
        else:
            allof = f"all the {self.X}"
        fact = ""
        if f.shape == "share":
            if f.kind == "people":
                share = V("share", "divide", "split")
                opts = [("final.share.among", 2, share, f"{allof} equally among {G} {x} {pl}"),
                        ("final.share.between", 1, share, f"{allof} equally between {G} {x} {pl}"),
                        ("final.share.same_to_each", 1, V("give"), f"{allof} to {G} {x} {pl} so that each "
                                                                   f"{self.tt('gets', 'got')} the same "
                                                                   f"{'number' if d == 'objects' else 'amount'}")]
            else:
                opts = [("final.share.into", 1, V("put", "pack", "divide"), f"{allof} equally into {x} {pl}")]
        else:
            if d == "money":
                cost = self.tt("cost", "cost")
                opts = [("final.groups.spend_that_cost", 2, V("spend"), f"{allof} on {pl} that {cost} {x} {U} each"),
                        ("final.groups.spend_at", 1, V("spend"), f"{allof} on {pl} at {x} {U} each")]
                factopt = ("final.groups.fact", 1, V("spend"), f"{allof} on {pl}")
                factxt = self.rng.choice((f"{pl} {cost} {x} {U} each", f"each {sg} {self.tt('costs', 'cost')} {x} {U}"))
            else:
                unit = self.kg if d == "mass" else U
                hold = self.tt("hold", "held")
                opts = [("final.groups.into_of", 2, V("put", "pack"), f"{allof} into {pl} of {x} {unit}"),
                        ("final.groups.that_hold", 1, V("put", "pack"), f"{allof} into {pl} that {hold} {x} {unit} "
                                                                        f"each"),
                        ("final.groups.fill_with", 1, V("fill"), f"{pl} that {hold} {x} {unit} each with {allof}")]
                factopt = ("final.groups.fact", 1, V("put", "pack"), f"{allof} into {pl}")
                factxt = self.rng.choice((f"each {sg} {self.tt('holds', 'held')} {x} {unit}",
                                          f"there {self.tt('is', 'was')} room for {x} {unit} in each {sg}"))
            opts.append(factopt)
        name, _, verb, rest = self.pick(opts)
        if name == "final.groups.fact":
            fact = factxt
        # how the action is told: a clause of the story (maybe "wants to"), inside the question, or an if-clause
        if self.placement == "place.if_final":  # (a pending relative subject needs events, so none is pending)
            mode = "if"
        elif self.force_action_clause or self.pending_rel or self.if_story:
            mode = self.pick([("final.clause", 3), ("final.wants", 1)])[0][6:]
        else:
            mode = self.pick([("final.clause", 3), ("final.wants", 1), ("final.in_question", 1.5)])[0][6:]
        if mode == "wants":
            cl = _Cl(S, _V["want"], f"to {verb[BASE]} {rest}")
        else:
            cl = _Cl(S, verb, rest)
        cl.role = "final"
        if mode in ("clause", "wants"):
            self.add(cl, fact)
        elif fact:
            self.facts.append(_Fact(fact, -1, self.pick([("fact.start", 1), ("fact.end", 2)])[0][5:]))
        if mode == "if":
            self.if_trigger = cl.fin(PRES)
        do = "does" if self.t == PRES else "did"
        # "wants to ...": the question asks about what will (would) happen
        will = "" if mode != "wants" else "will" if self.t == PRES else "would"
        # the question
        if f.shape == "share" and f.kind == "people":
            get = will or do
            direct = [("ask.share.each_get", 2, f"how many {U} {get} each {sg} get?"),
                      ("ask.share.each_receive", 1, f"how many {U} {get} each {sg} receive?")]
            if d == "money":
                direct.append(("ask.share.how_much", 1, f"how much money {get} each {sg} get?"))
            emb = f"how many {U} each {sg} {will + ' get' if will else self.tt('gets', 'got')}"
            if mode in ("clause", "wants") and self.placement == "place.last" and not m.distractors:
                direct.append(("ask.share.each_of_them", 1, f"how many {U} {get} each of them get?"))
        elif f.shape == "share":
            are = f"{will} be" if will else self.tt("are", "were")
            there = f"{will} there be" if will else self.tt("are there", "were there")
            direct = [("ask.share.in_each", 2, f"how many {U} {there} in each {sg}?"),
                      ("ask.share.go_into", 1, f"how many {U} {will + ' go' if will else self.tt('go', 'went')} into "
                                               f"each {sg}?")]
            emb = f"how many {U} {are} in each {sg}"
        elif d == "money":
            direct = [("ask.groups.buy", 2, f"how many {pl} {will or do} {S} buy?"),
                      ("ask.groups.can_buy", 1, f"how many {pl} {self.tt('can', 'could')} {S} buy?")]
            emb = f"how many {pl} {S} {will + ' buy' if will else self.tt('buys', 'bought')}"
        else:
            aux = will or do
            direct = [("ask.groups.fill", 2, f"how many {pl} {aux} {S} fill?"),
                      ("ask.groups.need", 1, f"how many {pl} {aux} {S} need?")]
            emb = f"how many {pl} {S} {will + ' fill' if will else self.tt('fills', 'filled')}"
        if mode == "in_question":
            # "How many apples does each friend get if he shares all his apples equally among his 4 friends?"
            cond = f" if {cl.fin(self.t)}?"
            direct = [(nm, w, q[:-1] + cond) for nm, w, q in direct if "each_of_them" not in nm]
            emb += cond[:-1]
        return self.ask(direct, emb)

    def final_compare(self) -> str:
        m, f = self.m, self.m.final
        d, U, q, t = m.domain, self.U, f.who, self.t
        do = "does" if t == PRES else "did"
        # the other person's amount
        if f.shape == "compare":
            other = f.n
            if d == "progress":
                v = self.act_verb
                fact = f"{q} {v[t]} {self.amt(f.n)}"
                rel = f"{q}, who {v[t]} {self.amt(f.n)}"
            else:
                fact = f"{q} {self.tt('has', 'had')} {f.n} {U}"
                rel = f"{q}, who {self.tt('has', 'had')} {f.n}" + ("" if d == "objects" else f" {U}")
        else:
            other = f.c * f.e
            if d == "progress":
                cl, extra = self.rate(f.c, f.e, self.act_verb, q, groups=False)
                fact = cl.fin(t)
                if extra:
                    self.facts.append(_Fact(extra, -1, "start"))
            else:
                np, extra = self.packs(f.c, f.e, f.noun, U)
                fact = f"{q} {self.tt('has', 'had')} {np}"
                if extra:
                    self.facts.append(_Fact(extra, -1, "start"))
            rel = ""
        # where the other amount is told
        if self.placement == "place.if_final":
            where = "if"
            self.if_trigger = fact
        elif self.if_story:
            where = self.pick([("cmp.start", 1), ("cmp.end", 1)])[0][4:]
        else:
            where = self.pick([("cmp.start", 1), ("cmp.end", 1.5), ("rel.operand", 1 if rel else 0)])[0]
            where = "rel" if where == "rel.operand" else where[4:]
        if where in ("start", "end"):
            self.facts.append(_Fact(fact, -1, where))
        qn = rel if where == "rel" else q
        mine_more = m.before_final > other
        if d == "progress":
            v = self.act_verb[BASE]
            vf = self.act_verb[t]
            more = [("ask.compare.more_than", 2, f"how many more {U} {do} {S} {v} than {qn}?"),
                    ("ask.compare.more_than_front", 1, f"how many {U} more than {qn} {do} {S} {v}?")]
            fewer = [("ask.compare.fewer_than", 2, f"how many fewer {U} {do} {S} {v} than {qn}?"),
                     ("ask.compare.other_more", 1, f"how many more {U} {do} {q} {v} than {O}?")]
            emb_more = f"how many more {U} {S} {vf} than {qn}"
            emb_fewer = f"how many fewer {U} {S} {vf} than {qn}"
        else:
            has = self.tt("has", "had")
            more = [("ask.compare.more_than", 2, f"how many more {U} {do} {S} have than {qn}?"),
                    ("ask.compare.more_than_front", 1, f"how many {U} more than {qn} {do} {S} have?")]
            fewer = [("ask.compare.fewer_than", 2, f"how many fewer {U} {do} {S} have than {qn}?"),
                     ("ask.compare.other_more", 1, f"how many more {U} {do} {q} have than {O}?")]
            emb_more = f"how many more {U} {S} {has} than {qn}"
            emb_fewer = f"how many fewer {U} {S} {has} than {qn}"
            if where != "rel":
                if d == "objects":
                    what = f"number of {U} {S} {has} and the number {q} {has}"
                elif d == "money":
                    what = f"amount of money {S} {has} and the amount {q} {has}, in {U}"
                else:
                    what = f"amount of {self.X} {S} {has} and the amount {q} {has}, in {self.kg}"
                diff = ("ask.compare.difference", 1, f"what {self.tt('is', 'was')} the difference between the {what}?")
                more.append(diff)
                fewer.append(diff)
        if where == "rel":  # the relative clause must stay last: "... than Ann, who has 30?"
            more = [o for o in more if o[0] == "ask.compare.more_than"]
            fewer = [o for o in fewer if o[0] == "ask.compare.fewer_than"]
        return self.ask(more if mine_more else fewer, emb_more if mine_more else emb_fewer)

    def final_goal(self) -> str:
        m, f = self.m, self.m.final
        d, U, T, t = m.domain, self.U, f.n, self.t
        do = "does" if t == PRES else "did"
        wants = self.tt("wants", "wanted")
        if d == "progress":
            v = self.act_verb
            facts = [("goal.plans", 1, f"{S} {self.tt('plans', 'planned')} to {v[BASE]} {self.amt(T)} in all"),
                     ("goal.wants_week", 1, f"{S} {wants} to {v[BASE]} {self.amt(T)} this week")]
            if m.unit in ("km", "miles"):
                facts.append(("goal.route", 1.5, f"the whole route {self.tt('is', 'was')} {T} {U} long"))
            if m.lex.name == "read":  # type: ignore[union-attr]
                facts.append(("goal.book", 1.5, f"{G} book {self.tt('has', 'had')} {T} pages"))
            direct = [("ask.goal.still_have_to", 2, f"how many {U} {do} {S} still have to {v[BASE]}?"),
                      ("ask.goal.more_need", 1, f"how many more {U} {do} {S} need to {v[BASE]}?")]
            emb = f"how many more {U} {S} {self.tt('needs', 'needed')} to {v[BASE]}"
            inq = None
        else:
            if d == "money":
                th = f.extra
                a = "an" if th[0] in "aeiou" else "a"
                cost = self.tt("costs", "cost")
                facts = [("goal.buy_that_costs", 2, f"{S} {wants} to buy {a} {th} that {cost} {T} {U}"),
                         ("goal.saving_for", 1, f"{S} {self.tt('is', 'was')} saving up for {a} {th} that {cost} "
                                                f"{T} {U}"),
                         ("goal.costs_and", 0 if self.placement == "place.if_final" else 1,
                          f"{a} {th} {cost} {T} {U}, and {S} {wants} to buy one")]
                direct = [("ask.goal.more_need", 2, f"how many more {U} {do} {S} need?"),
                          ("ask.goal.more_need_to_buy", 1, f"how many more {U} {do} {S} need to buy the {th}?"),
                          ("ask.goal.how_much_more", 1, f"how much more money {do} {S} need?")]
                inq = None
            else:
                facts = [("goal.wants_to_have", 2, f"{S} {wants} to have {T} {U}"),
                         ("goal.aim", 1, f"{G} goal {self.tt('is', 'was')} to have {T} {U}"),
                         ("goal.needs", 1, f"{S} {self.tt('needs', 'needed')} {T} {U} in all")]
                direct = [("ask.goal.more_need", 2, f"how many more {U} {do} {S} need?"),
                          ("ask.goal.short", 1, f"how many {U} short of {G} goal {self.tt('is', 'was')} {S}?")]
                inq = ("ask.goal.in_question", f"how many more {U} {do} {S} need to have {T}?")
            emb = f"how many more {U} {S} {self.tt('needs', 'needed')}"
        # where the goal is told: a fact at the start or before the question, an if-clause, or in the question
        if self.placement == "place.if_final":
            where = "if"
        else:
            opts = [("gfact.start", 1), ("gfact.end", 1.5)]
            if inq is not None and not self.if_story:
                opts.append(("goal.in_question", 1))
            where = self.pick(opts)[0]
            if where == "goal.in_question":
                return self.ask([(inq[0], 1, inq[1])], emb + f" to have {T}")
        name, _, fact = self.pick(facts)
        if where == "if":
            self.if_trigger = fact
        else:
            self.facts.append(_Fact(fact, -1, where[6:]))
        direct = [o for o in direct if not (o[0] == "ask.goal.short" and name != "goal.aim")]
        return self.ask(direct, emb)

    # -- sentences ---------------------------------------------------------------------------------------------
    def story_sentences(self) -> list[str]:
        """The clauses as sentences (joins and connectives chosen here), with facts and distractors inserted."""
        cls = self.clauses
        sents: list[tuple[str, list[int]]] = []
        i = 0
        t = self.t
        while i < len(cls):
            a = cls[i]
            first = not sents
            if i + 1 < len(cls) and a.end != "#closed":
                b = cls[i + 1]
                sub_ok = a.role == "event" and not a.rel and b.role in ("event", "final")
                both_p = a.psub and b.psub
                # a reversed pair told in two main clauses must end the story: a "Then" after it would be ambiguous
                rev_ok = sub_ok and i + 2 == len(cls)
                opts = [("join.sentence", 5.0, None),
                        ("join.and", 1.5, None), ("join.and_then", 0.8, None),
                        ("join.after_pre", 1.2 if sub_ok else 0, None),
                        ("join.before_post", 1.0 if sub_ok else 0, None),
                        ("join.after_post", 1.2 if sub_ok else 0, None),
                        ("join.before_pre", 1.0 if sub_ok else 0, None),
                        ("join.before_that", 1.0 if rev_ok else 0, None),
                        ("join.but_first", 0.8 if rev_ok else 0, None)]
                name = self.pick(opts, record=False)[0]
                if name != "join.sentence":
                    self.used.add(name)
                    if name in ("join.and", "join.and_then"):
                        then = " then" if name == "join.and_then" else ""
                        parts = [a]
                        if (name == "join.and" and a.psub and b.psub and i + 2 < len(cls) and cls[i + 2].psub
                                and b.end != "#closed" and self.rng.random() < 0.3):
                            parts.append(b)
                            parts.append(cls[i + 2])
                            self.used.add("join.list3")
                            txt = f"{a.fin(t)}, {b.vp(t)} and {cls[i + 2].vp(t)}"
                        elif b.subj == a.subj and not b.rel:
                            parts.append(b)
                            txt = f"{a.fin(t)} and{then} {b.vp(t)}"
                        else:
                            parts.append(b)
                            txt = f"{a.fin(t)}, and{then} {b.fin(t)}"
                        conn = self.connective(first, parts[-1] is cls[-1], len(sents)) if a.role != "start" else ""
                        sents.append((conn + txt, list(range(i, i + len(parts)))))
                        i += len(parts)
                        continue
                    sub_a = a.vp(GER) if both_p else a.fin(t)
                    sub_b = b.vp(GER) if both_p else b.fin(t)
                    if name == "join.after_pre":
                        txt = f"after {sub_a}, {b.fin(t)}"
                    elif name == "join.before_post":
                        txt = f"{a.fin(t)} before {sub_b}"
                    elif name == "join.after_post":
                        txt = f"{b.fin(t)} after {sub_a}"
                    elif name == "join.before_pre":
                        txt = f"before {sub_b}, {a.fin(t)}"
                    elif name == "join.before_that":  # against time order, told by a sentence connective
                        txt = f"{b.fin(t)}. Before that, {a.fin(t)}"
                    else:
                        txt = f"{b.fin(t)}, but first {a.fin(t)}"
                    sents.append((txt, [i, i + 1]))
                    i += 2
                    continue
                self.used.add("join.sentence")
            # a sentence of its own
            conn = "" if first or a.role == "start" or a.rel else self.connective(first, a is cls[-1], len(sents))
            if a.adv and a.front and not conn:
                self.used.add("adv.front")
                txt = f"{a.adv}, {a.fin(t, adv=False)}"
            elif a.adv and not conn and self.m.domain == "progress" and a.adv.startswith(("on ", "in the")) \
                    and self.pick([("adv.end", 2), ("adv.front", 1)])[0] == "adv.front":
                txt = f"{a.adv}, {a.fin(t, adv=False)}"
            else:
                txt = conn + a.fin(t)
            sents.append((txt, [i]))
            i += 1
        # relative-clause distractors on a person who ends a sentence of one clause
        self.rel_attached: set[int] = set()
        texts = [s for s, _ in sents]
        for di, (kind, x, arg) in enumerate(self.m.distractors):
            if kind != "age_q":
                continue
            for si, (s, idx) in enumerate(sents):
                if len(idx) == 1 and cls[idx[0]].end == arg and texts[si].endswith(arg):
                    if self.pick([("rel.distractor", 1), ("dis.age_q", 1)], record=False)[0] == "rel.distractor":
                        self.used.add("rel.distractor")
                        texts[si] += f", who is {x} years old"
                        self.rel_attached.add(di)
                    break
        # facts
        out = list(texts)
        where_of = {}
        for si, (_, idx) in enumerate(sents):
            for ci in idx:
                where_of[ci] = si
        before: dict[int, list[str]] = {}
        after: dict[int, list[str]] = {}
        start: list[str] = []
        end: list[str] = []
        for fct in self.facts:
            if fct.where == "start" or (fct.anchor < 0 and fct.where in ("before", "after")):
                start.append(fct.text)
            elif fct.where == "end":
                end.append(fct.text)
            elif fct.where == "before":
                before.setdefault(where_of[fct.anchor], []).append(fct.text)
            else:
                after.setdefault(where_of[fct.anchor], []).append(fct.text)
        out = list(start)
        for si, s in enumerate(texts):
            out += before.get(si, [])
            out.append(s)
            out += after.get(si, [])
        out += end
        return self.distractor_texts(out)

    def connective(self, first: bool, last: bool, before: int = 0) -> str:
        """A sentence-initial connective; "Finally" only for the last clause after two sentences or more."""
        if first:
            return ""
        last = last and self.placement == "place.last" and before >= 2
        name = self.pick([("conn.none", 4), ("conn.then", 2), ("conn.after_that", 1), ("conn.later", 1),
                          ("conn.next", 0.7), ("conn.afterwards", 0.5), ("conn.finally", 1.5 if last else 0)])[0]
        return {"conn.none": "", "conn.then": "then ", "conn.after_that": "after that, ", "conn.later": "later, ",
                "conn.next": "next, ", "conn.afterwards": "afterwards, ", "conn.finally": "finally, "}[name]

    def distractor_texts(self, sents: list[str]) -> list[str]:
        """Inserts the distractor sentences (those not attached as relative clauses) into ``sents``."""
        out = list(sents)
        attached = getattr(self, "rel_attached", set())
        for di, (kind, x, arg) in enumerate(self.m.distractors):
            if di in attached:
                continue
            if self.if_story:
                where = self.pick([("dis.start", 1), ("dis.end", 1)])[0]
            else:
                where = self.pick([("dis.start", 1), ("dis.middle", 1.5), ("dis.end", 1)])[0]
            at_start = where == "dis.start" or not out
            self.used.add(f"dis.{kind}")
            text = self.distractor(kind, x, arg, late=where == "dis.end" and bool(out))
            if at_start:
                out.insert(0, text)
            elif where == "dis.end":
                out.append(text)
            else:
                out.insert(self.rng.randint(1, len(out)), text)
        return out

    def distractor(self, kind: str, x: int, arg: str, late: bool) -> str:
        """The text of a distractor; "also" only when it follows the whole story."""
        if kind == "age_p":
            return f"{S} is {x} years old"
        if kind == "age_q":
            return f"{arg} is {x} years old"
        if kind in ("relative_age", "pet_age"):
            return f"{G} {arg} is {x} years old"
        if kind == "other_has":
            who, obj = arg.split("/")
            return f"{who} {self.tt('has', 'had')} {x} {obj}"
        if kind == "also_has":
            also = "also " if late else ""
            return f"{S} {also}{self.tt('owns', 'owned')} {x} {arg}"
        if kind == "class_size":
            return f"there {self.tt('are', 'were')} {x} children in {G} class"
        if kind == "grade":
            return f"{S} {self.tt('is', 'was')} in grade {x}"
        if kind == "opens":
            return f"the {arg} {self.tt('opens', 'opened')} at {x} o'clock"
        if kind == "lives":
            return f"{S} lives {x} km from the {arg}"
        if kind == "temperature":
            return f"it {self.tt('is', 'was')} {x} degrees outside"
        return f"it takes {O} {x} minutes to walk to the {arg}"  # walk_minutes

    def if_body(self) -> str:
        """All the story's clauses, coordinated, in the present tense: the body of an if-clause."""
        cls = self.clauses
        parts = []
        prev = None
        for c in cls:
            if prev is not None and c.subj == prev.subj and c.psub and not c.rel:
                parts.append(c.vp(PRES))
            else:
                parts.append(c.fin(PRES))
            prev = c
        if len(parts) == 1:
            body = parts[0]
        else:
            then = self.pick([("if.and", 2), ("if.and_then", 1)])[0] == "if.and_then"
            body = ", ".join(parts[:-1]) + (" and then " if then else " and ") + parts[-1]
        return body

    # -- references ------------------------------------------------------------------------------------------
    def resolve(self, sentences: list[str]) -> str:
        """Names the protagonist at the first mention and uses pronouns after it; capitalises; punctuates."""
        name = self.m.p
        he, his, him = self.pron
        rng = self.rng
        # a pronoun only while the protagonist is salient: mentioned earlier in the sentence or in the one before
        salient = [False, False]  # [previous sentence, this sentence]

        def rep(mt: re.Match) -> str:
            k = mt.group(1)
            named = k == "N" or not (salient[0] or salient[1]) or (k == "S" and mt.start() == 0
                                                                    and rng.random() < 0.15)
            salient[1] = True
            if named:
                return name + "'s" if k == "G" else name
            return he if k == "S" else him if k == "O" else his

        out = []
        for s in sentences:
            s = _REF_RE.sub(rep, s)
            salient[:] = [salient[1] or name in s, False]
            if not s.endswith(("?", ".")):
                s += "."
            out.append(_cap(s))
        return " ".join(out)


def _applicable_held_out(m: _Meaning) -> list[str]:
    out = ["place.question_first", "ask.embedded"]
    if any(e.kind in ("receive", "receive_packs", "receive_bags", "allowance", "earn_rate") for e in m.elements):
        out.append("frame.passive")
    if (m.start.shape == "have" and (m.events or m.final.shape in ("share", "groups"))) or m.start.shape == "times" \
            or m.final.shape == "compare":
        out.append("rel.operand")
    if len(m.events) >= 2 or (m.events and m.final.shape in ("share", "groups")):
        out += ["join.after_post", "join.before_pre"]
    return out


# how often each applicable held-out production is made the generalisation problem's target
_TARGET_WEIGHT = {"place.question_first": 1.0, "ask.embedded": 1.0, "frame.passive": 2.5, "rel.operand": 1.5,
                  "join.after_post": 2.0, "join.before_pre": 2.0}


def _realise(m: _Meaning, rng: random.Random, generalisation: bool) -> tuple[str, tuple[str, ...]]:
    """The question text and the productions it used. In the generalisation split one applicable held-out
    production is drawn and taken at its first choice point; the wording is drawn again if none made it."""
    applicable = _applicable_held_out(m) if generalisation else []
    for _ in range(50):
        target = rng.choices(applicable, [_TARGET_WEIGHT[a] for a in applicable])[0] if generalisation else None
        story = _Story(m, rng, generalisation, target)
        question = story.run()
        if not generalisation or story.used & HELD_OUT.keys():
            return question, tuple(sorted(story.used))
    raise RuntimeError(f"no held-out production fits {m.key}")  # pragma: no cover


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


def _problem(m: _Meaning, question: str, productions: tuple[str, ...]) -> WordyProblem:
    return WordyProblem(question, m.steps, m.answer, m.template, m.level, m.numbers, m.entities,
                        productions, tuple(v for _, v, _ in m.distractors))


def generate(split: str, n: int, seed: int = 0, levels: Iterable[int] = LEVELS) -> list[WordyProblem]:
    """``n`` distinct problems of ``split`` (one of :data:`SPLITS`), deterministic for the arguments.

    Levels (1-4 steps) are balanced exactly as in :func:`s2d2.evaluation.tasks.arith.generate`: consecutive groups hold
    one problem of each requested level in random order. Within a level the domain is uniform and then the
    story shape. Meanings whose key hashes to another split, or repeats a key already drawn, are rejected
    before they are put into words, so the splits share no problem for any seeds; the ``generalisation``
    split is worded with at least one held-out production per problem, the others with none.
    ``generate(split, m, seed)`` is a prefix of ``generate(split, n, seed)`` for ``m < n``.
    """
    gen = split == "generalisation"

    def draw(rng: random.Random, level: int) -> tuple[str, Callable[[], WordyProblem]]:
        m = _draw_meaning(rng, level)
        return m.key, lambda: _problem(m, *_realise(m, rng, gen))

    return arith.generate_distinct(split, n, seed, levels, namespace="s2d2.tasks.wordy", splits=SPLITS,
                                   all_levels=LEVELS, split_of=split_of, draw=draw)
