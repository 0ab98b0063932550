"""The playground page (``s2d2 serve`` at ``/``) in a real headless browser: the system's Chromium (``make test``
installs it with apt-get where it can) driven by playwright. Skipped, with the reason, only where no Chromium is
installed.

Checked: both panes decode live and their text and colours match ``Model.generate`` and its trace; each pane shows
only the settings its method uses, and no menu cuts its text; an ``ar`` decode's tokens are AR tokens; the replay
slider at step k shows exactly what the trace had committed by step k (and that step's pending drafts); the layout
neither overflows nor breaks chips at 420 px; the page asks for nothing but itself (no CDN, no favicon 404).

Screenshots go to test-artifacts/: playground.png (1300 px, after a decode), playground-replay.png (the replay at a
middle step), playground-420.png. docs/img/playground.png and docs/img/playground-replay.png are copies of the
first two.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_server import MAX_NEW, bundled, start_server, stop_server  # noqa: F401  (bundled: a fixture)

import s2d2
from s2d2 import DecodeConfig
from s2d2.core.trace import COMMIT_KINDS

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# the demo: on the bundled model dynamic (B = 8, t = 0.7) gets it wrong, S2D2 right
PROMPT = "Q: Emma has 91 pounds. She buys 5 mugs that cost 11 pounds each. How many pounds does she have left?\nA:"
PANES = ({"method": "s2d2", "block_size": 8, "threshold": 0.7, "policy": "score_threshold"},  # the page's defaults
         {"method": "dynamic", "block_size": 8, "threshold": 0.7})
COLOURS = {"accepted": "rgb(44, 160, 44)", "corrected": "rgb(255, 127, 14)", "fallback": "rgb(31, 119, 180)",
           "ar": "rgb(148, 103, 189)", "edit": "rgb(214, 39, 40)"}  # trace_plot.py's colours
SHOWN = {"ar": [], "static": ["block_size", "steps"], "dynamic": ["block_size", "threshold"],
         "s2d2": ["block_size", "policy", "threshold"]}  # the settings each method uses (s2d2.config)

pytestmark = [pytest.mark.slow,  # a real server and a browser
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install "
                                                          "chromium; `make test` does it as root)")]


@pytest.fixture(scope="module")
def server(bundled):  # noqa: F811
    s = start_server(bundled)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, server, width: int, height: int = 600) -> tuple[Any, SimpleNamespace]:
    """The playground in a fresh page, with a log of its script errors, requests and failed or refused requests."""
    page = browser.new_page(viewport={"width": width, "height": height})
    log = SimpleNamespace(errors=[], requests=[], bad=[])
    page.on("pageerror", lambda e: log.errors.append(str(e)))
    page.on("request", lambda r: log.requests.append(r.url))
    page.on("response", lambda r: r.status >= 400 and log.bad.append(f"{r.status} {r.url}"))
    page.on("requestfailed", lambda r: log.bad.append(f"failed {r.url}"))
    page.goto(f"{server.url}/")
    return page, log


def assert_offline(log: SimpleNamespace, server) -> None:
    """No script error, no 4xx/5xx or failed request, and nothing asked of any host but the server (no CDN)."""
    assert not log.errors and not log.bad, (log.errors, log.bad)
    assert log.requests and all(url.startswith((server.url, "data:")) for url in log.requests), log.requests


def decode(page, *panes: dict[str, Any], done: str = "1") -> None:
    """Set the panes' settings (when given), run both, and wait until both finished (the first as ``done`` says:
    "1", or "error")."""
    for k, settings in enumerate(panes):
        pane = f".pane[data-pane='{k}']"
        page.select_option(f"{pane} [name=method]", settings["method"])
        for name, value in settings.items():
            if name != "method":
                field = f"{pane} [name={name}]"
                if name == "policy":
                    page.select_option(field, value)
                else:
                    page.fill(field, str(value))
    page.click("#run")
    page.wait_for_function(f"document.querySelector(\".pane[data-pane='0']\").dataset.done == '{done}' && "
                           "document.querySelector(\".pane[data-pane='1']\").dataset.done == '1'", timeout=60000)


def cells(page, k: int) -> list[tuple[int, str, str]]:
    """Pane k's output: (position, how or "draft", text) per token shown."""
    return [tuple(c) for c in page.eval_on_selector_all(
        f".pane[data-pane='{k}'] .out > span", "els => els.map(e => [Number(e.dataset.pos), e.dataset.how || "
        "(e.classList.contains('draft') ? 'draft' : '?'), e.textContent])")]


