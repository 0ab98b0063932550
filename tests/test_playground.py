"""The playground page (``s2d2 serve`` at ``/``) in a real headless browser: the system's Chromium (``make test``
installs it with apt-get where it can) driven by playwright. Skipped, with the reason, only where no Chromium is
installed. A screenshot is saved to test-artifacts/playground.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_server import MAX_NEW, bundled, start_server, stop_server  # noqa: F401  (bundled: a fixture)

from s2d2 import DecodeConfig
from s2d2.core.trace import COMMIT_KINDS

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PROMPT = "Q: Omar wrote 144 pages in 12 weeks, the same amount each week. How many pages is that each week?\nA:"

pytestmark = [pytest.mark.slow,  # a real server and a browser
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install "
                                                          "chromium; `make test` does it as root)")]


def test_the_playground_decodes_two_methods_live_and_colours_every_token(bundled):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    server = start_server(bundled)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 420})
            errors: list[str] = []
            requests: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(f"{server.url}/")  # works offline: one page, no external resources
            assert page.input_value("#prompt").startswith("Q: Omar wrote 144 pages")
            page.click("#run")
            page.wait_for_function("document.querySelectorAll('.pane[data-done=\"1\"]').length == 2", timeout=60000)
            texts = [page.inner_text(f".pane[data-pane='{k}'] .out") for k in (0, 1)]
            kinds = [page.eval_on_selector_all(f".pane[data-pane='{k}'] .tok", "els => els.map(e => e.dataset.how)")
                     for k in (0, 1)]
            colour = page.eval_on_selector(".pane[data-pane='0'] .tok.accepted",
                                           "e => getComputedStyle(e).backgroundColor")
            stats = page.inner_text(".pane[data-pane='0'] .stats")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
            browser.close()
    finally:
        stop_server(server)
    assert not errors and requests and all(url.startswith(server.url) for url in requests)  # offline: no CDN
    s2d2_out = bundled.generate(PROMPT, DecodeConfig(method="s2d2", block_size=8, threshold=0.7,
                                                     policy="score_threshold", max_new_tokens=MAX_NEW))[0]
    dynamic = bundled.generate(PROMPT, DecodeConfig(method="dynamic", block_size=8, threshold=0.7,
                                                    max_new_tokens=MAX_NEW))[0]
    assert texts == [s2d2_out.text, dynamic.text]  # the text as committed, token by token, nothing left masked
    assert set(kinds[0]) <= set(COMMIT_KINDS) and "accepted" in kinds[0] and len(kinds[0]) == len(s2d2_out.token_ids)
    assert set(kinds[1]) == {"fallback"}  # dynamic never verifies
    assert colour == "rgb(44, 160, 44)"  # accepted drafts are green, as in the trace picture
    assert stats.startswith(f"NFE {s2d2_out.stats.nfe} · {len(s2d2_out.token_ids)} tokens")
