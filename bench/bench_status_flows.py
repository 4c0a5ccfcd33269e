"""`passlb status` and /metrics with a million dsr flow entries (issue 13).

Run as root: .venv/bin/python bench/bench_status_flows.py [--flows 1000000] [--seconds 30]

A lab (one backend), `passlb run` in dsr mode in its load-balancer namespace,
then FLOWS entries written into the service's flow table with `nft -f`. The
window is long enough (default 150 s) to hold a background count of the
whole table: counts repeat after 20 x the last one's duration. A
client in the namespace asks for /api/v1/status and /metrics back to back for
SECONDS and records each answer's latency, split by whether the daemon's
background flow count was running at the time (status says so). The count's
own duration is what a status waited for before counts moved to the
background (it counted the table itself), measured in the same run.
Results go to docs/benchmarks.md between the status-flows markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from docs_section import write_section

from passlb.api.client import ApiClient, ApiError
from passlb.lab import Lab, LabSpec
from passlb.lab.flowtable import fill_flows, only_backend_id

API = "127.0.0.1:9180"
CLIENT = """
import json, sys, time
from passlb.api.client import ApiClient
client, until = ApiClient(sys.argv[2], timeout=120.0), time.monotonic() + float(sys.argv[1])
samples = []
while time.monotonic() < until:
    started = time.monotonic()
    doc = client.get("/api/v1/status")
    status_s = time.monotonic() - started
    started = time.monotonic()
    client.get_text("/metrics")
    metrics_s = time.monotonic() - started
    fc = doc["flow_count"]
    flows = doc["services"][0]["active_flows"]
    samples.append([status_s, metrics_s, fc["counting"], fc["age"], fc["took"], flows])
print(json.dumps(samples))
"""


def status() -> dict[str, Any]:
    return ApiClient(API, timeout=120.0).get("/api/v1/status")


def wait_for_apply(lab: Lab) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if lab.call(lab.lb.ns, status)["applies"]:
                return
        except ApiError:
            pass
        time.sleep(0.2)
    raise SystemExit("the daemon did not apply its config")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=150.0)
    args = parser.parse_args()
    lab = Lab(LabSpec(backends=1, ipv6=False)).build()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            config = workdir / "passlb.toml"
            config.write_text(
                f'interfaces = ["{lab.lb.interface}"]\n[api]\nlisten = "{API}"\n\n'
                f'[[services]]\nname = "web"\nvip = "{lab.vip4}"\nports = [80]\nmode = "dsr"\n'
                f"[services.conntrack]\nflow_table_size = {max(args.flows, 1024)}\n"
                f'[services.health]\ntype = "none"\n'
                f'[[services.backends]]\naddress = "{lab.backends[0].ipv4}"\n'
            )
            run = [sys.executable, "-m", "passlb.cli", "run", str(config)]
            with open(workdir / "daemon.log", "w") as log:
                lab.spawn(lab.lb.ns, run, stderr=log)
            wait_for_apply(lab)
            started = time.monotonic()
            fill_flows(lab, "web", args.flows, only_backend_id(lab), workdir)
            filled_in = time.monotonic() - started
            client = lab.spawn(
                lab.lb.ns,
                [sys.executable, "-c", CLIENT, str(args.seconds), API],
                stdout=subprocess.PIPE,
                text=True,
            )
            out, _ = client.communicate(timeout=args.seconds + 600)
    finally:
        lab.teardown()
    samples = json.loads(out)
    during = [s for s in samples if s[2]]
    idle = [s for s in samples if not s[2]]
    tooks = sorted({s[4] for s in samples if s[4] is not None})
    counted = [s[5] for s in samples if s[5] is not None]
    rows = []
    for label, group in (("while a count runs", during), ("between counts", idle)):
        st = [s[0] * 1000 for s in group]
        mt = [s[1] * 1000 for s in group]
        rows.append(
            f"| {label} | {len(group)} | {statistics.median(st) if st else float('nan'):.1f} | "
            f"{pct(st, 0.99):.1f} | {max(st, default=float('nan')):.1f} | "
            f"{statistics.median(mt) if mt else float('nan'):.1f} | {pct(mt, 0.99):.1f} |"
        )
    load = os.getloadavg()[0]
    took = tooks[-1] if tooks else float("nan")
    seen = ", ".join(f"{t:.1f} s" for t in tooks) or "none"
    section = f"""## Status and /metrics over a big dsr flow table (issue 13)

{args.flows:,} entries in one service's flow table (written in {filled_in:.1f} s with
`nft -f`); a client in the load balancer's namespace asked for `/api/v1/status`
and `/metrics` back to back for {args.seconds:.0f} s. {datetime.date.today()},
{platform.node()}, load average {load:.1f} (2 vCPUs shared with other work).

| answers | n | status median ms | p99 | max | /metrics median ms | p99 |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

The longest background count in the window took {took:.1f} s (counts seen:
{seen}; the last one counted {counted[-1] if counted else "none"} entries: a count
that overlaps the `nft -f` fill sees the part written so far, and the writer
slows the walk). Before, every status and scrape walked the table itself
(about 0.5 s per 100,000 entries on an idle machine) and answered only after
it. A count that took {took:.1f} s is repeated after {max(5.0, took * 20):.0f} s
(20 x its duration, under 5 % of a core): the age a status can show.
`bench/bench_status_flows.py`.
"""
    write_section("status-flows", section)
    print(section)


if __name__ == "__main__":
    main()
