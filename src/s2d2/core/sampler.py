"""The step's sampler: every sampled row's draws and acceptance tests of one engine step as one set of operations.

A sampled row does not draw on its own. After its forward, it receives its filtered distributions with its logits
(``Scored.probs``, computed by the executor for all sampled rows at once: :func:`s2d2.core.sampling.filtered_probs`),
takes every uniform its forward needs from its own generator in one call (:func:`s2d2.core.sampling.uniforms`),
and asks for what it needs as :class:`Draw` and :class:`Accept` items in one :class:`~s2d2.core.requests.HostRead`.
The executor hands the step's reads to :func:`sample`, which concatenates the items of every row and computes them
together (one inverse-CDF draw over every row to draw, one speculative acceptance over every verified span), and
the results cross to the host in the step's one transfer (issue 28; as vLLM's sampler and rejection sampler work
over flat tensors). A row's results depend only on its own rows and uniforms, so batched == batch 1 and a sampled
row's stream depends on its seed and its own path only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from s2d2.config import Relaxation
from s2d2.core.sampling import Choices, choice_table, draw_tokens, read_choices
from s2d2.core.verify import Verdict, read_verdicts, sampled_verdicts


@dataclass(frozen=True)
class Draw:
    """Draw a token from each row of ``probs`` (``[n, V]``) at the uniforms ``u`` (``[n]``); read back their
    :class:`Choices` (with the routing ``features`` it reads, of :data:`~s2d2.core.sampling.FEATURES`)."""

    probs: torch.Tensor
    u: torch.Tensor
    features: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Accept:
    """Speculative acceptance of the ``drafted`` tokens, drawn from ``p``, against the verifier's ``q`` (both
    ``[n, V]``), with ``n`` uniforms for the tests and one for the correction (``u``: ``[n + 1]``); read back the
    :class:`~s2d2.core.verify.Verdict`."""

    drafted: list[int]
    p: torch.Tensor
    q: torch.Tensor
    u: torch.Tensor
    relax: Relaxation | None = None


Item = Draw | Accept
Result = Choices | Verdict


def sample(reads: Sequence[Sequence[Item]]) -> tuple[list[torch.Tensor], Callable[[list[list[float]]],
                                                                                  list[list[Result]]]]:
    """Every item of the step's ``reads`` (one sequence of items per row), computed at once on the device: returns
    the tables to read to the host (none for no reads; read with the greedy rows' table in one transfer,
    :func:`s2d2.engine.runner.read_together`) and the function that turns those tables' values, once read, into each
    read's results (a :class:`Choices` per :class:`Draw`, a :class:`~s2d2.core.verify.Verdict` per :class:`Accept`,
    in the items' order)."""
    draws = [item for read in reads for item in read if isinstance(item, Draw)]
    accepts = [item for read in reads for item in read if isinstance(item, Accept)]
    features = frozenset().union(*(d.features for d in draws))
    width = 2 + len(features)
    tables = []
    if draws:
        probs = torch.cat([d.probs for d in draws]) if len(draws) > 1 else draws[0].probs
        u = torch.cat([d.u for d in draws]) if len(draws) > 1 else draws[0].u
        tables.append(choice_table(probs, draw_tokens(probs, u), features=features))
    if accepts:
        tables.append(sampled_verdicts([a.drafted for a in accepts], torch.cat([a.p for a in accepts]),
                                       torch.cat([a.q for a in accepts]), torch.cat([a.u[:-1] for a in accepts]),
                                       torch.cat([a.u[-1:] for a in accepts]), [a.relax for a in accepts]))

    def results(values: list[list[float]]) -> list[list[Result]]:
        table = values[0] if draws else []
        verdicts = iter(read_verdicts(values[-1], [a.drafted for a in accepts], [a.relax for a in accepts])
                        if accepts else [])
        out, row = [], 0
        for read in reads:
            mine: list[Result] = []
            for item in read:
                if isinstance(item, Draw):
                    n = len(item.probs)
                    # (with every feature a draw of the step asked for: a row reads only those it asked for)
                    mine.append(read_choices(table[row * width:(row + n) * width], features))
                    row += n
                else:
                    mine.append(next(verdicts))
            out.append(mine)
        return out

    return tables, results
