"""Fill a dsr service's flow table in a lab, as if that many clients had
connected: for tests and benchmarks of what a big table costs (status,
counting). Addresses from 198.18.0.0/15 only."""

from __future__ import annotations

import json
from pathlib import Path

from passlb.dataplane.nft.dsr import DEFAULT_TABLE
from passlb.dataplane.nft.names import ServiceNames
from passlb.lab.lab import Lab

BATCH = 10_000  # elements per `add element` command


def only_backend_id(lab: Lab) -> str:
    """The backend id (mark) of the lab's only dsr backend, read from backends4."""
    listed = lab.run(lab.lb.ns, ["nft", "-j", "list", "map", "netdev", DEFAULT_TABLE, "backends4"])
    (bid,) = [
        key["elem"]["val"]
        for item in json.loads(listed.stdout)["nftables"]
        if "map" in item
        for key, _chain in item["map"]["elem"]
    ]
    return str(bid)


def fill_flows(
    lab: Lab, service: str, count: int, backend_id: str, workdir: Path, port: int = 80
) -> None:
    """`count` tcp flow entries to `backend_id` in `service`'s flow table, written
    by one `nft -f` (one transaction), each for an hour."""
    name = ServiceNames.of(service).flows("tcp")
    script = workdir / "flows.nft"
    with open(script, "w") as out:
        for first in range(0, count, BATCH):
            elements = ", ".join(
                f"198.18.{1 + i // 60_000}.{1 + i // 240 % 250} . {1024 + i % 60_000} . {port} "
                f"timeout 3600s : {backend_id}"
                for i in range(first, min(count, first + BATCH))
            )
            out.write(f"add element netdev {DEFAULT_TABLE} {name} {{ {elements} }}\n")
    lab.run(lab.lb.ns, ["nft", "-f", str(script)], timeout=600)