def set_step(page, k: int, step: int) -> None:
    page.eval_on_selector(f".pane[data-pane='{k}'] .step",
                          "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", step)


def clipped_selects(page) -> list[str]:
    """The shown selects narrower than the same select at its natural width (which fits its longest option)."""
    return page.eval_on_selector_all("select", """els => els.filter(e => e.offsetParent !== null).filter(e => {
        const natural = e.cloneNode(true);
        natural.style.cssText = "width: auto; min-width: 0; max-width: none; position: absolute";
        e.parentNode.appendChild(natural);
        const need = natural.offsetWidth;
        natural.remove();
        return e.offsetWidth < need || e.scrollWidth > e.clientWidth;
    }).map(e => e.name + "=" + e.value)""")


def overflow(page) -> dict[str, Any]:
    """What breaks a layout: a page wider than the window, a legend chip or a setting over two lines, a setting
    outside its pane."""
    return page.evaluate("""() => ({
        page: document.documentElement.scrollWidth - document.documentElement.clientWidth,
        chips: [...document.querySelectorAll('.legend .tok')].filter(e => e.getClientRects().length > 1)
            .map(e => e.textContent),
        settings: [...document.querySelectorAll('.controls label')].filter(e => e.offsetParent !== null).filter(e => {
            const r = e.getBoundingClientRect(), p = e.closest('.pane').getBoundingClientRect();
            return e.getClientRects().length > 1 || r.right > p.right || r.left < p.left;
        }).map(e => e.textContent.trim().split(' ')[0]),
    })""")


def generation(model: s2d2.Model, settings: dict[str, Any]) -> s2d2.Generation:
    return model.generate(PROMPT, DecodeConfig(max_new_tokens=MAX_NEW, **settings), trace=True)[0]


def replayed(model: s2d2.Model, g: s2d2.Generation, step: int) -> list[tuple[int, str, str]]:
    """What the replay must show after ``step`` steps of ``g``'s trace: every generated position committed by then
    (how, text; the last commit wins), and the positions the last of those steps drafted and did not commit (their
    token's text where the trace commits that token somewhere and it is not empty, else a mask)."""
    header, steps = g.trace[0], [e for e in g.trace if e["type"] == "step" or e.get("commits")]
    first = header["prompt_tokens"]
    end = first + len(g.token_ids)
    texts = {c["token"]: model.decode([c["token"]]) for e in steps for c in e["commits"]}
    committed: dict[int, tuple[str, str]] = {}
    for e in steps[:step]:
        for c in e["commits"]:
            ar = header["method"] == "ar" and c["how"] == "fallback"  # every token of an ar decode is an AR token
            committed[c["pos"]] = ("ar" if ar else c["how"], model.decode([c["token"]]))
    last = steps[step - 1] if step else {}
    draft = last.get("draft") or {"positions": [], "tokens": []}
    drafts = {p: ("draft", texts.get(t) or "·") for p, t in zip(draft["positions"], draft["tokens"])
              if p >= first and p not in committed}
    return sorted((p, *v) for p, v in {**committed, **drafts}.items() if p < end)


