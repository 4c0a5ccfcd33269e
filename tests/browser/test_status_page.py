"""The web status page in a real headless Chromium (Debian's), driven by Playwright.

A live daemon (proxy mode on loopback, three backends) with an API token and
`read_without_token = true` serves the page. Without the token the page shows
everything, offers no action and says why, and the API refuses a change. With
the token entered on the page, a drain from the page takes the backend out of
the ring (new flows go elsewhere) and a weight set from the page rebuilds it.
The graphs fill from the daemon's history; a stopped backend turns red. With
PASSLB_UPDATE_SCREENSHOT=1 the test refreshes docs/status-page.png, the
screenshot the README and docs/operations-api.md show (otherwise it goes to
the test's tmp dir).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import ConsoleMessage, Error, Page, expect, sync_playwright

from passlb.api.client import ApiClient, ApiError
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
TOKEN = "wall-screen-test-token"
WAIT = 10_000  # ms: the page polls once a second, the history every two


@pytest.fixture
def daemon() -> Iterator[LiveDaemon]:
    live = LiveDaemon(backends=3, token=TOKEN, read_without_token=True)
    try:
        yield live.start()
    finally:
        live.close()


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


def ring_weights(daemon: LiveDaemon) -> dict[str, int]:
    return {b["key"]: b["ring_weight"] for b in LiveDaemon.backends_of(daemon.status())}


def test_status_page_graphs_read_only_drain_and_a_backend_going_down(
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
    # Some traffic first, so the page has counters, rates and history to show.
    flows = [daemon.connect()[0] for _ in range(6)]
    page.goto(daemon.url + "/")

    b1, b2, b3 = daemon.backends
    web = page.locator('div.service[data-service="web"]')
    rows = {b.name: web.locator(f'tr[data-backend="{b.key}"]') for b in daemon.backends}
    for row in rows.values():
        expect(row).to_have_attribute("data-health", "up", timeout=WAIT)
    expect(page.locator("#summary")).to_contain_text("3/3 backends up")

    # Without the token: everything shown, no action offered, and why.
    expect(page.locator("#access")).to_have_text("read-only")
    expect(page.locator("#token-why")).to_contain_text("Read-only: drain, enable, disable")
    expect(page.locator("button.action")).to_have_count(0)
    expect(web.locator("th", has_text="actions")).to_have_count(0)
    with pytest.raises(ApiError, match="401 Authorization"):
        ApiClient(daemon.api).post(f"/api/v1/services/web/backends/{b2.key}", {"state": "drain"})
    assert set(ring_weights(daemon).values()) == {1}

    # Graphs fill from the daemon's history: new flows/s of the service total.
    for metric in ("new_flows", "packets", "bytes"):
        expect(web.locator(f'canvas[data-metric="{metric}"]')).not_to_have_attribute(
            "data-points", "0", timeout=WAIT
        )
    expect(web.locator('canvas[data-metric="new_flows"]')).not_to_have_attribute(
        "data-max", "0", timeout=WAIT
    )

    # With the token entered on the page, the actions appear.
    page.fill("#token", TOKEN)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#access")).to_have_text("actions enabled (token)", timeout=WAIT)
    expect(rows["b2"].locator("button.action")).to_have_count(4, timeout=WAIT)

    # Drain b2 from the page; the dialog asks first, and Cancel changes nothing.
    rows["b2"].locator('button[data-action="drain"]').click()
    expect(page.locator("#confirm-text")).to_contain_text(f"Drain {b2.key} in web?")
    page.click("#confirm-cancel")
    rows["b2"].locator('button[data-action="drain"]').click()
    page.click("#confirm-ok")
    expect(rows["b2"]).to_have_attribute("data-role", "draining", timeout=WAIT)
    expect(rows["b2"].locator("td").nth(7)).to_contain_text("0.0%")
    expect(rows["b2"].locator("td").nth(14)).to_have_text(re.compile(r"^\d+s$"))
    assert ring_weights(daemon)[b2.key] == 0
    names = []
    for _ in range(12):
        sock, name = daemon.connect()
        names.append(name)
        sock.close()
    assert "b2" not in names and set(names) <= {"b1", "b3"}
    expect(page.locator("#events li[data-kind=admin]").first).to_contain_text(f"web/{b2.key} drain")

    # A weight from the page: the dialog asks for the number.
    rows["b1"].locator('button[data-action="weight"]').click()
    page.fill("#weight-input", "3")
    page.click("#confirm-ok")
    expect(rows["b1"].locator("td").nth(4)).to_have_text("3", timeout=WAIT)  # weight
    expect(rows["b1"].locator("td").nth(6)).to_have_text("3", timeout=WAIT)  # ring
    assert ring_weights(daemon)[b1.key] == 3

    # A backend goes down: red row, and an alert at the top of the page.
    b3.stop()
    expect(rows["b3"]).to_have_attribute("data-health", "down", timeout=WAIT)
    expect(page.locator("#alerts")).to_contain_text(f"web/{b3.key} down")
    expect(page.locator("#events li.bad").first).to_contain_text(f"{b3.key} down")
    # Event times as in `passlb top`: local, 24-hour.
    expect(page.locator("#events li").first).to_have_text(re.compile(r"^\d\d:\d\d:\d\d  "))

    # One backend's detail: its health history and its own line in the graphs.
    rows["b3"].locator("td").first.click()
    detail = web.locator(".detail")
    expect(detail.locator(".health-history li").first).to_contain_text("down")
    expect(detail).to_contain_text("check latency")
    expect(web.locator(".legend .selected")).to_have_text(f"backend {b3.key}")

    for sock in flows[:3]:
        sock.close()
    flows += [daemon.connect()[0] for _ in range(4)]  # new flows, all to b1 now
    expect(rows["b1"].locator("td").nth(10)).not_to_have_text("0", timeout=WAIT)  # flows/s
    rows["b1"].locator("td").first.click()
    expect(web.locator(".legend .selected")).to_have_text(f"backend {b1.key}")
    update = os.environ.get("PASSLB_UPDATE_SCREENSHOT") == "1"
    screenshot = DOCS_SCREENSHOT if update else tmp_path / "status-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    for sock in flows[3:]:
        sock.close()
    assert b1.name == "b1"
    assert problems == []


def test_without_the_token_a_closed_api_shows_nothing_and_asks_for_it(page: Page) -> None:
    """No read_without_token: the page cannot even read, and says so; with the
    token it shows the backends and offers the actions."""
    with LiveDaemon(backends=1, token=TOKEN) as daemon:
        page.goto(daemon.url + "/")
        expect(page.locator("#token-why")).to_have_text(
            "This API needs its bearer token to show its status."
        )
        expect(page.locator("#access")).to_have_text("read-only")
        expect(page.locator("tr[data-backend]")).to_have_count(0)
        expect(page.locator("button.action")).to_have_count(0)
        with pytest.raises(ApiError, match="401 Authorization"):
            ApiClient(daemon.api).get("/api/v1/status")
        page.fill("#token", TOKEN)
        page.click("#token-form button[type=submit]")
        row = page.locator(f'tr[data-backend="{daemon.backends[0].key}"]')
        expect(row).to_have_attribute("data-health", "up", timeout=WAIT)
        expect(row.locator("button.action")).to_have_count(4)
        expect(page.locator("#token-form")).to_be_hidden()
        # Forgetting the token from the page makes it ask again.
        page.click("#token-forget")
        expect(page.locator("#token-why")).to_have_text(
            "This API needs its bearer token to show its status."
        )
        expect(page.locator("button.action")).to_have_count(0)
