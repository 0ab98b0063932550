"""``s2d2 tune``: the fastest decoding setting within an accuracy budget, chosen on the validation split.

1. **Exact pass.** AR and every setting of the search space decode the validation problems greedily (batched: the
   outputs do not depend on the batch); accuracy and tokens per forward are exact. A setting is *within budget* when
   its accuracy is at least AR's minus ``max_drop`` points.
2. **Timed pass** (``objective="tokens_per_s"``): AR and the ``timed`` best settings within budget (by tokens per
   forward; of settings that decode alike, same accuracy and forwards, only the first) are timed at batch 1 in
   shuffled rounds (:func:`s2d2.evaluation.bench.run_bench`); the winner has the highest measured tokens/s. With ``objective="tokens_per_forward"`` (default: exact, machine-independent) the winner is the
   best by tokens per forward, ties to the higher accuracy.

The winner is written as a config file (a JSON object of DecodeConfig fields) that ``--config FILE`` loads in
``generate``, ``eval``, ``bench`` and ``serve``, and lm-eval's ``config=FILE`` model argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from s2d2.api import Model
from s2d2.config import DEFAULT_BATCH_SIZE, DecodeConfig
from s2d2.core.stats import DecodeStats
from s2d2.errors import ConfigError
from s2d2.evaluation.bench import Setting, run_bench
from s2d2.evaluation.distributed import DataParallel

OBJECTIVES = ("tokens_per_forward", "tokens_per_s")

# Routing policies searched, each with its own fields (reference §2.3; the paper's configurations and variants)
POLICIES: dict[str, dict[str, Any]] = {
    "config-A": {},  # score_threshold, tau 0, difference_static, c = 1, soft_entropy_negexp
    "config-A margin": dict(estimator="hard_margin_threshold"),
    "dyn c=1": dict(score_type="difference_dynamic", penalty=1.0),
    "span>=2": dict(policy="mask_span_length", min_span=2),
    "hysteresis": dict(policy="score_hysteresis", score_type="difference_dynamic", penalty=1.0, tau_on=1.0,
                       tau_off=-5.0),
    "ucb": dict(policy="contextual_bandit_ucb"),
}


def search_space(quick: bool = False, exact_only: bool = False) -> list[Setting]:
    """S2D2 settings: block size x threshold x policy (and estimator) x the skip_confident gate, configuration A with
    redrafts, and the relaxed knobs (``relax``, ``commit_confident``) on the gated configuration A; dynamic baselines
    too, so that the table shows what verification buys. ``quick``: a handful, for tests. ``exact_only``: only S2D2
    settings whose verification keeps AR's tokens (no relaxed knob, no dynamic baseline)."""
    space = _space(quick)
    if exact_only:
        space = [s for s in space if verification(s.fields) == "exact"]
    return space


def _space(quick: bool) -> list[Setting]:
    if quick:
        return [Setting("dynamic B=4 t=0.9", dict(method="dynamic", block_size=4, threshold=0.9)),
                Setting("s2d2 config-A B=4 t=0.9", dict(method="s2d2", block_size=4, threshold=0.9)),
                Setting("s2d2 config-A skip-confident B=8 t=0.9",
                        dict(method="s2d2", block_size=8, threshold=0.9, skip_confident=True))]
    space = [Setting(f"dynamic B={b} t={t}", dict(method="dynamic", block_size=b, threshold=t))
             for b in (4, 8, 16) for t in (0.7, 0.9, 0.95)]
    for b in (4, 8, 16):
        for t in (0.7, 0.9, 0.95):
            for name, fields in POLICIES.items():
                for skip in (False, True):
                    label = f"s2d2 {name}{' skip-confident' if skip else ''} B={b} t={t}"
                    space.append(Setting(label, dict(method="s2d2", block_size=b, threshold=t, skip_confident=skip,
                                                     **fields)))
            # redrafts from the verifier (issue 32): exact, on the ungated configuration A where they measured best
            space.append(Setting(f"s2d2 config-A redraft=0.99 B={b} t={t}",
                                 dict(method="s2d2", block_size=b, threshold=t, redraft=0.99)))
            # the speed knobs beyond exact acceptance (docs/decoding.md "Relaxed acceptance"): the relax dial at its
            # top, and confident drafts committed beside a verification; chosen only under a wider accuracy budget
            gated = dict(method="s2d2", block_size=b, threshold=t, skip_confident=True)
            space += [Setting(f"s2d2 config-A skip-confident relax=1 B={b} t={t}", dict(gated, relax=1.0)),
                      Setting(f"s2d2 config-A skip-confident commit-confident B={b} t={t}",
                              dict(gated, commit_confident=True))]
    return space


