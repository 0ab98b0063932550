"""Decoding configuration: one validated, frozen dataclass whose fields are also the CLI flags.

Defaults, and where they differ from the authors' code (``s2d2-reference.md`` §2.4) and why:

- ``method="s2d2"``, ``block_size=4``, ``steps=block_size``: the paper's SDAR configuration A (B = S = 4).
- ``policy="score_threshold"``, ``tau=0``, ``score_type="difference_static"``, ``penalty=1``,
  ``estimator="soft_entropy_negexp"``: configuration A as the README describes it. The reference *function*
  defaults are ``mask_span_length`` / ``hard_margin_threshold`` / ``difference_dynamic`` / c = 2, and its README
  commands forget to pass the estimator; we default to what the paper says it used.
- ``fallback="dynamic"``, ``threshold=0.85``: the reference's ``low_confidence_dynamic`` with its SDAR default.
- ``cache_ver=True``, ``draft_ver=True``: the AR-consistent cache ("AR-like caching"). Off by default in the
  reference; on here because it makes the verifier the exact AR conditional and costs nothing.
- ``temperature=0``: greedy, and greedy is *deterministic* (accept iff draft == argmax q, else commit argmax q).
  The reference has no deterministic greedy acceptance (its bug 7.1).
- ``fuse_commit=True``: the K/V of a finished block (and of the prompt) are written by the next forward instead of
  a forward of their own, saving one forward per block and making AR one forward per token.
- ``prefix_cache=True`` (not in the reference): with the AR-consistent cache the causal K/V of a block's committed
  prefix are final, so the forward that computes them anyway writes them to the cache, and later drafts and
  verifications of the block carry only the rows after it. Same tokens, fewer rows per forward.
- ``fuse_draft=True`` (s2d2 only; not in the reference): a verify whose span runs to the block's end also drafts
  the next block; when every draft is accepted that draft is used and the next block's first draft forward is
  saved. The result is the same tokens (the rows are the same computation), with fewer forwards.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args, get_origin

from s2d2.errors import ConfigError
from s2d2.files import parse_json_file

Method = Literal["ar", "static", "dynamic", "s2d2"]
Policy = Literal["mask_span_length", "score_threshold", "score_hysteresis", "contextual_bandit_ucb"]
Estimator = Literal[
    "soft_entropy_negexp",
    "hard_margin_threshold",
    "soft_renyi_2_entropy",
    "hard_entropy_threshold",
    "soft_confidence_power",
    "soft_clipped_linear_margin",
]
ScoreType = Literal["difference_static", "difference_dynamic"]
Fallback = Literal["static", "dynamic"]

METHODS: tuple[str, ...] = get_args(Method)
POLICIES: tuple[str, ...] = get_args(Policy)
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
SCORE_TYPES: tuple[str, ...] = get_args(ScoreType)
FALLBACKS: tuple[str, ...] = get_args(Fallback)
UcbEntropySource = Literal["span", "masked"]
GenerationConfigMode = Literal["auto", "none"]
GENERATION_CONFIG_MODES: tuple[str, ...] = get_args(GenerationConfigMode)
# Fields a checkpoint's generation_config.json may default (with generation_config="auto"), and their built-in
# defaults otherwise.
SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
UCB_ENTROPY_SOURCES: tuple[str, ...] = get_args(UcbEntropySource)
# relax = 1 means typical acceptance with epsilon 0.3 (Medusa's reported range is 0.01-0.3; delta = sqrt(epsilon))
RELAX_MAX_EPSILON = 0.3


@dataclass(frozen=True)
class Relaxation:
    """Relaxed acceptance parameters; the defaults are exact acceptance."""

    typical_epsilon: float = 0.0  # typical acceptance's epsilon (0: off)
    typical_delta: float = 0.0  # and its delta (Medusa suggests sqrt(epsilon))
    ratio_tempering: float = 1.0  # gamma (sampled only)
    ratio_threshold: float | None = None

    @property
    def neutral(self) -> bool:
        return self.typical_epsilon <= 0.0 and self.ratio_tempering == 1.0 and self.ratio_threshold is None


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode. Every field is a CLI flag of ``s2d2 generate`` (``block_size`` -> ``--block-size``).

    Methods: ``ar`` decodes one token per forward (block size 1); ``static`` commits ``block_size / steps`` tokens
    per step in order of confidence; ``dynamic`` commits every mask whose confidence exceeds ``threshold`` (at
    least the step quota); ``s2d2`` drafts like ``dynamic``, lets ``policy`` decide per step whether to verify the
    drafted span in AR mode, and falls back to ``fallback`` for what verification did not commit.
    """

    method: Method = "s2d2"
    block_size: int | None = None  # None: 1 for "ar", 4 otherwise
    steps: int | None = None  # denoising steps per block; None: block_size
    # decode each block sub-block by sub-block (Fast-dLLM v2's small_block_size, 8 there): drafts see the whole block,
    # but spans, verification and commits stay in the left-most sub-block that still has masks; None: the block
    sub_block_size: int | None = None
    threshold: float = 0.85  # confidence threshold of the dynamic strategy (and of N_high)
    fallback: Fallback = "dynamic"  # s2d2's base strategy for tokens verification did not commit
    # --- routing (s2d2 only)
    policy: Policy = "score_threshold"
    # before any policy: never verify a span whose drafts all clear `threshold` (a dynamic fallback commits them
    # all in this step anyway, so verifying could only catch a confidently wrong draft, at one more forward)
    skip_confident: bool = False
    # after a verification, also commit every remaining mask of the unit whose draft clears `threshold`, as a step
    # that does not verify would (the reference's always_check_high_confidence). Not exact: a speed knob
    commit_confident: bool = False
    estimator: Estimator = "soft_entropy_negexp"
    score_type: ScoreType = "difference_static"
    penalty: float = 1.0  # c in s = E[K] - c (static) or E[K] - c * N_high (dynamic)
    tau: float = 0.0  # score_threshold: verify iff s >= tau
    tau_on: float = 0.0  # score_hysteresis: turn on iff s > tau_on
    tau_off: float = -1.0  # score_hysteresis: stay on while s >= tau_off
    min_span: int = 1  # mask_span_length: verify iff |span| >= min_span
    margin_threshold: float = 0.05  # hard_margin_threshold
    entropy_threshold: float = 0.5  # hard_entropy_threshold (on entropy / ln V)
    entropy_temperature: float = 1.0  # soft_entropy_negexp
    confidence_power: float = 1.0  # soft_confidence_power
    margin_coef: float = 1.0  # soft_clipped_linear_margin
    ucb_beta: float = 1.0
    ucb_span_bins: int = 2
    ucb_progress_bins: int = 2
    ucb_entropy_bins: int = 2
    ucb_entropy_source: UcbEntropySource = "span"
    # --- relaxed acceptance (s2d2 only; off by default, exact acceptance keeps every invariant). One dial: relax in
    # [0, 1], 0 = exact; it sets typical acceptance's epsilon = RELAX_MAX_EPSILON * relax and delta = sqrt(epsilon)
    # (Medusa's choice). The expert fields, when set, win over the dial (docs/decoding.md "Relaxed acceptance").
    relax: float = 0.0
    typical_epsilon: float | None = None
    typical_delta: float | None = None
    ratio_tempering: float = 1.0  # gamma in min(1, (q/p) ** gamma); sampled decoding only
    ratio_threshold: float | None = None  # commit later span drafts whose ratio reaches it (after a rejection)
    # --- cache modes
    cache_ver: bool = True  # write the cache with causal (AR-mode) attention
    draft_ver: bool = True  # committed prefix of the block attends causally in drafts
    fuse_commit: bool = True  # write a finished block's K/V in the next forward, not a forward of its own
    fuse_draft: bool = True  # a verify that may finish the block also drafts the next one (needs cache_ver, fuse_commit)
    # ... only when the product of the span's draft confidences (the drafter's estimate that every draft is accepted,
    # the one case the next block's rows are used) reaches this: 0 = always, the fewest forwards; where rows cost
    # time (a CPU) the break-even of the forward's cost model, about 0.35 for the bundled model (docs/decoding.md)
    fuse_draft_threshold: float = 0.0
    # After a rejection, the verifier's rows for the span positions after the correction (computed by the rejecting
    # forward) become the next draft there, instead of a diffusion-mode forward, when the first of them is at least
    # this confident; None: off. Lossless: the redraft is always verified (s2d2; docs/decoding.md "Redrafts from
    # the verifier").
    redraft: float | None = None
    # write the K/V of the block's committed prefix into the cache as it grows (in the forward running anyway), so
    # that drafts and verifications carry only the rows after it; needs cache_ver, draft_ver and fuse_commit (then those K/V are
    # final), off with editing; the same tokens either way (docs/decoding.md "What a forward carries")
    prefix_cache: bool = True
    # --- sampling. Left at None, these three come from the checkpoint's generation_config.json when
    # generation_config is "auto" (the serving convention, as vLLM), else from the built-in defaults:
    temperature: float | None = None  # 0 = greedy (deterministic); built-in default 0
    top_k: int | None = None  # 0 = off; built-in default 0
    top_p: float | None = None  # 1 = off; built-in default 1
    seed: int | None = None
    # "auto": unset sampling fields take the checkpoint's generation_config.json values (Model.generate applies
    # them); "none": the checkpoint's file is ignored and unset fields keep the built-in defaults (greedy)
    generation_config: GenerationConfigMode = "auto"
    # --- editing (LLaDA2.1's self-correction; families whose models were trained for it): every forward may
    # replace a committed generated token of the current block whose draft now differs with confidence above
    # editing_threshold; a block whose masks are gone runs up to max_post_steps editing-only steps while edits fire
    editing_threshold: float | None = None  # None: off
    max_post_steps: int = 0
    # --- pipelining (D2F): several blocks in flight, one draft forward over all of them per step. The next block
    # opens when the last one's decoded share reaches block_add_threshold (D2F's example: 0.5); a block is fully
    # activated (gets at least one token per step) once its predecessor's share reaches decoded_token_threshold.
    block_add_threshold: float | None = None  # None: one block in flight
    decoded_token_threshold: float = 0.8
    # --- stopping
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] | None = field(default=None)  # None: the model's end-of-sequence ids
    # stop strings: decoding ends with the block in which one appears; the text is cut before it
    stop: tuple[str, ...] | None = field(default=None)
    # fields left at None and derived in __post_init__; replace() derives them again (method="ar" -> B = 1), and
    # Model.generate fills the sampling ones from generation_config.json
    _derived: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("fallback", self.fallback, FALLBACKS)
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("estimator", self.estimator, ESTIMATORS)
        _check_choice("score_type", self.score_type, SCORE_TYPES)
        _check_choice("ucb_entropy_source", self.ucb_entropy_source, UCB_ENTROPY_SOURCES)
        _check_choice("generation_config", self.generation_config, GENERATION_CONFIG_MODES)
        derived = tuple(name for name in ("block_size", "steps", *SAMPLING_DEFAULTS) if getattr(self, name) is None)
        object.__setattr__(self, "_derived", derived)
        for name, default in SAMPLING_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.block_size is None:
            object.__setattr__(self, "block_size", 1 if self.method == "ar" else 4)
        _check_int("block_size", self.block_size, 1)
        if self.method == "ar" and self.block_size != 1:
            raise ConfigError(f"method 'ar' decodes one token per forward, so block_size must be 1 (got {self.block_size}).")
        if self.steps is None:
            object.__setattr__(self, "steps", self.block_size)
        _check_int("steps", self.steps, 1)
        if self.steps > self.block_size:
            raise ConfigError(f"steps ({self.steps}) cannot exceed block_size ({self.block_size}): every step commits at least one token.")
        if self.sub_block_size is not None:
            _check_int("sub_block_size", self.sub_block_size, 1)
        if self.editing_threshold is not None:
            _check_float("editing_threshold", self.editing_threshold, 0.0, 1.0)
        _check_int("max_post_steps", self.max_post_steps, 0)
        _check_float("decoded_token_threshold", self.decoded_token_threshold, 0.0, 1.0)
        _check_float("relax", self.relax, 0.0, 1.0)
        _check_float("fuse_draft_threshold", self.fuse_draft_threshold, 0.0, 1.0)
        for name in ("typical_epsilon", "typical_delta"):
            if getattr(self, name) is not None:
                _check_float(name, getattr(self, name), 0.0, 1.0)
        _check_float("ratio_tempering", self.ratio_tempering, 0.0, 1.0, low_open=True)
        if self.ratio_threshold is not None:
            _check_float("ratio_threshold", self.ratio_threshold, 0.0, 1.0, low_open=True)
        if self.block_add_threshold is not None:
            _check_float("block_add_threshold", self.block_add_threshold, 0.0, 1.0, low_open=True)
            if self.method not in ("dynamic", "s2d2"):
                raise ConfigError(f"block_add_threshold (pipelined blocks) applies to methods dynamic and s2d2, "
                                  f"not {self.method}.")
            if self.sub_block_size is not None or self.editing_threshold is not None:
                raise ConfigError("block_add_threshold (pipelined blocks) cannot be combined with sub_block_size or "
                                  "editing_threshold.")
            if not self.fuse_commit:
                raise ConfigError("block_add_threshold (pipelined blocks) needs fuse_commit: finished blocks are "
                                  "written to the cache by the next draft forward.")
        if self.redraft is not None:
            _check_float("redraft", self.redraft, 0.0, 1.0)
            if self.method != "s2d2":
                raise ConfigError(f"redraft applies to method s2d2 (its drafts come from a verification), not "
                                  f"{self.method}.")
            if self.block_add_threshold is not None or self.editing_threshold is not None:
                raise ConfigError("redraft cannot be combined with block_add_threshold or editing_threshold: those "
                                  "steps need a diffusion-mode forward.")
        for name in ("min_span", "ucb_span_bins", "ucb_progress_bins", "ucb_entropy_bins", "max_new_tokens"):
            _check_int(name, getattr(self, name), 1)
        _check_int("top_k", self.top_k, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed >= SEED_LIMIT:  # what a torch generator takes
                raise ConfigError(f"seed must be below 2**64, got {self.seed}.")
        for name in ("threshold", "margin_threshold", "entropy_threshold"):
            _check_float(name, getattr(self, name), 0.0, 1.0)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        for name in ("temperature", "entropy_temperature", "confidence_power", "margin_coef", "ucb_beta", "penalty"):
            _check_float(name, getattr(self, name), 0.0, 1e6)
        for name in ("tau", "tau_on", "tau_off"):
            _check_float(name, getattr(self, name), -1e9, 1e9)
        if self.tau_on <= self.tau_off:
            raise ConfigError(f"tau_on ({self.tau_on}) must be greater than tau_off ({self.tau_off}) for score_hysteresis.")
        for name in ("cache_ver", "draft_ver", "fuse_commit", "fuse_draft", "skip_confident",
                     "commit_confident", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise ConfigError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}.")
            ids = tuple(self.stop_token_ids)
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}.")
            object.__setattr__(self, "stop_token_ids", ids)
        if self.stop is not None:
            stops = (self.stop,) if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) and x for x in stops):
                raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}.")
            object.__setattr__(self, "stop", tuple(stops) or None)

    @property
    def greedy(self) -> bool:
        """Temperature 0: argmax drafts and deterministic acceptance."""
        return self.temperature == 0.0

    @property
    def inexact_knobs(self) -> tuple[str, ...]:
        """The fields that make S2D2's verification keep other tokens than AR would (relaxed acceptance, confident
        drafts committed beside a verification); empty when verified tokens are exactly AR's (or their
        distribution when sampling)."""
        knobs = ("relax" if self.relax > 0 else None, "typical_epsilon" if self.typical_epsilon else None,
                 "ratio_tempering" if self.ratio_tempering != 1.0 else None,
                 "ratio_threshold" if self.ratio_threshold is not None else None,
                 "commit_confident" if self.commit_confident else None)
        return tuple(k for k in knobs if k is not None) if self.method == "s2d2" else ()

    def relaxation(self) -> Relaxation:
        """The relaxed-acceptance parameters this config asks for (exact acceptance when neutral)."""
        epsilon = self.typical_epsilon if self.typical_epsilon is not None else RELAX_MAX_EPSILON * self.relax
        delta = self.typical_delta if self.typical_delta is not None else math.sqrt(epsilon)
        return Relaxation(epsilon, delta, self.ratio_tempering, self.ratio_threshold)

    def replace(self, **changes: Any) -> DecodeConfig:
        """A copy with some fields changed (validated again); fields that were derived (``block_size`` from the
        method, ``steps`` from the block size, unset sampling fields) are derived again unless changed."""
        return replace(self, **{**{name: None for name in self._derived}, **changes})

    def is_set(self, name: str) -> bool:
        """Whether field ``name`` was given by the caller (False for fields left at None and derived)."""
        return name not in self._derived

    def with_generation_defaults(self, defaults: dict[str, Any]) -> DecodeConfig:
        """Fill the sampling fields the caller left unset from a checkpoint's ``defaults`` (see
        :func:`s2d2.checkpoint.read_generation_defaults`), when ``generation_config`` is ``"auto"``."""
        if self.generation_config != "auto":
            return self
        changes = {k: v for k, v in defaults.items() if k in SAMPLING_DEFAULTS and not self.is_set(k)}
        return self.replace(**changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view of every field."""
        d = asdict(self)
        del d["_derived"]
        for name in ("stop_token_ids", "stop"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecodeConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown decoding option {unknown[0]!r}; valid options: {', '.join(sorted(known))}.")
        return cls(**d)

    @classmethod
    def file_fields(cls, path: str) -> dict[str, Any]:
        """The fields a config file sets (``--config FILE``, lm-eval ``config=FILE``; ``s2d2 tune`` writes them): a
        JSON object of DecodeConfig fields, lists for the list-valued ones. Checked here, so a bad file is one
        sentence before any work; callers lay their own settings over the result."""
        data = parse_json_file(path, ConfigError, label=f"config file {path}")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of decoding options.")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        return data


# Rows decoded together by default (Model.generate's and loglikelihoods' batch_size, --batch-size): "auto" takes as
# many as fit in the memory left beside the weights, up to 64 on a CPU (the fastest batch for the bundled model for
# AR, dynamic and S2D2 configuration A: BENCHMARKS.md, "Batched decoding") and 256 on a GPU (s2d2.engine.memory).
DEFAULT_BATCH_SIZE: int | str = "auto"
# Seeds are 64-bit (torch.Generator.manual_seed); row seeds derived from one wrap around modulo this.
SEED_LIMIT = 2**64


def check_batch_size(value: Any) -> int | str:
    """A batch size (rows decoded together) must be an integer >= 1 or ``"auto"`` (as many as fit in memory);
    returns it."""
    if value == "auto":
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"batch_size must be an integer >= 1 or 'auto', got {value!r}.")
    return value


def list_item_type(hint: Any) -> type | None:
    """The item type of a list-valued field's type hint (``tuple[int, ...] | None`` -> ``int``), else None."""
    inner = next((t for t in (hint, *get_args(hint)) if get_origin(t) is tuple), None)
    return None if inner is None else get_args(inner)[0]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}.")


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}.")
