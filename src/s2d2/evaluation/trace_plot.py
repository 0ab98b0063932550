"""Pictures of step traces (``s2d2 trace plot``): generated positions left to right, steps top to bottom, each cell
coloured by how its token was committed (accepted draft, verifier correction, fallback, AR token, edit), the
forwards of each step at its left, the decoded tokens under the grid. Several traces are drawn side by side, for
comparing methods on the same prompt: every pane draws a step and a position at the same size, so a decode with
fewer steps is a shorter pane."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s2d2.core.trace import COMMIT_KINDS, SCHEMA
from s2d2.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# One colour per way of committing (COMMIT_KINDS order); earlier commits are drawn in a pale version of theirs.
COLOURS = {"accepted": "#2ca02c", "corrected": "#ff7f0e", "fallback": "#1f77b4", "ar": "#9467bd", "edit": "#d62728"}
LABELS = {"accepted": "accepted draft", "corrected": "verifier correction", "fallback": "fallback (confident draft)",
          "ar": "AR token", "edit": "edit"}
DRAFTED = "#e8e8e8"  # still a mask, drafted this step
FORWARD_SHORT = {"draft": "D", "verify": "V", "finalize": "F", "commit": "C", "fused_draft": "d", "fused_token": "t",
                 "redraft": "r"}
FORWARD_NAMES = {"draft": "draft", "verify": "verify", "finalize": "finalize", "commit": "commit",
                 "fused_draft": "draft carried by the last verify", "fused_token": "token carried by the last verify",
                 "redraft": "draft from the last verify's rows after its rejection"}
METHOD_NAMES = {"ar": "AR", "static": "static", "dynamic": "dynamic", "s2d2": "S2D2"}

# Sizes (inches, points). A cell is CELL_IN square in every pane while the picture fits MAX_PX at DPI on both sides;
# a longer trace shrinks the cells of all panes alike (so they stay comparable), the per-cell text with them, and
# drops that text for step and position numbers once it would be smaller than MIN_TEXT_PT.
DPI = 150
MAX_PX = 3000
CELL_IN = 0.2
TEXT_PT, MIN_TEXT_PT, TICK_PT = 8.0, 5.5, 7.0  # tokens and forwards (at CELL_IN); step and position numbers
TITLE_PT, NOTE_PT = 10.0, 8.5
MARGIN_IN, PANE_GAP_IN, GAP_IN, KEY_GAP_IN = 0.12, 0.35, 0.05, 0.12
MAX_TOKEN_CHARS = 8


def _printable(text: str) -> str:
    """A token's text as drawn: control characters escaped (fonts have no glyph for them), spaces shown as
    ``␣`` (a token that is a space would otherwise look like no token), a token with no text (a special token) as
    ``∅``, long tokens cut with ``…``."""
    text = "".join("␣" if c == " " else c if c.isprintable() else repr(c)[1:-1] for c in text) or "∅"
    return text if len(text) <= MAX_TOKEN_CHARS else text[:MAX_TOKEN_CHARS - 1] + "…"


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


@dataclass
class _Pane:
    """One trace's part of the picture: its cells and texts, and the sizes (inches) of those texts that the layout
    needs (per-cell text measured at TEXT_PT; it scales with the cell)."""

    cells: list[list[str | None]]  # [steps][positions], see grid()
    title: tuple[str, str]
    forwards: list[str]  # per step, e.g. "dV"
    tokens: list[str]  # per position, as drawn
    title_w: float
    forwards_w: float  # the longest forwards string, at TEXT_PT
    tokens_h: float  # the longest token, rotated, at TEXT_PT
    ticks_w: float  # the largest step number, at TICK_PT

    @property
    def positions(self) -> int:
        return max(1, len(self.tokens))

    @property
    def steps(self) -> int:
        return max(1, len(self.cells))


def _title(trace: dict[str, Any], label: str | None) -> tuple[str, str]:
    """A pane's two title lines: what decoded (``label`` when it says more than the method, the method once, its
    key settings), then what it cost."""
    header, stats = trace["header"], trace["done"]["stats"]
    method = str(header.get("method", "?"))
    name = METHOD_NAMES.get(method, method)
    parts = [name]
    if label and label.strip().lower() not in (method.lower(), name.lower()):
        parts.insert(0, label)
    if method != "ar":
        parts.append(f"B={header.get('block_size')}")
    if method in ("dynamic", "s2d2") and header.get("threshold") is not None:
        parts.append(f"threshold {header['threshold']:g}")
    if header.get("policy"):
        parts.append(str(header["policy"]))
    if header.get("pipelined"):
        parts.append("pipelined")
    steps = len(trace["steps"])
    cost = (f"{stats['num_tokens']} tokens in {steps} step{'s' * (steps != 1)}, NFE {stats['nfe']}, "
            f"{stats['tokens_per_forward']:.2f} tokens/forward")
    return " · ".join(parts), cost


def _pane(fig: Figure, trace: dict[str, Any], label: str | None) -> _Pane:
    """Measure one trace's texts (monospace: the longest string is the widest)."""
    cells, _ = grid(trace)
    names = trace["header"].get("tokens", {})
    tokens = [_printable(names.get(str(t), str(t))) for t in trace["done"]["token_ids"]]
    forwards = ["".join(FORWARD_SHORT.get(f["kind"], "?") for f in step.get("forwards", [])) for step in trace["steps"]]
    title = _title(trace, label)
    mono: dict[str, Any] = {"fontsize": TEXT_PT, "family": "monospace"}
    return _Pane(cells, title, forwards, tokens,
                 title_w=max(_extent(fig, title[0], fontsize=TITLE_PT, weight="bold")[0],
                             _extent(fig, title[1], fontsize=NOTE_PT)[0]),
                 forwards_w=_extent(fig, max(forwards, key=len, default="") or "D", **mono)[0],
                 tokens_h=_extent(fig, max(tokens, key=len, default="") or "0", rotation=90, **mono)[1],
                 ticks_w=_extent(fig, str(len(cells)), fontsize=TICK_PT)[0])


