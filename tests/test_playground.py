"""The browser playground at ``/``, driven in headless Chromium (Debian's ``chromium``).

Playwright only drives the browser; it never downloads one (``.ci/run`` installs the Debian
package). Set ``ALIGNSERVE_SCREENSHOT=1`` to refresh ``docs/playground.png`` from this run.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from conftest import MODEL, ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
PROMPT = "Write two sentences about Monday mornings."

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="headless test needs Debian's chromium at /usr/bin/chromium "
                                       "(apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(server.url + "/")
        pg.wait_for_selector("body[data-ready='1']", timeout=60_000)
        yield pg
        assert not errors, errors  # no uncaught JavaScript error the whole time
        browser.close()


def _save_screenshot(pg, path: Path) -> None:
    """A small PNG for the README: the page quantized to a 128-colour palette."""
    from PIL import Image

    path.parent.mkdir(exist_ok=True)
    pg.screenshot(path=str(path))
    img = Image.open(path).convert("RGB").quantize(colors=128)
    img.save(path, optimize=True)


def _generate(pg) -> None:
    pg.click("#generate")
    pg.wait_for_function("document.body.dataset.busy === ''", timeout=180_000)


def _bars(pg, pane: str) -> dict[str, float]:
    return {b.get_attribute("data-name"): float(b.get_attribute("data-value"))
            for b in pg.locator(f"{pane} .bar").all()}


def test_playground_sliders_generate_and_bars_change(server, page):
    pg = page
    # the page built its controls from GET /v1/heads: strategies, parameters, sliders
    options = pg.locator("#strategy option").all_inner_texts()
    assert {"sample", "best_of_n", "args", "cd_block"} <= set(options)
    pg.select_option("#strategy", "best_of_n")
    assert pg.locator("#params [data-param='n']").input_value() == "4"  # schema default
    slider = pg.locator("#sliders input[data-name='sentiment']")
    assert slider.get_attribute("min") == "-10" and slider.get_attribute("max") == "10"
    pg.fill("#prompt", PROMPT)
    pg.fill("#max_tokens", "20")
    pg.fill("#seed", "5")
    pg.check("#compare")

    slider.focus()
    pg.keyboard.press("End")  # move the sentiment slider to +10
    assert pg.locator("#sliders .slider:has(input[data-name='sentiment']) output").inner_text() \
        == "10.0"
    _generate(pg)
    aligned = pg.locator("#out-aligned .text").inner_text()
    plain = pg.locator("#out-plain .text").inner_text()
    assert aligned.strip() and plain.strip()
    assert pg.locator("#out-aligned").get_attribute("data-done") == "ok"
    up = _bars(pg, "#out-aligned")
    assert "sentiment" in up and "vader" in up, up
    assert _bars(pg, "#out-plain").keys() == up.keys()
    # the plain pane (every weight 0) is exactly strategy "sample" with the same seed
    ref = httpx.post(server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 20,
        "temperature": 1.0, "seed": 5}).json()
    assert plain == ref["choices"][0]["message"]["content"]
    if os.environ.get("ALIGNSERVE_SCREENSHOT"):
        _save_screenshot(pg, ROOT / "docs" / "playground.png")

    slider.focus()
    pg.keyboard.press("Home")  # now steer away from positive sentiment: -10
    _generate(pg)
    down = _bars(pg, "#out-aligned")
    assert down["sentiment"] < up["sentiment"], (up, down)
    assert pg.locator("#out-aligned .text").inner_text() != aligned
    # the same seed and every weight 0 again: the plain side did not move
    assert pg.locator("#out-plain .text").inner_text() == plain


def test_playground_shows_api_errors(page):
    pg = page
    pg.select_option("#strategy", "best_of_n")
    pg.fill("#params [data-param='n']", "999")  # over the strategy's maximum: a clean 400
    pg.uncheck("#compare")
    _generate(pg)
    assert pg.locator("#out-aligned").get_attribute("data-done") == "error"
    assert "400" in pg.locator("#out-aligned .text").inner_text()
