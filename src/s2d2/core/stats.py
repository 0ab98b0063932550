"""Decoding statistics: exact forward counts by kind, acceptance counts, and time.

Forward kinds: ``draft`` (diffusion-mode pass over the block), ``verify`` (AR-mode 2L pass over the span),
``prefill`` and ``commit`` (passes whose only job is to write committed K/V). With ``fuse_commit`` (the default)
the prompt's and each finished block's K/V are written by the next draft forward, so ``prefill_forwards`` and
``commit_forwards`` stay 0 and NFE counts only drafts and verifications; every forward is counted exactly once.
With ``fuse_draft`` a verification that finishes a block also drafts the next block; such a draft is counted in
``fused_drafts`` and is not a forward (``draft_forwards`` counts forwards only).

Acceptance: ``proposed_tokens`` are span tokens sent to the verifier, ``accepted_tokens`` the drafts it accepted,
``corrected_tokens`` the tokens it committed at a first rejection. ``mean_accepted_length`` counts both per
verification (as vLLM counts its bonus token), i.e. the tokens one verify forward commits. ``fallback_tokens``
are those the base strategy (static or dynamic unmasking) committed: every token for ``ar``, ``static`` and
``dynamic``; for ``s2d2`` the ones verification did not provide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DecodeStats:
    """Counters for one or more decoded prompts; ``merge`` adds them up."""

    num_prompts: int = 1
    num_tokens: int = 0
    prompt_tokens: int = 0
    prefill_forwards: int = 0
    draft_forwards: int = 0
    verify_forwards: int = 0
    commit_forwards: int = 0
    fused_drafts: int = 0  # drafts that rode along a verify forward (fuse_draft); not forwards of their own
    redrafts: int = 0  # drafts taken from a rejecting verification's rows (redraft); not forwards either
    steps: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    corrected_tokens: int = 0
    fallback_tokens: int = 0
    edits: int = 0  # committed tokens replaced by LLaDA2.1-style editing (editing_threshold)
    # query rows the forwards carried (a forward's cost grows with them; batched padding not included)
    query_rows: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts accepted at span offset i
    proposed_per_position: list[int] = field(default_factory=list)  # [i]: drafts verified at span offset i
    # a prompt's wall time from its start to its end: its latency, which in a batch overlaps the other prompts'
    # (Model.summed_stats sums a call's counters and takes the call's wall time instead)
    time_s: float = 0.0
    forward_time_s: float = 0.0  # wall time inside the forwards it took part in (CUDA is synchronised around them)

    @property
    def nfe(self) -> int:
        """Number of forward evaluations of every kind."""
        return self.prefill_forwards + self.draft_forwards + self.verify_forwards + self.commit_forwards

    def observe_verification(self, num_proposed: int, num_accepted: int, corrected: bool) -> None:
        """Record one verification of ``num_proposed`` drafts of which the first ``num_accepted`` were accepted."""
        self.proposed_tokens += num_proposed
        self.accepted_tokens += num_accepted
        self.corrected_tokens += int(corrected)
        grow = num_proposed - len(self.proposed_per_position)
        if grow > 0:
            self.proposed_per_position.extend([0] * grow)
            self.accepted_per_position.extend([0] * grow)
        for i in range(num_proposed):
            self.proposed_per_position[i] += 1
            self.accepted_per_position[i] += int(i < num_accepted)

    def merge(self, other: DecodeStats) -> DecodeStats:
        """Sum of two stats (per-position lists added element-wise)."""
        out = DecodeStats(num_prompts=self.num_prompts + other.num_prompts)
        for name in self.__dataclass_fields__:
            if name == "num_prompts":
                continue
            a, b = getattr(self, name), getattr(other, name)
            if isinstance(a, list):
                n = max(len(a), len(b))
                setattr(out, name, [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)])
            else:
                setattr(out, name, a + b)
        return out

    @staticmethod
    def total(stats: list[DecodeStats]) -> DecodeStats:
        """The sum of one or more stats (e.g. one per decoded prompt)."""
        out = stats[0]
        for s in stats[1:]:
            out = out.merge(s)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every counter plus the derived rates, as plain JSON."""
        d: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        nfe = self.nfe
        d.update(
            nfe=nfe,
            tokens_per_forward=self.num_tokens / nfe if nfe else 0.0,
            rows_per_forward=self.query_rows / nfe if nfe else 0.0,
            tokens_per_s=self.num_tokens / self.time_s if self.time_s > 0 else 0.0,
            mean_accepted_length=(self.accepted_tokens + self.corrected_tokens) / self.verify_forwards
            if self.verify_forwards else 0.0,
            acceptance_rate=self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0,
            loop_time_share=1.0 - self.forward_time_s / self.time_s if self.time_s > 0 else 0.0,
        )
        return d

    def summary(self) -> str:
        """One line for humans: what was returned, what it cost and, where drafts were verified, how many were
        accepted. The forward breakdown appears only where there is more than one kind of forward (AR and the
        threshold baselines only draft)."""
        d = self.to_dict()
        writes = self.prefill_forwards + self.commit_forwards
        kinds = [f"draft {self.draft_forwards}", f"verify {self.verify_forwards}"] if self.verify_forwards else []
        kinds += [f"cache writes {writes}"] if writes else []
        kinds += [f"{self.fused_drafts} drafts fused into verifies"] if self.fused_drafts else []
        kinds += [f"{self.redrafts} redrafts from verifies"] if self.redrafts else []
        breakdown = f" ({', '.join(kinds)})" if kinds else ""
        line = (f"{d['num_tokens']} tokens, NFE {d['nfe']}{breakdown}, "
                f"{d['tokens_per_forward']:.2f} tokens/forward, {d['tokens_per_s']:.1f} tokens/s")
        if self.proposed_tokens:
            # counted over whole blocks: a block decoded past a stop token verifies drafts the output then drops,
            # so accepted drafts can outnumber the tokens returned
            line += (f", verification accepted {self.accepted_tokens} of {self.proposed_tokens} checked drafts "
                     "(whole blocks, past a stop too)")
        return line