def _margins(pane: _Pane, text_pt: float) -> tuple[float, float]:
    """Room (inches) left of and under a pane's grid: the forwards and tokens at ``text_pt``, or (0) step and
    position numbers."""
    if text_pt:
        scale = text_pt / TEXT_PT
        return pane.forwards_w * scale + GAP_IN, pane.tokens_h * scale + GAP_IN
    return pane.ticks_w + 3 * GAP_IN, TICK_PT / 72 + 3 * GAP_IN


def _places(panes: list[_Pane], cell: float, text_pt: float, top: float) -> tuple[list[float], list[float], float]:
    """Where the panes go, in inches from the picture's top left, their grids' tops at ``top``: each pane's left
    edge (its forwards or step numbers come before its grid), its bottom (under its tokens), and the picture's
    width."""
    x, starts, bottoms = MARGIN_IN, [], []
    for pane in panes:
        left, below = _margins(pane, text_pt)
        starts.append(x)
        bottoms.append(top + pane.steps * cell + below)
        x += left + max(pane.positions * cell, pane.title_w) + PANE_GAP_IN  # the title starts over the grid
    return starts, bottoms, x - PANE_GAP_IN + MARGIN_IN


def _size(panes: list[_Pane], cell: float, text_pt: float, title_h: float, foot_h: float) -> tuple[float, float]:
    """The picture's width and height (inches) with cells of ``cell`` inches and the legend and note (``foot_h``
    high) under all panes."""
    _, bottoms, width = _places(panes, cell, text_pt, MARGIN_IN + title_h + GAP_IN)
    return width, max(bottoms) + KEY_GAP_IN + foot_h + MARGIN_IN


def _cell_size(panes: list[_Pane], title_h: float, foot_h: float) -> tuple[float, float]:
    """The cell size (inches) and the per-cell text size (points; 0: none) that fit MAX_PX at DPI."""
    def largest(text: bool) -> float:
        def fits(cell: float) -> bool:
            text_pt = TEXT_PT * cell / CELL_IN if text else 0
            return max(_size(panes, cell, text_pt, title_h, foot_h)) * DPI <= MAX_PX
        if fits(CELL_IN):
            return CELL_IN
        low, high = 0.0, CELL_IN  # the size grows with the cell: bisect
        for _ in range(30):
            low, high = ((low + high) / 2, high) if fits((low + high) / 2) else (low, (low + high) / 2)
        return low
    cell = largest(text=True)
    if TEXT_PT * cell / CELL_IN >= MIN_TEXT_PT:
        return cell, TEXT_PT * cell / CELL_IN
    return max(largest(text=False), 1 / DPI), 0.0


