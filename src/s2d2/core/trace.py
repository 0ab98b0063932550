"""Step traces: what the decoder did at each step of one prompt, as JSON-ready events (schema ``s2d2.trace/1``).

A trace is a list of events, one ``header``, one ``step`` per decoding step, one ``done``::

    {"type": "header", "schema": "s2d2.trace/1", "prompt_tokens": 37, "block_size": 4, "method": "s2d2", ...}
    {"type": "step", "step": 0, "block": 36, "draft": {"positions": [37, 38, 39], "tokens": [...],
     "confidence": [...]}, "route": {"verify": true, "span": [37, 40], "score": 1.7, "expected_accepted": 2.7,
     "alphas": [...], "n_high": 0} | null, "verify": {"proposed": 3, "accepted": 2, "correction": 17} | null,
     "commits": [{"pos": 37, "token": 5, "how": "accepted"}, ...], "forwards": [{"kind": "draft", "rows": 4,
     "time_s": 0.0021}, ...]}
    {"type": "done", "finish_reason": "stop", "token_ids": [...], "stats": {...}, "forwards": [], "commits": []}

Positions are absolute (the prompt occupies ``0 .. prompt_tokens - 1``). ``how`` is one of ``accepted`` (a draft the
verifier accepted), ``corrected`` (the verifier's token where it rejected the draft), ``fallback`` (the base strategy
committed a draft), ``ar`` (a token of ``method="ar"``, or a block's first token decoded in AR mode in
shifted-logit families), ``edit`` (token editing replaced a committed token). ``forwards`` lists the forwards the step asked for, with their kind (``draft``,
``verify``, ``finalize``, ``commit``), their query rows, and their time (in a batch, the whole batched forward's);
a draft or token that rode along an earlier verification is ``fused_draft`` / ``fused_token`` with 0 rows, and a
draft made of a rejecting verification's rows (``redraft``) is ``redraft`` with 0 rows (its step's ``route`` says
``"redraft": true``: it is verified without asking the policy). Tracing
is off unless asked for (``Model.generate(..., trace=True)``, ``s2d2 generate --trace FILE``, the server's
``"trace": true``): the decoder then does no tracing work at all.
"""

from __future__ import annotations

from typing import Any

SCHEMA = "s2d2.trace/1"
COMMIT_KINDS = ("accepted", "corrected", "fallback", "ar", "edit")

__all__ = ["COMMIT_KINDS", "SCHEMA", "Tracer"]


class Tracer:
    """Collects one prompt's trace events while it decodes (the decoding loop and its driver call these)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._step: dict[str, Any] = self._new_step()

    @staticmethod
    def _new_step() -> dict[str, Any]:
        return {"draft": None, "route": None, "verify": None, "commits": [], "forwards": []}

    def header(self, **fields: Any) -> None:
        """The trace's first event: the schema and what the row decodes with."""
        self.events.append({"type": "header", "schema": SCHEMA, **fields})

    def forward(self, kind: str) -> None:
        """A forward the row asks for (or ``fused_*``: a result that rode along an earlier forward)."""
        self._step["forwards"].append({"kind": kind, "rows": 0, "time_s": 0.0})

    def forward_done(self, rows: int, time_s: float) -> None:
        """The driver ran the last requested forward: its query rows and time."""
        if self._step["forwards"]:
            self._step["forwards"][-1].update(rows=int(rows), time_s=float(time_s))

    def draft(self, start: int, offsets: list[int], tokens: tuple[int, ...], confidence: tuple[float, ...]) -> None:
        """The step's draft at its masked ``offsets`` of the block (or blocks in flight) at ``start``."""
        self._step["draft"] = {"positions": [start + i for i in offsets], "tokens": [tokens[i] for i in offsets],
                               "confidence": [round(confidence[i], 6) for i in offsets]}

    def route(self, verify: bool, span: tuple[int, int], why: dict[str, Any]) -> None:
        """The routing decision on the span ``[start, end)`` (absolute), with the policy's inputs."""
        self._step["route"] = {"verify": bool(verify), "span": list(span), **why}

    def verdict(self, proposed: int, accepted: int, correction: int | None) -> None:
        """The verification's outcome."""
        self._step["verify"] = {"proposed": proposed, "accepted": accepted, "correction": correction}

    def commit(self, pos: int, token: int, how: str) -> None:
        """A token committed (or replaced) at absolute ``pos``."""
        self._step["commits"].append({"pos": int(pos), "token": int(token), "how": how})

    def end_step(self, step: int, block: int) -> None:
        """Close the step: one ``step`` event."""
        self.events.append({"type": "step", "step": step, "block": block, **self._step})
        self._step = self._new_step()

    def done(self, token_ids: list[int], finish_reason: str, stats: dict[str, Any]) -> None:
        """The trace's last event; forwards and commits made after the last step (a last block opened with its AR
        token and nothing left to draft) are kept in it."""
        self.events.append({"type": "done", "finish_reason": finish_reason, "token_ids": list(token_ids),
                            "stats": stats, "forwards": self._step["forwards"], "commits": self._step["commits"]})
