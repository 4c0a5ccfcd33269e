"""Status page with hundreds of backends: what one second's update costs the browser.

Run: .venv/bin/python bench/bench_status_page.py   (about a minute; not a test)

The real API (build_app) serves a status document of N backends (in services
of 50) from a stand-in for the daemon whose counters and rates change on every
read, as a busy daemon's do. Headless Chromium (Debian's, via Playwright) loads
the page; then, in the page, each round fetches a fresh document and renders
it (1) with the page's own renderServices, which writes only the cells whose
text changed, and (2) with a baseline that rebuilds every table from scratch,
as the page did before issue 16. Each render is followed by a forced layout
(offsetHeight), so style and layout are in the time. The two run interleaved,
round by round, in the same page. Results go to docs/benchmarks.md between the
status-page markers.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import statistics
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from docs_section import write_section
from playwright.sync_api import sync_playwright

from passlb.api.server import build_app, start_api

SIZES = (100, 500, 1000)
PER_SERVICE = 50
ROUNDS = 30
# page: as shipped; page-all: the same with content-visibility off (every
# service laid out, as if all were on screen); rebuild: the old page.
MODES = ("page", "page-all", "rebuild")
CHROMIUM = "/usr/bin/chromium"
LISTEN = "127.0.0.1:19381"

# The page before issue 16, in essence: every poll built every row anew.
BASELINE = """
(doc) => {
  let section = document.getElementById("baseline");
  if (!section) {
    section = document.createElement("section");
    section.id = "baseline";
    document.querySelector("main").prepend(section);
  }
  const tables = doc.services.map((svc) => {
    const body = document.createElement("tbody");
    for (const b of svc.backends) {
      const row = document.createElement("tr");
      for (const text of [b.key, b.health, b.role, b.admin, String(b.weight),
          String(b.ring_weight), String(b.active_flows), String(b.new_flows),
          rate(b.rates.new_flows), rate(b.rates.packets), rate(b.rates.bytes),
          b.check_latency === null ? "-" : (b.check_latency * 1000).toFixed(1) + " ms"]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      body.append(row);
    }
    const table = document.createElement("table");
    table.append(body);
    return table;
  });
  section.replaceChildren(...tables);
}
"""

ROUND = """
async ([mode, baseline]) => {
  const doc = await (await fetch("/api/v1/status")).json();
  const ours = mode !== "rebuild";
  const other = document.getElementById(ours ? "baseline" : "services");
  const mine = document.getElementById(ours ? "services" : "baseline");
  for (const block of document.querySelectorAll(".service")) {
    block.style.contentVisibility = mode === "page-all" ? "visible" : "";
  }
  if (other) other.style.display = "none";
  if (mine) mine.style.display = "";
  document.body.offsetHeight;
  const started = performance.now();
  if (ours) renderServices(doc);
  else (eval(baseline))(doc);
  document.body.offsetHeight;
  return performance.now() - started;
}
"""


class Stand:
    """The daemon's side of the API: a status document whose numbers move."""

    def __init__(self, backends: int) -> None:
        self.backends = backends
        self.reads = 0

    async def status(self) -> dict[str, Any]:
        self.reads += 1
        n = self.reads
        services = []
        for s in range(self.backends // PER_SERVICE):
            rows = []
            for i in range(PER_SERVICE):
                busy = (i + n) % 3  # a third of the backends' numbers change each read
                rows.append(
                    {
                        "key": f"198.18.{2 + s}.{10 + i}:8080",
                        "backup": False,
                        "admin": "enabled",
                        "health": "up",
                        "health_reason": "connected",
                        "check_latency": 0.0002,
                        "health_history": [],
                        "role": "active",
                        "weight": 1,
                        "config_weight": 1,
                        "reported_weight": None,
                        "ring_weight": 1,
                        "ring_slots": 1310,
                        "ring_share": 2.0,
                        "drain_deadline_in": None,
                        "packets": 1000 * n + busy,
                        "bytes": 90_000 * n,
                        "new_flows": 10 * n + busy,
                        "active_flows": 20 + busy,
                        "rates": {"packets": 1000.0 + busy, "bytes": 9e4, "new_flows": 10.0 + busy},
                    }
                )
            services.append(
                {
                    "name": f"svc{s}",
                    "vip": f"198.18.0.{10 + s}",
                    "protocol": "tcp",
                    "ports": [443],
                    "mode": "nat",
                    "dropping": False,
                    "dropped": 0,
                    "active_flows": 0,
                    "reported_weights": "none",
                    "reported_weights_note": "",
                    "backends": rows,
                }
            )
        return {
            "version": "bench",
            "uptime": 100.0,
            "services": services,
            "applies": 1,
            "apply_failures": 0,
            "last_apply": None,
            "state": {"in_sync": True, "pending": ""},
            "last_reload": {"ok": True},
            "errors": [],
            "last_event": 0,
        }

    def events(self, since: int) -> list[dict[str, Any]]:
        return []

    async def flows(self, service: str | None, backend: str | None) -> list[Any]:
        return []

    def service_modes(self) -> dict[str, str]:
        return {}

    def history(self, service: str | None, backend: str | None, seconds: int) -> dict[str, Any]:
        return {"step": 1, "times": [], "series": []}

    async def metrics(self) -> str:
        return ""

    def update_backend(self, *args: Any, **kwargs: Any) -> None:
        raise KeyError("benchmark: read-only")

    async def reload(self) -> tuple[bool, list[str]]:
        return False, ["benchmark"]

    def resync(self) -> None:
        pass

    def set_node_drained(self, drained: bool) -> str:
        raise LookupError("bgp: the benchmark's stand announces nothing")


@contextmanager
def serving(stand: Stand) -> Iterator[None]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner: list[web.AppRunner] = []

    async def start() -> None:
        runner.append(await start_api(build_app(stand), LISTEN))
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    ready.wait(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(runner[0].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def measure(backends: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    with serving(Stand(backends)), sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"http://{LISTEN}/")
        page.wait_for_function(
            f"document.querySelectorAll('tr[data-backend]').length == {backends}"
        )
        for _ in range(ROUNDS):
            for mode in MODES:
                times[mode].append(page.evaluate(ROUND, [mode, BASELINE]))
        browser.close()
    return times


def main() -> None:
    load = os.getloadavg()
    rows = []
    for size in SIZES:
        times = measure(size)
        page, every, rebuild = (statistics.median(times[mode]) for mode in MODES)
        rows.append(
            f"| {size} | {page:.1f} ms ({page / rebuild:.2f} x) "
            f"| {every:.1f} ms ({every / rebuild:.2f} x) | {rebuild:.1f} ms |"
        )
        print(rows[-1], flush=True)
    text = f"""## Status page: one second's update with hundreds of backends (issue 16)

Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} CPUs, headless
Chromium, load average {load[0]:.1f} at the start (other engineers' test suites share
the machine). Per round the page fetches a fresh status document (a third of
the backends' numbers changed) and renders it; median of {ROUNDS} rounds, the three
ways interleaved in the same page, each followed by a forced layout. The page
writes only the cells whose text changed, and its services off screen
(`content-visibility: auto`) skip style and layout until scrolled to; "every
service laid out" switches that off, as if a screen showed them all; the old
page rebuilt every table each second. `bench/bench_status_page.py`.

| backends (services of 50) | page | page, every service laid out | rebuild every table (before) |
|---|---|---|---|
""" + "\n".join(rows)
    write_section("status-page", text)


if __name__ == "__main__":
    main()