def _draw_grid(ax: Any, pane: _Pane, cell: float, text_pt: float) -> None:
    """One pane's cells, with its forwards and tokens (or step and position numbers) around them."""
    from matplotlib.ticker import MaxNLocator

    # one image pixel per cell (a long trace has tens of thousands), white lines between the cells, thinner on small
    # cells so that the colours still dominate
    white = (1.0, 1.0, 1.0)
    image = [[white] * pane.positions for _ in range(pane.steps)]
    for y, row in enumerate(pane.cells):
        for x, cell_kind in enumerate(row):
            if cell_kind is not None:
                image[y][x] = _face(cell_kind)
    ax.imshow(image, extent=(0, pane.positions, pane.steps, 0), interpolation="nearest", aspect="auto")
    width = min(0.6, 4 * cell)
    ax.vlines(range(1, pane.positions), 0, pane.steps, colors="white", linewidth=width)
    ax.hlines(range(1, pane.steps), 0, pane.positions, colors="white", linewidth=width)
    ax.set_xlim(0, pane.positions)
    ax.set_ylim(pane.steps, 0)
    for side in ax.spines.values():
        side.set_visible(False)
    if text_pt:
        ax.set_xticks([])
        ax.set_yticks([])
        gap = GAP_IN / cell  # in cells
        for y, kinds in enumerate(pane.forwards):
            ax.text(-gap, y + 0.5, kinds, ha="right", va="center", fontsize=text_pt, family="monospace")
        for x, token in enumerate(pane.tokens):  # upright when it fits the cell (2 monospace characters do)
            ax.text(x + 0.5, pane.steps + gap, token, ha="center", va="top", rotation=90 if len(token) > 2 else 0,
                    fontsize=text_pt, family="monospace")
        return
    for axis, count in ((ax.xaxis, pane.positions), (ax.yaxis, pane.steps)):
        ticks = [int(t) for t in MaxNLocator(nbins=8, integer=True).tick_values(0, count - 1) if 0 <= t < count]
        axis.set_ticks([t + 0.5 for t in ticks], labels=[str(t) for t in ticks])
    ax.tick_params(labelsize=TICK_PT, length=2, pad=1)


def _face(cell_kind: str) -> tuple[float, float, float]:
    """A cell's colour: its commit kind's, pale when committed in an earlier step; grey for a drafted mask."""
    from matplotlib.colors import to_rgb

    if cell_kind == "drafted":
        return to_rgb(DRAFTED)
    if cell_kind.startswith("~"):
        r, g, b = to_rgb(COLOURS[cell_kind[1:]])
        return 0.3 * r + 0.7, 0.3 * g + 0.7, 0.3 * b + 0.7
    return to_rgb(COLOURS[cell_kind])


def _key(panes: list[_Pane], text_pt: float) -> tuple[list[Any], str]:
    """The legend (only what the picture shows) and the note on how to read the picture."""
    from matplotlib.patches import Patch

    shown = {c for p in panes for row in p.cells for c in row if c is not None}
    handles = [Patch(facecolor=COLOURS[k], label=LABELS[k]) for k in COMMIT_KINDS if k in shown]
    earlier = [k for k in COMMIT_KINDS if f"~{k}" in shown]
    if earlier:
        handles.append(Patch(facecolor=_face(f"~{earlier[0]}"), label="committed in an earlier step"))
    if "drafted" in shown:
        handles.append(Patch(facecolor=DRAFTED, label="mask (drafted)"))
    if not text_pt:
        return handles, "Rows: steps, top to bottom (numbered at left); columns: generated positions."
    letters = set("".join(s for p in panes for s in p.forwards))
    kinds = ", ".join(f"{short}\u00a0{FORWARD_NAMES[k]}" for k, short in FORWARD_SHORT.items() if short in letters)
    symbols = ", ".join(f"{c}\u00a0{name}" for c, name in (("␣", "a space"), ("∅", "no text"))
                        if any(c in t for p in panes for t in p.tokens))
    return handles, (f"Rows: steps, top to bottom; columns: generated positions, with the output's tokens under them"
                     f"{f' ({symbols})' if symbols else ''}. Left of each step, its forwards: {kinds}.")


def _key_artists(fig: Figure, panes: list[_Pane], text_pt: float, room: float) -> tuple[Any, Any, float]:
    """The legend, in as many columns as ``room`` (inches wide) allows, and the note wrapped to ``room``, both on
    ``fig`` at no place yet; returns them and the width they take (over ``room`` only if one legend column is)."""
    handles, note = _key(panes, text_pt)
    legend = None
    for ncol in range(len(handles), 0, -1):
        if legend is not None:
            legend.remove()
        legend = fig.legend(handles=handles, loc="upper left", ncol=ncol, fontsize=NOTE_PT, frameon=False,
                            handlelength=1.2, handleheight=1.0, columnspacing=1.2, borderpad=0, borderaxespad=0)
        if _extent_of(fig, legend)[0] <= room:
            break
    room = max(room, _extent_of(fig, legend)[0])
    lines = [""]
    for word in note.split(" "):  # greedy, by measured width
        line = f"{lines[-1]} {word}".strip()
        if lines[-1] and _extent(fig, line, fontsize=NOTE_PT)[0] > room:
            lines.append(word)
        else:
            lines[-1] = line
    note_artist = fig.text(0, 0, "\n".join(lines), fontsize=NOTE_PT, va="top")
    return legend, note_artist, max(_extent_of(fig, legend)[0], _extent_of(fig, note_artist)[0])