def verification(fields: dict[str, Any]) -> str:
    """How a setting's verification relates to AR, for the table: ``exact`` (verified tokens are AR's), ``not
    exact (knobs)``, or ``none`` for methods that do not verify."""
    cfg = DecodeConfig.from_dict(fields)
    if cfg.method != "s2d2":
        return "none"
    return f"not exact ({', '.join(cfg.inexact_knobs)})" if cfg.inexact_knobs else "exact"


@dataclass
class TuneResult:
    """Every setting's record (AR first), the AR accuracy the budget counts from, and the winner's record."""

    records: list[dict[str, Any]]
    ar_accuracy: float
    winner: dict[str, Any]

    def table(self) -> str:
        """The trade-off table (Markdown), best first by the objective's ordering."""
        lines = ["| setting | verification | accuracy | vs AR | tokens / forward | tokens / s | within budget |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.records:
            tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") is not None else "–"
            mark = " **(chosen)**" if r is self.winner else ""
            lines.append(f"| {r['name']}{mark} | {verification(r['config'])} | {r['accuracy']:.1%} "
                         f"| {100 * (r['accuracy'] - self.ar_accuracy):+.1f} | {r['tokens_per_forward']:.2f} | {tps} "
                         f"| {'yes' if r['within_budget'] else 'no'} |")
        return "\n".join(lines)


def tune(model: Model, prompts: list[str], checker: Callable[[int, str], bool], space: list[Setting],
         max_drop: float = 1.0, objective: str = "tokens_per_forward", timed: int = 3, repeats: int = 3,
         batch_size: int | str = DEFAULT_BATCH_SIZE, dp: DataParallel | None = None,
         progress: bool = False) -> TuneResult:
    """Search ``space`` on ``prompts`` (the validation split; ``checker(i, text)`` scores prompt i) for the best
    setting by ``objective`` whose accuracy is within ``max_drop`` points of AR's."""
    dp = dp or DataParallel()

    def exact(setting: Setting) -> tuple[float, dict[str, Any]]:
        outs = dp.generate(model, prompts, setting.config(), batch_size)
        return sum(checker(i, o.text) for i, o in enumerate(outs)) / len(prompts), \
            dp.summed_stats(model, outs).to_dict()

    def timing(settings: list[Setting]) -> dict[str, float]:
        records = run_bench(model, prompts, checker, settings, repeats=repeats, dp=dp, progress=progress)
        return {r["name"]: r["tokens_per_s"] for r in records}

    return search(exact, space, max_drop, objective, timed, timing, progress=progress)


def search(exact: Callable[[Setting], tuple[float, dict[str, Any]]], space: list[Setting], max_drop: float = 1.0,
           objective: str = "tokens_per_forward", timed: int = 3,
           timing: Callable[[list[Setting]], dict[str, float]] | None = None,
           progress: bool = False) -> TuneResult:
    """The search itself, over any task: ``exact(setting)`` gives a setting's accuracy (0-1) and summed stats dict;
    ``timing(settings)`` (for ``objective="tokens_per_s"``) their measured tokens/s, AR first. ``progress``: a bar
    of the settings the exact pass has scored, on stderr."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}.")
    if max_drop < 0:
        raise ConfigError(f"the accuracy budget must be >= 0 points, got {max_drop}.")
    if objective == "tokens_per_s" and timing is None:
        raise ConfigError("objective tokens_per_s needs a timed pass, which this task does not offer.")
    records = []
    settings = [Setting("ar", dict(method="ar")), *space]
    for setting in tqdm(settings, desc="tune: exact pass", unit="setting", dynamic_ncols=True, disable=not progress):
        accuracy, stats = exact(setting)
        records.append({"name": setting.name, "config": setting.fields, "accuracy": accuracy,
                        "tokens_per_forward": stats["tokens_per_forward"], "nfe": stats["nfe"],
                        "tokens_per_s": None})
    ar_accuracy = records[0]["accuracy"]
    for r in records:
        r["within_budget"] = r["accuracy"] >= ar_accuracy - max_drop / 100 - 1e-12
    records[1:] = sorted(records[1:], key=lambda r: (-r["tokens_per_forward"], -r["accuracy"]))
    candidates = [r for r in records[1:] if r["within_budget"]]
    winner = candidates[0] if candidates else records[0]
    if objective == "tokens_per_s":
        distinct: dict[tuple[float, int], dict[str, Any]] = {}
        for r in candidates:  # settings that decode alike (same accuracy and forwards) are timed once: the first
            distinct.setdefault((r["accuracy"], r["nfe"]), r)
        chosen = [records[0], *list(distinct.values())[:timed]]
        speeds = timing([Setting(r["name"], r["config"]) for r in chosen])
        for r in chosen:
            r["tokens_per_s"] = speeds[r["name"]]
        winner = max(chosen, key=lambda r: r["tokens_per_s"])
    return TuneResult(records, ar_accuracy, winner)


def lm_eval_exact(model: Model, task_name: str, split: str, limit: int, batch_size: int | str,
                  metric: str | None = None) -> Callable[[Setting], tuple[float, dict[str, Any]]]:
    """``exact`` for :func:`search` over an lm-eval generation task: each setting runs lm-eval's own evaluator on the
    task's ``split`` documents (``validation``: its validation split, refused if it has none), up to ``limit``; the
    accuracy is ``metric`` (default: the task's first metric)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    from s2d2.evaluation.lm_eval import S2D2LM, TASKS_DIR

    try:
        task = TaskManager(include_path=str(TASKS_DIR)).load([task_name])["tasks"].get(task_name)
    except KeyError:
        raise ConfigError(f"lm-eval knows no task {task_name!r} (run `python -m s2d2.lm_eval --tasks list`).") from None
    if task is None or not hasattr(task, "has_validation_docs"):
        raise ConfigError(f"lm-eval task {task_name!r} is not a single task (groups are not supported).")
    if task.config.output_type != "generate_until":
        raise ConfigError(f"lm-eval task {task_name!r} is a {task.config.output_type} task; tune searches decoding "
                          "settings, which only generation tasks use.")
    if split == "validation":
        if not task.has_validation_docs():
            raise ConfigError(f"lm-eval task {task_name!r} has no validation split; tune on --split test only if "
                              "you report results on other data.")
        task.config.test_split = None  # lm-eval evaluates the test split when there is one
    lm = S2D2LM.wrap(model, batch_size)

    def exact(setting: Setting) -> tuple[float, dict[str, Any]]:
        lm.config, lm.stats = setting.config(), DecodeStats()
        results = simple_evaluate(model=lm, tasks=[task], limit=limit, log_samples=False)["results"][task_name]
        names = [k for k in results if "," in k and "stderr" not in k]
        key = next((k for k in names if k.split(",")[0] == metric), None) if metric else (names[0] if names else None)
        if key is None:
            raise ConfigError(f"lm-eval task {task_name!r} reports no metric {metric!r}; it has: "
                              f"{', '.join(k.split(',')[0] for k in names)}.")
        return float(results[key]), lm.stats.to_dict()

    return exact


def winner_config(result: TuneResult) -> dict[str, Any]:
    """The winner's DecodeConfig fields, as ``--config FILE`` reads them (checked here)."""
    fields = dict(result.winner["config"])
    DecodeConfig.from_dict(fields)
    return fields
