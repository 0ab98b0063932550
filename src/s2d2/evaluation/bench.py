"""``s2d2 bench``: decoding methods side by side on one task, the same prompts, in one process.

Protocol (design.md, "Measuring speed"): one warm-up pass; then ``repeats`` rounds in which every setting decodes
every prompt, the order of settings shuffled each round (seeded) so that drift in machine speed spreads evenly;
time figures are medians over rounds. Accuracy, NFE and tokens per forward are exact (greedy decoding repeats
itself). Speedups are ratios against the ``ar`` setting of the same run: AR time over the setting's time for the
same prompts.

Outputs in ``--out``: ``results.jsonl`` (one record per setting), ``results.md`` (the table, and for each dynamic
setting the S2D2 setting that dominates it), ``pareto.png`` (accuracy against speedup, one curve per method) and
``pareto_tpf.png`` (accuracy against tokens per forward).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2d2.api import Model
from s2d2.config import DecodeConfig
from s2d2.core.stats import DecodeStats
from s2d2.errors import ConfigError
from s2d2.evaluation.distributed import DataParallel
from s2d2.files import parse_json_file


@dataclass(frozen=True)
class Setting:
    """One row of the grid: a display name and the DecodeConfig fields it sets."""

    name: str
    fields: dict[str, Any]

    def config(self) -> DecodeConfig:
        """The setting's DecodeConfig. A benchmark measures greedy decoding unless the setting says otherwise, so the
        checkpoint's generation_config.json sampling defaults apply only if the setting asks for them."""
        return DecodeConfig(**{"generation_config": "none", **self.fields})