def _place_key(fig: Figure, panes: list[_Pane], text_pt: float, starts: list[float], bottoms: list[float],
               width: float) -> tuple[Any, Any, tuple[float, float], tuple[float, float]]:
    """The legend and note, and where their top left goes (inches from the figure's top left): in the room under the
    panes right of a taller one when they fit there (the picture then grows no taller), else under all panes;
    returns them, that place and the picture's size (inches). ``starts`` and ``bottoms`` are the panes' left and
    bottom edges."""
    for j in range(1, len(panes)):
        room = width - starts[j] - MARGIN_IN
        legend, note, used = _key_artists(fig, panes, text_pt, room)
        top = max(bottoms[j:]) + KEY_GAP_IN
        if used <= room and top + _key_height(fig, legend, note) <= max(bottoms):
            return legend, note, (starts[j], top), (width, max(bottoms) + MARGIN_IN)
        legend.remove()
        note.remove()
    legend, note, used = _key_artists(fig, panes, text_pt, width - 2 * MARGIN_IN)
    top = max(bottoms) + KEY_GAP_IN
    return legend, note, (MARGIN_IN, top), (max(width, used + 2 * MARGIN_IN),
                                            top + _key_height(fig, legend, note) + MARGIN_IN)


def _key_height(fig: Figure, legend: Any, note: Any) -> float:
    """The legend's and note's height (inches), the note under the legend."""
    return _extent_of(fig, legend)[1] + GAP_IN + _extent_of(fig, note)[1]


def trace_figure(traces: list[dict[str, Any]], labels: list[str] | None = None) -> Figure:
    """The picture of ``traces`` side by side, top-aligned, one step and one position the same size in every pane;
    ``labels`` name the panes where the method does not (e.g. the model). Its size in inches times DPI is at
    most MAX_PX on both sides unless the titles and legend alone are wider (then plot_traces lowers the dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(dpi=DPI)
    FigureCanvasAgg(fig)  # measures the texts; no pyplot, so nothing global to close
    panes = [_pane(fig, t, labels[k] if labels else None) for k, t in enumerate(traces)]
    title_h = _extent(fig, "Ag", fontsize=TITLE_PT, weight="bold")[1] + _extent(fig, "Ag", fontsize=NOTE_PT)[1]
    # the legend and note take about 3 lines under the panes (the cell size only needs this to stay in MAX_PX)
    cell, text_pt = _cell_size(panes, title_h, foot_h=3 * _extent(fig, "Ag", fontsize=NOTE_PT)[1])
    top = MARGIN_IN + title_h + GAP_IN
    starts, bottoms, width = _places(panes, cell, text_pt, top)
    legend, note, key_at, (width, height) = _place_key(fig, panes, text_pt, starts, bottoms, width)
    fig.set_size_inches(width, height)

    def at(x: float, y: float) -> tuple[float, float]:
        """Figure coordinates of a point ``x`` inches from the left, ``y`` from the top."""
        return x / width, 1 - y / height

    for pane, start in zip(panes, starts):
        x = start + _margins(pane, text_pt)[0]
        grid_w, grid_h = pane.positions * cell, pane.steps * cell
        _draw_grid(fig.add_axes((*at(x, top + grid_h), grid_w / width, grid_h / height)), pane, cell, text_pt)
        fig.text(*at(x, MARGIN_IN), pane.title[0], fontsize=TITLE_PT, weight="bold", va="top")
        fig.text(*at(x, top - GAP_IN), pane.title[1], fontsize=NOTE_PT, va="bottom")
    legend.set_bbox_to_anchor(at(*key_at), transform=fig.transFigure)
    note.set_position(at(key_at[0], key_at[1] + _extent_of(fig, legend)[1] + GAP_IN))
    return fig


def _extent_of(fig: Figure, artist: Any) -> tuple[float, float]:
    """Width and height (inches) of an artist on ``fig`` (rotation included)."""
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return box.width / fig.dpi, box.height / fig.dpi


def _extent(fig: Figure, text: str, **props: Any) -> tuple[float, float]:
    """Width and height (inches) of ``text`` drawn with ``props``."""
    artist = fig.text(0, 0, text, **props)
    size = _extent_of(fig, artist)
    artist.remove()
    return size


def plot_traces(traces: list[dict[str, Any]], out: str, labels: list[str] | None = None) -> None:
    """Draw ``traces`` side by side into ``out`` (the format from its suffix); a raster picture is at most MAX_PX
    on each side."""
    fig = trace_figure(traces, labels)
    fig.savefig(out, dpi=min(DPI, MAX_PX / max(fig.get_size_inches())))
