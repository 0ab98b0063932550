"""Step traces (schema s2d2.trace/1): every step, forward and commit accounted for and consistent with the stats and
the output, for every method and family quirk; batched traces equal batch 1's; tracing changes nothing; the CLI
writes them and draws them."""

from __future__ import annotations

import json

import pytest

from s2d2 import DecodeConfig
from s2d2.cli import main
from s2d2.core.trace import COMMIT_KINDS, SCHEMA
from s2d2.evaluation.trace_plot import (
    DPI,
    MAX_PX,
    MIN_TEXT_PT,
    TEXT_PT,
    plot_traces,
    trace_figure,
)

PROMPTS = [[72, 101, 108, 108, 111], list(range(40, 56)), [3, 250, 9]]
CONFIGS = {
    "ar": dict(method="ar"),
    "dynamic": dict(method="dynamic", block_size=4, threshold=0.3),
    "s2d2": dict(method="s2d2", block_size=4, threshold=0.3),
    "s2d2-always": dict(method="s2d2", block_size=4, policy="mask_span_length", min_span=1),
    "s2d2-ucb": dict(method="s2d2", block_size=8, policy="contextual_bandit_ucb"),
    "pipelined": dict(method="s2d2", block_size=4, threshold=0.3, block_add_threshold=0.5),
    "s2d2-redraft": dict(method="s2d2", block_size=8, policy="mask_span_length", min_span=1, redraft=0.0),
}
FORWARD_COUNTERS = {"draft": "draft_forwards", "verify": "verify_forwards", "finalize": "prefill_or_commit",
                    "commit": "prefill_or_commit"}


