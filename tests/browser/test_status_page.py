"""The web status page in a real headless Chromium (Debian's), driven by Playwright.

A live daemon (proxy mode on loopback, two backends) serves the page; the test
loads it, sees both backends up, stops one backend's server and sees the page
mark it down within a few seconds, with no console errors. With
PASSLB_UPDATE_SCREENSHOT=1 it refreshes docs/status-page.png, the screenshot
the README shows (otherwise the screenshot goes to the test's tmp dir).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, Error, Page, expect, sync_playwright

from passlb.api.testing import LiveDaemon

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"


@pytest.fixture
def daemon() -> Iterator[LiveDaemon]:
    live = LiveDaemon(backends=2)
    try:
        yield live.start()
    finally:
        live.close()


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 620})
        finally:
            browser.close()


def test_status_page_shows_a_backend_going_down(
    daemon: LiveDaemon, page: Page, tmp_path: Path
) -> None:
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(f"console: {message.text}")

    def on_page_error(error: Error) -> None:
        problems.append(f"page error: {error}")

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    # Some traffic first, so the page has counters and rates to show.
    flows = [daemon.connect()[0] for _ in range(6)]
    page.goto(daemon.url + "/")

    first, second = daemon.backends
    rows = {b.name: page.locator(f'tr[data-backend="{b.key}"]') for b in daemon.backends}
    for row in rows.values():
        expect(row).to_have_attribute("data-health", "up", timeout=5000)
    expect(page.locator("#summary")).to_contain_text("2/2 backends up")

    second.stop()
    expect(rows["b2"]).to_have_attribute("data-health", "down", timeout=5000)
    expect(rows["b2"].locator("td.health")).to_have_text("down")
    expect(rows["b1"]).to_have_attribute("data-health", "up")
    expect(page.locator("#events li.bad").first).to_contain_text(f"{second.key} down")

    for sock in flows[:3]:
        sock.close()
    flows += [daemon.connect()[0] for _ in range(4)]  # new flows, all to b1 now
    expect(rows["b1"].locator("td").nth(8)).not_to_have_text("0", timeout=3000)  # flows/s
    update = os.environ.get("PASSLB_UPDATE_SCREENSHOT") == "1"
    screenshot = DOCS_SCREENSHOT if update else tmp_path / "status-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    for sock in flows[3:]:
        sock.close()
    assert first.name == "b1"
    assert problems == []
