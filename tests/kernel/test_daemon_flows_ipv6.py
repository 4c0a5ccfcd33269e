"""`passlb flows` against a dsr daemon with IPv6 clients: each flow-table entry
shows the client's hash, marked as a hash, with its port; the JSON has no
address where the table holds none; the text says what a dsr entry is."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from passlb.api.views import DSR_FLOW_NOTE, HASH_NOTE
from passlb.dataplane.backend_setup import apply_backend_setup
from passlb.lab import LabSpec
from passlb.lab.client import tcp_requests

from .conftest import MakeLab
from .daemon_lab import API, start_daemon

pytestmark = pytest.mark.kernel

ECHO = 80
CONNECTIONS = 30


def test_flows_of_ipv6_clients_show_a_marked_hash_and_the_port(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    lab = make_lab(LabSpec(backends=2, clients=1, backend_gateway="router"))
    for b in lab.backends:
        apply_backend_setup(lab.vip6, netns=b.ns)
        lab.start_servers(b, tcp=[ECHO])
    backends = "".join(f'\n[[services.backends]]\naddress = "{b.ipv6}"\n' for b in lab.backends)
    config = tmp_path / "passlb.toml"
    config.write_text(
        f'interfaces = ["{lab.lb.interface}"]\n\n[api]\nlisten = "{API}"\n\n'
        f'[[services]]\nname = "web6"\nvip = "{lab.vip6}"\nprotocol = "tcp"\n'
        f'ports = [{ECHO}]\nmode = "dsr"\nring_size = 1009\n\n[services.health]\n'
        f'type = "none"\n{backends}'
    )
    start_daemon(lab, config, tmp_path / "daemon.log")
    replies = lab.call(lab.clients[0].ns, tcp_requests, lab.vip6, ECHO, CONNECTIONS)
    assert not [r for r in replies if "error" in r], replies[:3]

    passlb = [sys.executable, "-m", "passlb.cli", "flows"]
    as_json = json.loads(lab.run(lab.lb.ns, [*passlb, "--json"]).stdout)
    assert as_json["total"] == CONNECTIONS  # finished, yet listed: see DSR_FLOW_NOTE
    flows = as_json["flows"]
    assert all(f["src"] is None and f["mode"] == "dsr" for f in flows)
    assert len({f["src_hash"] for f in flows}) == 1  # one client address
    assert len({f["src_port"] for f in flows}) == CONNECTIONS

    text = lab.run(lab.lb.ns, passlb).stdout
    clients = re.findall(r"hash:([0-9a-f]{8}) port (\d+)", text)
    assert len(clients) == CONNECTIONS
    assert {int(port) for _, port in clients} == {f["src_port"] for f in flows}
    assert {int(h, 16) for h, _ in clients} == {flows[0]["src_hash"]}
    assert f"[{lab.vip6}]:{ECHO}" in text
    assert text.rstrip().splitlines()[-3:] == [f"{CONNECTIONS} flow(s)", HASH_NOTE, DSR_FLOW_NOTE]