def default_grid(quick: bool = False) -> list[Setting]:
    """AR; static B in {4, 8, 16}; dynamic thresholds 0.5-0.95 x B in {4, 8, 16}; S2D2 with every policy and the
    main estimators, the paper's configurations (reference §2.4) and tuned ones; cache_ver / draft_ver on and off."""
    if quick:
        return [Setting("ar", dict(method="ar")),
                Setting("dynamic B=8 t=0.9", dict(method="dynamic", block_size=8, threshold=0.9)),
                Setting("s2d2 config-A B=8", dict(method="s2d2", block_size=8))]
    grid = [Setting("ar", dict(method="ar"))]
    grid += [Setting(f"static B={b} S={b // 2}", dict(method="static", block_size=b, steps=b // 2)) for b in (4, 8, 16)]
    grid += [Setting(f"dynamic B={b} t={t}", dict(method="dynamic", block_size=b, threshold=t))
             for b in (4, 8, 16) for t in (0.5, 0.7, 0.8, 0.9, 0.95)]
    for b in (4, 8, 16):
        for t in (0.5, 0.7, 0.9):
            grid.append(Setting(f"s2d2 config-A B={b} t={t}", dict(method="s2d2", block_size=b, threshold=t)))
    for est in ("soft_entropy_negexp", "hard_margin_threshold"):
        grid.append(Setting(f"s2d2 score_threshold dyn c=1 {est} B=16 t=0.7",
                            dict(method="s2d2", block_size=16, threshold=0.7, estimator=est,
                                 score_type="difference_dynamic", penalty=1.0, tau=0.0)))
    grid += [
        Setting("s2d2 always-verify B=16 (config B)", dict(method="s2d2", block_size=16, policy="score_threshold",
                                                            score_type="difference_static", penalty=0.0, tau=0.0)),
        Setting("s2d2 hysteresis B=16 t=0.9", dict(method="s2d2", block_size=16, policy="score_hysteresis",
                                                   score_type="difference_dynamic", penalty=1.0, tau_on=1.0,
                                                   tau_off=-5.0, threshold=0.9)),
        Setting("s2d2 span>=2 B=8 t=0.7", dict(method="s2d2", block_size=8, policy="mask_span_length", min_span=2,
                                               threshold=0.7)),
        Setting("s2d2 span>=4 B=16 t=0.7", dict(method="s2d2", block_size=16, policy="mask_span_length", min_span=4,
                                                threshold=0.7)),
        Setting("s2d2 ucb B=16 t=0.7", dict(method="s2d2", block_size=16, policy="contextual_bandit_ucb",
                                            threshold=0.7)),
        Setting("s2d2 config-A B=8 t=0.7 no cache_ver/draft_ver", dict(method="s2d2", block_size=8, threshold=0.7,
                                                                       cache_ver=False, draft_ver=False)),
        Setting("s2d2 config-A B=8 t=0.7 no draft_ver", dict(method="s2d2", block_size=8, threshold=0.7,
                                                             draft_ver=False)),
        Setting("s2d2 config-A B=8 t=0.7 no fuse_draft", dict(method="s2d2", block_size=8, threshold=0.7,
                                                              fuse_draft=False)),
        Setting("dynamic B=8 t=0.7 no cache_ver", dict(method="dynamic", block_size=8, threshold=0.7, cache_ver=False,
                                                       draft_ver=False)),
        Setting("ar (reference cost: 2 forwards/token)", dict(method="ar", fuse_commit=False)),
    ]
    # tuned on the validation split (now `s2d2 tune`): config A behind the skip_confident gate
    grid += [
        Setting(f"s2d2 config-A skip-confident B={b} t={t}", dict(method="s2d2", block_size=b, threshold=t,
                                                                  skip_confident=True))
        for b, t in ((4, 0.9), (8, 0.9), (8, 0.95), (16, 0.9), (16, 0.95))
    ]
    # beyond exact acceptance (docs/decoding.md "Relaxed acceptance"): the relax dial, confident drafts committed
    # beside a verification, and with pipelined blocks the fast end of S2D2's front
    gated = dict(method="s2d2", block_size=16, threshold=0.9, skip_confident=True)
    grid += [
        Setting("s2d2 config-A skip-confident B=16 t=0.9 relax=1", dict(gated, relax=1.0)),
        Setting("s2d2 always-verify B=16 relax=1", dict(method="s2d2", block_size=16, penalty=0.0, relax=1.0)),
        Setting("s2d2 config-A skip-confident commit-confident B=16 t=0.9", dict(gated, commit_confident=True)),
        Setting("s2d2 config-A skip-confident commit-confident pipelined B=16 t=0.7",
                dict(gated, threshold=0.7, commit_confident=True, block_add_threshold=0.5)),
    ]
    return grid


def load_grid(path: str) -> list[Setting]:
    """A JSON list of ``{"name": ..., "config": {DecodeConfig fields}}``; validated before anything runs.

    Each entry must be an object with exactly a non-empty string ``name`` (unique in the grid) and an object
    ``config`` of valid DecodeConfig fields, and one entry must use ``method: "ar"``; anything else is a
    :class:`ConfigError` naming the entry by index and name.
    """
    items = parse_json_file(path, ConfigError, label=f"grid file {path}")
    if not isinstance(items, list):
        raise ConfigError(f'grid file {path} must hold a JSON list of {{"name": ..., "config": {{...}}}} objects, '
                          f"not {_json_kind(items)}.")
    grid: list[Setting] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(items):
        grid.append(_grid_entry(i, item))
        name = grid[-1].name
        if name in first_index:
            raise ConfigError(f"grid entries {first_index[name]} and {i} are both named "
                              f"{json.dumps(name, ensure_ascii=False)}; names must be unique.")
        first_index[name] = i
    if not grid:
        raise ConfigError(f"grid file {path} holds an empty list; it needs at least an 'ar' setting.")
    if not any(s.fields.get("method") == "ar" for s in grid):
        raise ConfigError("the grid needs an 'ar' setting: speedups are measured against it.")
    return grid


_GRID_KEYS = ("name", "config")


def _grid_entry(i: int, item: Any) -> Setting:
    """Entry ``i`` of a grid file as a Setting, or a ConfigError naming the entry and what is wrong with it."""
    if not isinstance(item, dict):
        raise ConfigError(f'grid entry {i} must be a JSON object with "name" and "config", not {_json_kind(item)}.')
    if "name" not in item:
        raise ConfigError(f'grid entry {i} has no "name"; every entry needs a non-empty string name.')
    name = item["name"]
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f'grid entry {i} needs a "name" that is a non-empty string, got {_json_kind(name)}.')
    label = f"grid entry {i} ({json.dumps(name, ensure_ascii=False)})"
    unknown = sorted(set(item) - set(_GRID_KEYS))
    if unknown:
        raise ConfigError(f'{label} has the unknown key {unknown[0]!r}; an entry holds only "name" and "config".')
    if "config" not in item:
        raise ConfigError(f'{label} has no "config" (a JSON object of DecodeConfig fields).')
    config = item["config"]
    if not isinstance(config, dict):
        raise ConfigError(f'{label} needs a "config" that is a JSON object of DecodeConfig fields, '
                          f"got {_json_kind(config)}.")
    try:
        DecodeConfig.from_dict(config)
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError; the others would be a traceback
        raise ConfigError(f"{label}: {e}") from None
    return Setting(name, dict(config))


def _json_kind(value: Any) -> str:
    """How JSON names the type of a parsed value, with its article ("a string", "null")."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (dict, "an object"), (list, "a list"), (str, "a string"), ((int, float), "a number"))
    return next((kind for tp, kind in kinds if isinstance(value, tp)), type(value).__name__)


def run_bench(model: Model, prompts: list[str], checker: Callable[[int, str], bool], grid: list[Setting], repeats: int = 3,
              seed: int = 0, progress: bool = True, dp: DataParallel | None = None) -> list[dict[str, Any]]:
    """Decode ``prompts`` with every setting ``repeats`` times (shuffled order); one summary record per setting.

    ``checker(i, text)`` says whether the text generated for prompt ``i`` is correct. With ``dp`` the ranks of a
    data-parallel job split the prompts (every rank runs the same seeded order of settings) and a setting's time
    is the slowest rank's.
    """
    dp = dp or DataParallel()
    configs = {s.name: s.config() for s in grid}
    model.generate(prompts[: min(4, len(prompts))], DecodeConfig(method="ar", generation_config="none"))  # warm-up

    def run(name: str) -> tuple[DecodeStats, list[bool]]:
        outs = dp.generate(model, prompts, configs[name], 1)  # the grid compares methods at batch 1
        return dp.summed_stats(model, outs), [checker(i, o.text) for i, o in enumerate(outs)]

    runs = _shuffled_rounds([s.name for s in grid], run, repeats, seed, "bench" if progress and dp.is_main else None)
    ar_name = next(s.name for s in grid if s.fields.get("method") == "ar")
    ar_time = statistics.median(st.time_s for st, _ in runs[ar_name])
    records = []
    for s in grid:
        stats, correct = runs[s.name][0]  # exact figures: greedy decoding repeats itself
        time_s = statistics.median(st.time_s for st, _ in runs[s.name])
        forward_s = statistics.median(st.forward_time_s for st, _ in runs[s.name])
        d = stats.to_dict()
        records.append({
            "name": s.name, "method": s.fields.get("method", "s2d2"), "config": s.fields,
            "accuracy": sum(correct) / len(correct), "n": len(correct),
            "nfe_per_token": d["nfe"] / max(1, d["num_tokens"]), "tokens_per_forward": d["tokens_per_forward"],
            "rows_per_forward": d["rows_per_forward"],
            "tokens_per_s": d["num_tokens"] / time_s if time_s else 0.0, "time_s": time_s,
            "speedup_vs_ar": ar_time / time_s if time_s else 0.0,
            "verify_rate": d["verify_forwards"] / max(1, d["steps"]),  # share of steps that verified
            "mean_accepted_length": d["mean_accepted_length"],
            "loop_share": 1.0 - forward_s / time_s if time_s else 0.0,
            "stats": d, "repeats": repeats,
        })
    return records


def throughput_grid(quick: bool = False) -> list[Setting]:
    """The settings of the batch-size section: AR, the tuned dynamic baseline, S2D2 configuration A at B = 8, and
    the fastest S2D2 setting at AR accuracy in BENCHMARKS.md (config A behind skip_confident, B = 16, t = 0.9)."""
    grid = [Setting("ar", dict(method="ar")),
            Setting("dynamic B=4 t=0.9", dict(method="dynamic", block_size=4, threshold=0.9)),
            Setting("s2d2 config-A B=8", dict(method="s2d2", block_size=8))]
    if not quick:
        grid.append(Setting("s2d2 config-A skip-confident B=16 t=0.9",
                            dict(method="s2d2", block_size=16, threshold=0.9, skip_confident=True)))
    return grid


def run_throughput(model: Model, prompts: list[str], checker: Callable[[int, str], bool], grid: list[Setting],
                   batch_sizes: list[int], repeats: int = 3, seed: int = 0,
                   progress: bool = True) -> list[dict[str, Any]]:
    """Every setting at every batch size, ``repeats`` shuffled rounds; one record per (setting, batch size).

    Exact figures (accuracy, per-row tokens per forward, rows per forward, padding) come from the first round;
    time figures are medians. ``speedup_vs_batch_1`` compares a setting with itself at batch size 1 (which must
    then be among ``batch_sizes``), ``speedup_vs_ar`` with AR at the same batch size.
    """
    configs = {s.name: s.config() for s in grid}
    model.generate(prompts[: min(4, len(prompts))], DecodeConfig(method="ar", generation_config="none"))  # warm-up

    def run(cell: tuple[str, int]) -> tuple[float, DecodeStats, Any, list[bool]]:
        t0 = time.perf_counter()
        outs = model.generate(prompts, configs[cell[0]], batch_size=cell[1])
        wall = time.perf_counter() - t0
        stats = model.summed_stats(outs)
        return wall, stats, model.last_batch_stats, [checker(i, o.text) for i, o in enumerate(outs)]

    cells = [(s.name, b) for s in grid for b in batch_sizes]
    runs = _shuffled_rounds(cells, run, repeats, seed, "throughput" if progress else None)
    wall = {c: statistics.median(r[0] for r in runs[c]) for c in runs}
    records = []
    for s in grid:
        for b in batch_sizes:
            _, stats, batch, correct = runs[(s.name, b)][0]
            bd = batch.to_dict()
            host = statistics.median(1.0 - r[2].forward_time_s / r[2].time_s for r in runs[(s.name, b)])
            engine = statistics.median(r[2].to_dict()["engine_share"] for r in runs[(s.name, b)])
            records.append({
                "name": s.name, "method": s.fields.get("method", "s2d2"), "config": s.fields, "batch_size": b,
                "accuracy": sum(correct) / len(correct), "n": len(correct),
                "tokens_per_forward": stats.num_tokens / stats.nfe, "nfe": stats.nfe, "num_tokens": stats.num_tokens,
                "engine_steps": batch.steps, "rows_per_forward": bd["rows_per_forward"],
                "mean_batch": bd["mean_batch"], "padding_share": bd["padding_share"], "host_share": host,
                "engine_share": engine,
                "time_s": wall[(s.name, b)], "tokens_per_s": stats.num_tokens / wall[(s.name, b)],
                "speedup_vs_batch_1": wall[(s.name, 1)] / wall[(s.name, b)] if (s.name, 1) in wall else None,
                "speedup_vs_ar": wall[(grid[0].name, b)] / wall[(s.name, b)], "repeats": repeats,
            })
    return records


def write_throughput(records: list[dict[str, Any]], out: Path, title: str) -> None:
    """throughput.jsonl, throughput.md and throughput.png (generated tokens/s against batch size) in ``out``."""
    _write_records(records, out, "throughput", title, [
        ("setting", lambda r: r["name"]), ("batch", lambda r: str(r["batch_size"])),
        ("accuracy", lambda r: f"{r['accuracy']:.1%}"),
        ("tokens / forward (per row)", lambda r: f"{r['tokens_per_forward']:.2f}"),
        ("rows / forward", lambda r: f"{r['rows_per_forward']:.1f}"),
        ("padding", lambda r: f"{r['padding_share']:.1%}"),
        ("host share (engine's own)", lambda r: f"{r['host_share']:.1%} ({r['engine_share']:.1%})"),
        ("tokens / s", lambda r: f"{r['tokens_per_s']:.0f}"),
        ("vs batch 1", lambda r: "-" if r["speedup_vs_batch_1"] is None else f"{r['speedup_vs_batch_1']:.2f}x"),
        ("vs AR", lambda r: f"{r['speedup_vs_ar']:.2f}x")])
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in dict.fromkeys(r["name"] for r in records):
        pts = [(r["batch_size"], r["tokens_per_s"]) for r in records if r["name"] == name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (prompts decoded together)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)


def dominating(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """For every ``dynamic`` record, the ``s2d2`` record that dominates it: at least its accuracy and at least its
    tokens per forward (both exact), the fastest such by tokens per forward (ties: the more accurate), or None."""
    s2d2 = [r for r in records if r["method"] == "s2d2"]
    pairs = []
    for d in (r for r in records if r["method"] == "dynamic"):
        better = [r for r in s2d2 if r["accuracy"] >= d["accuracy"] and r["tokens_per_forward"] >= d["tokens_per_forward"]]
        pairs.append((d, max(better, key=lambda r: (r["tokens_per_forward"], r["accuracy"]), default=None)))
    return pairs


def _coverage_lines(records: list[dict[str, Any]]) -> list[str]:
    """results.md's section: each dynamic setting and the S2D2 setting that dominates it (empty if either is absent)."""
    pairs = dominating(records)
    if not pairs or not any(r["method"] == "s2d2" for r in records):
        return []
    lines = ["", "## Dynamic settings and the S2D2 setting that dominates each", "",
             "At least the dynamic setting's accuracy and at least its tokens per forward (exact figures); of those, "
             "the fastest per forward.", "",
             "| dynamic setting | accuracy | tokens / forward | S2D2 setting | accuracy | tokens / forward | ratio |",
             "|---|---|---|---|---|---|---|"]
    for d, r in sorted(pairs, key=lambda p: -p[0]["tokens_per_forward"]):
        ours = ("none", "–", "–", "–") if r is None else (
            r["name"], f"{r['accuracy']:.1%}", f"{r['tokens_per_forward']:.2f}",
            f"{r['tokens_per_forward'] / d['tokens_per_forward']:.2f}x")
        lines.append(f"| {d['name']} | {d['accuracy']:.1%} | {d['tokens_per_forward']:.2f} | " + " | ".join(ours) + " |")
    return lines


def write_outputs(records: list[dict[str, Any]], out: Path, title: str) -> None:
    """results.jsonl, results.md (with the dominance table) and the Pareto plots in ``out``: ``pareto.png``
    (accuracy against wall-clock speedup) and ``pareto_tpf.png`` (against tokens per forward, exact)."""
    _write_records(records, out, "results", title, [
        ("setting", lambda r: r["name"]), ("accuracy", lambda r: f"{r['accuracy']:.1%}"),
        ("NFE / token", lambda r: f"{r['nfe_per_token']:.3f}"),
        ("tokens / forward", lambda r: f"{r['tokens_per_forward']:.2f}"),
        ("rows / forward", lambda r: f"{r['rows_per_forward']:.1f}"),
        ("tokens / s", lambda r: f"{r['tokens_per_s']:.0f}"),
        ("speedup vs AR", lambda r: f"{r['speedup_vs_ar']:.2f}x"), ("verify rate", lambda r: f"{r['verify_rate']:.2f}"),
        ("mean accepted", lambda r: f"{r['mean_accepted_length']:.2f}"),
        ("loop share", lambda r: f"{r['loop_share']:.1%}")])
    coverage = _coverage_lines(records)
    if coverage:
        with (out / "results.md").open("a") as f:
            f.write("\n".join(coverage) + "\n")
    plot_pareto(records, out / "pareto.png", title)
    plot_pareto(records, out / "pareto_tpf.png", title, axis="tokens_per_forward")


# x axes of the Pareto plots: record key -> axis label
PARETO_AXES = {"speedup_vs_ar": "wall-clock speedup vs AR (x)", "tokens_per_forward": "tokens per forward (exact)"}


def plot_pareto(records: list[dict[str, Any]], path: Path, title: str, axis: str = "speedup_vs_ar") -> bool:
    """Accuracy against ``axis`` (a key of :data:`PARETO_AXES`), one marker set and Pareto curve per method; False if
    no matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    for method in dict.fromkeys(r["method"] for r in records):
        pts = sorted((r[axis], r["accuracy"] * 100) for r in records if r["method"] == method)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method, s=18)
        front, best = [], -1.0
        for x, y in sorted(pts, key=lambda p: -p[0]):  # from the fastest: keep points more accurate than all faster
            if y > best:
                front.append((x, y))
                best = y
        front.sort()
        ax.plot([p[0] for p in front], [p[1] for p in front], linewidth=1)
    ax.set_xlabel(PARETO_AXES[axis])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _shuffled_rounds(cells: list[Any], run: Callable[[Any], Any], repeats: int, seed: int,
                     progress: str | None) -> dict[Any, list[Any]]:
    """``run(cell)`` for every cell in ``repeats`` rounds, the order shuffled each round (seeded) so that drift in
    machine speed spreads evenly; returns each cell's results in round order. ``progress``: a bar's label."""
    runs: dict[Any, list[Any]] = {c: [] for c in cells}
    order = list(cells)
    rng = random.Random(seed)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=repeats * len(cells), desc=progress, dynamic_ncols=True)
    for _ in range(repeats):
        rng.shuffle(order)
        for cell in order:
            runs[cell].append(run(cell))
            if bar is not None:
                bar.update(1)
                # a throughput cell is (setting, batch size)
                bar.set_postfix_str(f"{cell[0]} at batch {cell[1]}" if isinstance(cell, tuple) else str(cell))
    if bar is not None:
        bar.close()
    return runs


def _write_records(records: list[dict[str, Any]], out: Path, stem: str, title: str,
                   columns: list[tuple[str, Callable[[dict[str, Any]], str]]]) -> None:
    """``stem``.jsonl (the records) and ``stem``.md (a table with one column per (header, format) pair)."""
    _write_jsonl(records, out / f"{stem}.jsonl")
    lines = [f"# {title}", "", "| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r) for _, fmt in columns) + " |" for r in records]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def _write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