def check_trace(trace: list[dict], token_ids: list[int], stats, prompt_len: int, method: str) -> None:
    """The invariants a trace must satisfy against its generation."""
    header, steps, done = trace[0], trace[1:-1], trace[-1]
    assert header["type"] == "header" and header["schema"] == SCHEMA and header["prompt_tokens"] == prompt_len
    assert done["type"] == "done" and done["token_ids"] == token_ids and done["stats"]["nfe"] == stats.nfe
    assert [s["step"] for s in steps] == list(range(stats.steps)) and all(s["type"] == "step" for s in steps)
    forwards = [f for s in steps for f in s["forwards"]] + done["forwards"]
    kinds = [f["kind"] for f in forwards]
    assert kinds.count("draft") == stats.draft_forwards and kinds.count("verify") == stats.verify_forwards
    assert kinds.count("fused_draft") + kinds.count("fused_token") == stats.fused_drafts
    assert kinds.count("redraft") == stats.redrafts
    assert kinds.count("finalize") + kinds.count("commit") == stats.prefill_forwards + stats.commit_forwards
    free = [f["kind"].startswith("fused") or f["kind"] == "redraft" for f in forwards]  # drafts without a forward
    assert all((f["rows"] > 0) == (not no_forward) for f, no_forward in zip(forwards, free))
    assert sum(not no_forward for no_forward in free) == stats.nfe
    # commits rebuild the output: every generated position once (edits replace), nothing outside it
    final: dict[int, int] = {}
    for s in [*steps, done]:
        for c in s["commits"]:
            assert c["how"] in COMMIT_KINDS
            assert (c["pos"] in final) == (c["how"] == "edit"), c
            final[c["pos"]] = c["token"]
    got = [final.get(prompt_len + i) for i in range(len(token_ids))]
    assert got == token_ids
    # drafts lie in their step's block (the blocks in flight, when pipelined), and every accepted, corrected or
    # fallback commit lands on one of the step's draft positions (the first two with the draft's token)
    size, pipelined = header["block_size"], header["pipelined"]
    for s in steps:
        if s["draft"] is None:
            continue
        positions = s["draft"]["positions"]
        assert positions == sorted(set(positions)) and all(p >= max(s["block"], prompt_len) for p in positions), s
        if not pipelined:
            assert all(p < s["block"] + size for p in positions), s
        drafted = dict(zip(positions, s["draft"]["tokens"]))
        plain = ("ar",) if method == "ar" else ()  # AR's tokens are drafts; a block's AR-mode first token is not
        for c in s["commits"]:
            if c["how"] in ("accepted", "corrected", "fallback", *plain):
                assert c["pos"] in drafted, (c, positions)
            if c["how"] in ("accepted", "fallback", *plain):
                assert c["token"] == drafted[c["pos"]], (c, drafted)
    # routing and verification
    for s in steps:
        route, verify = s["route"], s["verify"]
        assert (route is not None) == (method == "s2d2" and s["draft"] is not None and route is not None)
        assert (verify is not None) == (route is not None and route["verify"])
        if verify is not None:
            hows = [c["how"] for c in s["commits"] if route["span"][0] <= c["pos"] < route["span"][1]]
            assert hows.count("accepted") == verify["accepted"]
            assert hows.count("corrected") == (verify["correction"] is not None)
        if route is not None and route.get("redraft"):  # a redraft is verified without asking the policy
            assert route["verify"] and any(f["kind"] == "redraft" for f in s["forwards"]), s
        elif route is not None and route["policy"].startswith("score"):
            assert route["expected_accepted"] == pytest.approx(
                sum(__import__("math").prod(route["alphas"][:k + 1]) for k in range(len(route["alphas"]))), abs=1e-4)
    verifies = [s["verify"] for s in steps if s["verify"] is not None]
    assert sum(v["accepted"] for v in verifies) == stats.accepted_tokens
    assert sum(v["proposed"] for v in verifies) == stats.proposed_tokens
    # the base strategy's commits: AR's one-token blocks are AR tokens (coloured so), the others fallback
    plain = "ar" if method == "ar" else "fallback"
    assert sum(c["how"] == plain for s in steps for c in s["commits"]) == stats.fallback_tokens
    if method == "ar":
        assert {c["how"] for s in steps for c in s["commits"]} == {"ar"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_traces_account_for_every_step_forward_and_commit(model, name):
    cfg = DecodeConfig(**CONFIGS[name], max_new_tokens=20, stop_token_ids=(), generation_config="none")
    for prompt in PROMPTS:
        plain = model.generate(prompt, cfg, batch_size=1)[0]
        traced = model.generate(prompt, cfg, batch_size=1, trace=True)[0]
        assert plain.trace is None  # off unless asked for, and asking changes nothing
        assert (traced.token_ids, traced.stats.nfe, traced.stats.steps) == (plain.token_ids, plain.stats.nfe,
                                                                            plain.stats.steps)
        check_trace(traced.trace, traced.token_ids, traced.stats, len(prompt), cfg.method)


@pytest.mark.parametrize("family, cfg", [
    ("fast_dllm_v2", dict(method="s2d2", block_size=4)),  # each block opens with an AR token
    ("llada2", dict(method="s2d2", block_size=4, editing_threshold=0.3, max_post_steps=2)),  # edits
    ("d2f_dream", dict(method="s2d2", block_size=4, block_add_threshold=0.5, threshold=0.3)),  # pipelined, shifted
])
def test_traces_of_family_quirks(family_model, family, cfg):
    model = family_model(family)
    config = DecodeConfig(**cfg, max_new_tokens=16, stop_token_ids=(), generation_config="none")
    hows = set()
    for prompt in PROMPTS:
        out = model.generate(prompt, config, batch_size=1, trace=True)[0]
        check_trace(out.trace, out.token_ids, out.stats, len(prompt), config.method)
        hows |= {c["how"] for e in out.trace[1:-1] for c in e["commits"]}
    assert ("edit" in hows) == (family == "llada2") and ("ar" in hows) == (family != "llada2")


def _untimed(trace: list[dict]) -> list[dict]:
    """A trace without its times (a batched forward's time is the batch's), probabilities to 3 decimals (batched
    forwards round differently in the last float bits)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "time" not in k and k != "tokens_per_s"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return round(value, 3) if isinstance(value, float) else value
    return strip(trace)


def test_batched_traces_equal_batch_1(model):
    cfg = DecodeConfig(**CONFIGS["s2d2"], max_new_tokens=20, stop_token_ids=(), generation_config="none")
    batched = model.generate(PROMPTS, cfg, batch_size=3, trace=True)
    for prompt, out in zip(PROMPTS, batched):
        alone = model.generate(prompt, cfg, batch_size=1, trace=True)[0]
        assert _untimed(out.trace) == _untimed(alone.trace)


def test_cli_writes_traces_and_draws_them(random_model_dir, tmp_path, capsys):
    files = []
    for method in ("dynamic", "s2d2"):
        path = tmp_path / f"{method}.jsonl"
        assert main(["generate", "ab", "cd", "--model", str(random_model_dir), "--method", method, "--block-size", "4",
                     "--max-new-tokens", "12", "--trace", str(path)]) == 0
        events = [json.loads(line) for line in path.read_text().splitlines()]
        assert {e["row"] for e in events} == {0, 1}
        header = next(e for e in events if e["row"] == 1 and e["type"] == "header")
        assert header["text"] == "cd" and header["schema"] == SCHEMA and isinstance(header["tokens"], dict)
        files.append(str(path))
    capsys.readouterr()
    for args in ([files[1]], files, [files[0], "--row", "1"]):
        out = tmp_path / "trace.png"
        out.unlink(missing_ok=True)
        assert main(["trace", "plot", *args, "-o", str(out)]) == 0
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["trace", "plot", files[0], "-o", str(tmp_path / "no-such-dir" / "x.png")]) == 2
    assert "cannot write" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"row": 0, "type": "header", "schema": "other/9"}\n')
    assert main(["trace", "plot", str(bad), "-o", str(tmp_path / "x.png")]) == 2
    assert "has schema 'other/9'; this s2d2 reads 's2d2.trace/1'." in capsys.readouterr().err


def _synthetic_trace(method: str, steps: int, positions: int, token: str = "ab") -> dict:
    """A trace as read_trace returns it: ``positions`` tokens committed in ``steps`` steps (the last takes the rest),
    one draft forward per step."""
    per_step = max(1, positions // steps)
    events = []
    for step in range(steps):
        span = range(step * per_step, positions if step == steps - 1 else (step + 1) * per_step)
        events.append({"type": "step", "step": step, "block": 0, "route": None, "verify": None,
                       "draft": {"positions": list(span), "tokens": [1] * len(span), "confidence": [1.0] * len(span)},
                       "commits": [{"pos": p, "token": 1, "how": "fallback"} for p in span],
                       "forwards": [{"kind": "draft", "rows": len(span), "time_s": 0.0}]})
    header = {"type": "header", "schema": SCHEMA, "prompt_tokens": 0, "block_size": 1 if method == "ar" else 8,
              "method": method, "policy": "score_threshold" if method == "s2d2" else None, "threshold": 0.7,
              "pipelined": False, "tokens": {"1": token}}
    stats = {"num_tokens": positions, "nfe": steps, "tokens_per_forward": positions / steps}
    return {"header": header, "steps": events, "done": {"type": "done", "token_ids": [1] * positions, "stats": stats}}


def _grid_boxes(fig) -> list:
    """Each pane's grid (its axes) in inches from the figure's bottom left, left to right."""
    width, height = fig.get_size_inches()
    boxes = [ax.get_position() for ax in fig.axes]
    return sorted((b.x0 * width, b.y0 * height, b.width * width, b.height * height) for b in boxes)


def _legend_box(fig) -> tuple[float, float, float, float]:
    """The legend's left, right, bottom and top, in inches from the figure's bottom left."""
    box = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
    return box.x0 / fig.dpi, box.x1 / fig.dpi, box.y0 / fig.dpi, box.y1 / fig.dpi


def test_trace_panes_share_one_scale_and_sit_tight():
    traces = [_synthetic_trace("dynamic", 5, 12), _synthetic_trace("s2d2", 3, 7), _synthetic_trace("ar", 9, 9)]
    fig = trace_figure(traces)
    boxes = _grid_boxes(fig)
    # one step is as high, one position as wide, in every pane (square cells): fewer steps, a shorter pane
    cells = [(w / len(t["done"]["token_ids"]), h / len(t["steps"])) for t, (_, _, w, h) in zip(traces, boxes)]
    assert all(c == pytest.approx(cells[0][0], rel=1e-6) for cell in cells for c in cell)
    assert boxes[1][3] < boxes[0][3] < boxes[2][3]
    assert max(b[3] for b in boxes) / fig.get_size_inches()[1] > 0.6  # the grids fill the picture
    tops = [y + h for _, y, _, h in boxes]
    assert tops == pytest.approx([tops[0]] * 3)  # top-aligned: step k is on one line across panes
    # no blank band: the legend sits just under the grids (under the tokens of the lowest), and the picture is the
    # tallest grid plus its title, tokens and legend
    assert min(y for _, y, _, _ in boxes) - _legend_box(fig)[3] < 0.8
    assert fig.get_size_inches()[1] - (max(tops) - min(y for _, y, _, _ in boxes)) < 2.5
    # with the tallest pane first, the legend goes in the room under the others and the picture grows no taller
    fig = trace_figure([traces[2], traces[0], traces[1]])
    boxes = _grid_boxes(fig)
    x0, _, y0, y1 = _legend_box(fig)
    assert boxes[1][0] - 0.5 < x0 and y1 < boxes[1][1] and y0 > boxes[0][1]


def test_trace_titles_name_the_method_once():
    fig = trace_figure([_synthetic_trace("dynamic", 4, 20), _synthetic_trace("s2d2", 6, 23)],
                       labels=["dynamic", "sdar-1.7b"])
    texts = [t.get_text() for t in fig.texts]
    assert "dynamic · B=8 · threshold 0.7" in texts  # a label that only repeats the method is left out
    assert "sdar-1.7b · S2D2 · B=8 · threshold 0.7 · score_threshold" in texts
    assert "23 tokens in 6 steps, NFE 6, 3.83 tokens/forward" in texts
    titles = " ".join(texts).lower()
    assert titles.count("dynamic") == 1 and titles.count("s2d2") == 1 and "dynamic:" not in titles


def test_trace_pictures_are_bounded_and_readable(tmp_path):
    from PIL import Image

    small = [_synthetic_trace("dynamic", 4, 20), _synthetic_trace("s2d2", 6, 23)]
    fig = trace_figure(small)
    sizes = {t.get_fontsize() for ax in fig.axes for t in ax.texts}
    assert sizes == {TEXT_PT}  # full-size tokens and forwards
    assert len([t for t in fig.axes[1].texts if t.get_text() == "ab"]) == 23
    plot_traces(small, str(tmp_path / "small.png"))
    with Image.open(tmp_path / "small.png") as im:
        assert all(abs(px - s * DPI) <= 1 for px, s in zip(im.size, fig.get_size_inches()))  # full resolution
    for long in ([_synthetic_trace("ar", 256, 256)], [_synthetic_trace("dynamic", 128, 128)] * 2,
                 [_synthetic_trace("ar", 256, 256), _synthetic_trace("s2d2", 60, 256)] * 2):
        plot_traces(long, str(tmp_path / "long.png"))
        with Image.open(tmp_path / "long.png") as im:
            assert MAX_PX * 0.9 <= max(im.size) <= MAX_PX
        fig = trace_figure(long)
        for ax in fig.axes:  # per-cell text too small to read gives way to step and position numbers
            assert not ax.texts or min(t.get_fontsize() for t in ax.texts) >= MIN_TEXT_PT
            assert ax.texts or (ax.get_xticks().size and ax.get_yticks().size)


def test_cli_trace_labels(random_model_dir, tmp_path, capsys):
    path = tmp_path / "s2d2.jsonl"
    assert main(["generate", "ab", "--model", str(random_model_dir), "--max-new-tokens", "6", "--trace",
                 str(path)]) == 0
    out = tmp_path / "trace.png"
    assert main(["trace", "plot", str(path), str(path), "--labels", "one", "two", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["trace", "plot", str(path), str(path), "--labels", "one", "-o", str(out)]) == 2
    assert "--labels needs one name per trace file (2), got 1." in capsys.readouterr().err