def test_the_playground_decodes_two_methods_live_and_colours_every_token(server, browser, bundled):  # noqa: F811
    page, log = open_page(browser, server, 1300, height=300)  # the screenshot is the page's height
    assert page.input_value("#prompt") == PROMPT  # the demo prompt by default
    icon = page.get_attribute("link[rel=icon]", "href")
    assert icon.startswith("data:image/svg+xml,")  # inline: the browser never asks for /favicon.ico
    assert page.evaluate("""src => new Promise(done => { const i = new Image(); i.onload = () => done(i.naturalWidth);
                            i.onerror = () => done(0); i.src = src; })""", icon) > 0
    decode(page)
    texts = [page.inner_text(f".pane[data-pane='{k}'] .out") for k in (0, 1)]
    shown = [cells(page, k) for k in (0, 1)]
    colours = page.eval_on_selector_all(".out [data-how]", "els => els.map(e => [e.dataset.how, "
                                                           "getComputedStyle(e).backgroundColor])")
    legend = dict(page.eval_on_selector_all(".legend .tok", "els => els.map(e => [e.classList[1], "
                                                            "getComputedStyle(e).backgroundColor])"))
    stats = page.inner_text(".pane[data-pane='0'] .stats")
    layout = overflow(page)
    side_by_side = page.evaluate("[...document.querySelectorAll('.pane')].map(e => e.getBoundingClientRect().top)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    page.close()
    assert_offline(log, server)
    s2d2_out, dynamic = (generation(bundled, settings) for settings in PANES)
    assert texts == [s2d2_out.text, dynamic.text]  # the text as committed, token by token, nothing left masked
    assert shown[0] == replayed(bundled, s2d2_out, len([e for e in s2d2_out.trace if e["type"] == "step"]))
    kinds = [[how for _, how, _ in pane] for pane in shown]
    assert set(kinds[0]) <= set(COMMIT_KINDS) and "accepted" in kinds[0] and len(kinds[0]) == len(s2d2_out.token_ids)
    assert set(kinds[1]) == {"fallback"}  # dynamic never verifies
    assert all(colour == COLOURS[how] == legend[how] for how, colour in colours)  # as in the trace picture
    assert stats.startswith(f"NFE {s2d2_out.stats.nfe} · {len(s2d2_out.token_ids)} tokens")
    assert layout == {"page": 0, "chips": [], "settings": []} and side_by_side[0] == side_by_side[1]


def test_each_pane_shows_the_settings_of_its_method_in_menus_wide_enough(server, browser):
    page, log = open_page(browser, server, 1300)
    for method, names in SHOWN.items():
        page.select_option(".pane[data-pane='0'] [name=method]", method)
        shown = page.eval_on_selector_all(".pane[data-pane='0'] .controls :is(input, select)",
                                          "els => els.filter(e => e.offsetParent !== null).map(e => e.name)")
        assert shown == ["method", *names], method
        sent = page.evaluate("settings(document.querySelector(\".pane[data-pane='0']\"))")
        assert set(sent) == {"method", *names} - {"steps"}, method  # a blank steps is the server's default
        for policy in (["score_threshold", "contextual_bandit_ucb", "mask_span_length"] if method == "s2d2" else []):
            page.select_option(".pane[data-pane='0'] [name=policy]", policy)
            assert clipped_selects(page) == [], policy
        assert clipped_selects(page) == [], method
    # a setting the server refuses: the pane says why, and there is nothing to replay
    decode(page, {"method": "static", "block_size": 8, "steps": 9}, {"method": "ar"}, done="error")
    assert "steps (9) cannot exceed block_size (8)" in page.inner_text(".pane[data-pane='0'] .stats")
    assert page.is_disabled(".pane[data-pane='0'] .step") and page.is_disabled("#replay")
    page.close()
    assert not log.errors and log.bad == [f"400 {server.url}/v1/completions"]


def test_an_ar_decode_is_coloured_as_ar_tokens(server, browser, bundled):  # noqa: F811
    """The trace labels method ar's commits "fallback" (the static strategy at block size 1 made them); the page shows
    them as the AR tokens they are. Beside it, static with a steps setting (sent only for static)."""
    static = {"method": "static", "block_size": 8, "steps": 4}
    page, log = open_page(browser, server, 1300)
    decode(page, static, {"method": "ar"})
    texts = [page.inner_text(f".pane[data-pane='{k}'] .out") for k in (0, 1)]
    ar_cells = page.eval_on_selector_all(".pane[data-pane='1'] .out > span", "els => els.map(e => [e.dataset.how, "
                                                                            "getComputedStyle(e).backgroundColor])")
    page.close()
    assert_offline(log, server)
    assert texts == [generation(bundled, static).text, generation(bundled, {"method": "ar"}).text]
    assert ar_cells and all(c == ["ar", COLOURS["ar"]] for c in ar_cells)
    assert len(ar_cells) == len(generation(bundled, {"method": "ar"}).token_ids)


def test_the_replay_shows_what_each_step_had_committed(server, browser, bundled):  # noqa: F811
    page, log = open_page(browser, server, 1300, height=300)
    assert page.is_disabled(".pane[data-pane='0'] .step") and page.is_disabled("#replay")  # nothing to replay yet
    decode(page)
    gens = [generation(bundled, settings) for settings in PANES]
    for k, g in enumerate(gens):
        num_steps = len([e for e in g.trace if e["type"] == "step"])
        pane = f".pane[data-pane='{k}']"
        assert page.get_attribute(f"{pane} .step", "max") == str(num_steps)
        for step in range(num_steps + 1):
            set_step(page, k, step)
            assert cells(page, k) == replayed(bundled, g, step), (k, step)
            assert page.inner_text(f"{pane} .replay output") == f"step {step} / {num_steps}"
        # the step it stands at: its commits outlined, and one line on what it did
        set_step(page, k, 2)
        fresh = page.eval_on_selector_all(f"{pane} .fresh", "els => els.map(e => Number(e.dataset.pos))")
        step2 = [e for e in g.trace if e["type"] == "step"][1]
        end = g.trace[0]["prompt_tokens"] + len(g.token_ids)
        assert fresh == sorted(c["pos"] for c in step2["commits"] if c["pos"] < end)
        assert page.inner_text(f"{pane} .note").startswith("step 2: ")
    # the screenshot: each pane at the first step from the middle on that leaves drafts pending
    middle = [len([e for e in g.trace if e["type"] == "step"]) // 2 for g in gens]
    for k, (g, step) in enumerate(zip(gens, middle)):
        pending = (s for s in range(step, 2 * step + 2) if any(how == "draft" for _, how, _ in replayed(bundled, g, s)))
        set_step(page, k, next(pending, step))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-replay.png"), full_page=True)
    # play: from the start (it stood at the end) to the last step, then the button says play again; "Replay both"
    # plays both panes
    last = [len([e for e in g.trace if e["type"] == "step"]) for g in gens]
    set_step(page, 0, last[0])
    page.click(".pane[data-pane='0'] .play")
    assert int(page.input_value(".pane[data-pane='0'] .step")) < middle[0] and \
        page.inner_text(".pane[data-pane='0'] .play") == "pause"
    page.wait_for_function("document.querySelector(\".pane[data-pane='0'] .play\").textContent == 'play'",
                           timeout=20000)
    assert page.input_value(".pane[data-pane='0'] .step") == str(last[0])
    assert cells(page, 0) == replayed(bundled, gens[0], last[0])
    page.click("#replay")
    assert [page.inner_text(f".pane[data-pane='{k}'] .play") for k in (0, 1)] == ["pause", "pause"]
    page.wait_for_function("[...document.querySelectorAll('.play')].every(e => e.textContent == 'play')",
                           timeout=20000)
    assert [page.input_value(f".pane[data-pane='{k}'] .step") for k in (0, 1)] == [str(n) for n in last]
    page.close()
    assert_offline(log, server)


def test_the_layout_holds_in_a_narrow_window(server, browser):
    page, log = open_page(browser, server, 420, height=900)
    page.select_option(".pane[data-pane='0'] [name=policy]", "contextual_bandit_ucb")  # the longest option
    decode(page)
    layout = overflow(page)
    stacked = page.evaluate("[...document.querySelectorAll('.pane')].map(e => e.getBoundingClientRect())"
                            ".map(r => [r.top, r.bottom])")
    clipped = clipped_selects(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-420.png"), full_page=True)
    page.close()
    assert_offline(log, server)
    assert layout == {"page": 0, "chips": [], "settings": []} and clipped == []
    assert stacked[1][0] > stacked[0][1]  # one pane above the other


def test_the_playground_sends_the_key_of_a_keyed_server(bundled, browser):  # noqa: F811
    """A server started with --api-key: the page takes the key from its address (``/#key=KEY``) or asks for it at
    the first 401 (a dialog), and decodes; a wrong key is shown as the server's sentence."""
    s = start_server(bundled, api_key="sesame")
    try:
        page = browser.new_page(viewport={"width": 1300, "height": 600})
        page.goto(f"{s.url}/#key=sesame")
        decode(page)
        assert cells(page, 0) and cells(page, 1)
        page.close()
        page = browser.new_page(viewport={"width": 1300, "height": 600})
        asked = []
        page.on("dialog", lambda d: (asked.append(d.message), d.accept("sesame")))
        page.goto(f"{s.url}/")
        decode(page)
        assert asked == ["This server needs its API key:"] and cells(page, 0)
        page.close()
        page = browser.new_page(viewport={"width": 1300, "height": 600})
        page.on("dialog", lambda d: d.accept("wrong"))
        page.goto(f"{s.url}/")
        page.click("#run")
        page.wait_for_function("document.querySelector(\".pane[data-pane='0']\").dataset.done == 'error'",
                               timeout=60000)
        assert "a valid API key is required" in page.inner_text(".pane[data-pane='0'] .stats")
        page.close()
    finally:
        stop_server(s)
