"""Pictures of step traces (``s2d2 trace plot``): generated positions left to right, steps top to bottom, each cell
coloured by how its token was committed (accepted draft, verifier correction, fallback, AR token, edit), the
forwards of each step at its left, the decoded tokens under the grid. Several traces are drawn side by side, for
comparing methods on the same prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from s2d2.core.trace import COMMIT_KINDS, SCHEMA
from s2d2.errors import ConfigError

# One colour per way of committing (COMMIT_KINDS order); earlier commits are drawn in a pale version of theirs.
COLOURS = {"accepted": "#2ca02c", "corrected": "#ff7f0e", "fallback": "#1f77b4", "ar": "#9467bd", "edit": "#d62728"}
LABELS = {"accepted": "accepted draft", "corrected": "verifier correction", "fallback": "fallback (confident draft)",
          "ar": "AR token", "edit": "edit"}
DRAFTED = "#e8e8e8"  # still a mask, drafted this step
FORWARD_SHORT = {"draft": "D", "verify": "V", "finalize": "F", "commit": "C", "fused_draft": "d", "fused_token": "t"}


def _printable(text: str) -> str:
    """A token's text as drawn: control characters escaped (fonts have no glyph for them)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def read_trace(path: str, row: int = 0) -> dict[str, Any]:
    """One prompt's trace from a ``--trace`` file: ``{"header": ..., "steps": [...], "done": ...}``; a file that
    is not a trace of the supported schema is one sentence."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read trace file {path} ({e.strerror or type(e).__name__}).") from None
    try:
        events = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"trace file {path} is not JSON lines ({e.msg} at line {e.lineno}).") from None
    events = [e for e in events if isinstance(e, dict) and e.get("row", 0) == row]
    header = next((e for e in events if e.get("type") == "header"), None)
    if header is None:
        raise ConfigError(f"trace file {path} has no header for prompt {row}.")
    if header.get("schema") != SCHEMA:
        raise ConfigError(f"trace file {path} has schema {header.get('schema')!r}; this s2d2 reads {SCHEMA!r}.")
    done = next((e for e in events if e.get("type") == "done"), None)
    if done is None:
        raise ConfigError(f"trace file {path} ends before prompt {row} finished (no 'done' event).")
    return {"header": header, "steps": [e for e in events if e.get("type") == "step"], "done": done}


def grid(trace: dict[str, Any]) -> tuple[list[list[str | None]], int]:
    """The picture's cells: ``cells[step][i]`` for generated position ``first + i`` is a commit kind (committed this
    step), ``"~" + kind`` (committed earlier), ``"drafted"`` (a mask drafted this step) or None; returns the cells
    and ``first``, the first generated position."""
    first = trace["header"]["prompt_tokens"]
    width = len(trace["done"]["token_ids"])
    committed: dict[int, str] = {}
    cells = []
    for step in trace["steps"]:
        row: list[str | None] = [f"~{committed[first + i]}" if first + i in committed else None for i in range(width)]
        for pos in (step.get("draft") or {}).get("positions", []):
            if 0 <= pos - first < width and row[pos - first] is None:
                row[pos - first] = "drafted"
        for c in step.get("commits", []):
            if 0 <= c["pos"] - first < width and c["how"] in COMMIT_KINDS:
                row[c["pos"] - first] = c["how"]
                committed[c["pos"]] = c["how"]
        cells.append(row)
    return cells, first


def plot_traces(traces: list[dict[str, Any]], out: str, titles: list[str] | None = None) -> None:
    """Draw ``traces`` side by side into ``out`` (the format from its suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    def pale(colour: str) -> tuple[float, float, float]:
        return tuple(0.3 * c + 0.7 for c in to_rgb(colour))

    grids = [grid(t) for t in traces]
    widths = [max(4, len(t["done"]["token_ids"])) for t in traces]
    heights = [max(1, len(t["steps"])) for t in traces]
    fig, axes = plt.subplots(1, len(traces), figsize=(sum(0.32 * w + 1.6 for w in widths), 0.3 * max(heights) + 2.4),
                             squeeze=False, gridspec_kw={"width_ratios": widths})
    for k, (ax, trace, (cells, first)) in enumerate(zip(axes[0], traces, grids)):
        tokens = trace["done"]["token_ids"]
        names = trace["header"].get("tokens", {})
        for y, (row, step) in enumerate(zip(cells, trace["steps"])):
            for x, cell in enumerate(row):
                if cell is None:
                    continue
                if cell == "drafted":
                    face = DRAFTED
                elif cell.startswith("~"):
                    face = pale(COLOURS[cell[1:]])
                else:
                    face = COLOURS[cell]
                ax.add_patch(plt.Rectangle((x, y), 1, 1, facecolor=face, edgecolor="white", linewidth=0.6))
            kinds = "".join(FORWARD_SHORT.get(f["kind"], "?") for f in step.get("forwards", []))
            ax.text(-0.3, y + 0.5, kinds, ha="right", va="center", fontsize=7, family="monospace")
        for x, token in enumerate(tokens):
            text = _printable(names.get(str(token), str(token)))
            ax.text(x + 0.5, len(cells) + 0.3, text, ha="center", va="top", fontsize=7, rotation=90, family="monospace")
        ax.set_xlim(-2.2, max(len(tokens), 1))
        ax.set_ylim(len(cells) + 3.5, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ("top", "right", "bottom", "left"):
            ax.spines[side].set_visible(False)
        stats = trace["done"]["stats"]
        header = trace["header"]
        name = titles[k] if titles else header.get("method", "")
        ax.set_title(f"{name}: {header.get('method')} B={header.get('block_size')}, {stats['num_tokens']} tokens, "
                     f"NFE {stats['nfe']}, {stats['tokens_per_forward']:.2f} tokens/forward", fontsize=9)
    legend = [Patch(facecolor=COLOURS[k], label=LABELS[k]) for k in COMMIT_KINDS] + [
        Patch(facecolor=DRAFTED, label="mask (drafted)")]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.text(0.01, 0.01, "left of each step: its forwards (D draft, V verify, F finalize, C commit; d, t: rode along a "
             "verification); paler cells: committed in an earlier step", fontsize=7)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(out, dpi=130)
    plt.close(fig)
