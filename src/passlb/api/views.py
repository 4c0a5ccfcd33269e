"""The status document (served by the API) and its terminal renderings.

One document feeds `passlb status`, `passlb top`, the web status page and
/metrics, so they never disagree. It is rendered from a StatusSnapshot, a
plain value the daemon takes on its event loop: nothing here sees the
daemon itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from passlb import __version__
from passlb.api.telemetry import FlowCount, Rates
from passlb.control.desired import diff_desired
from passlb.control.fingerprint import ring_fingerprint
from passlb.control.reconciler import ApplyRecord
from passlb.dataplane.base import BackendCounters, Driver, Flow, ServiceCounters
from passlb.errors import PasslbError
from passlb.health.policy import HealthRecord
from passlb.model import AdminState, Config, Mode, PortSet, Service
from passlb.state import BackendRole, DesiredState, RemovedBackend, ServiceDesired


@dataclass(frozen=True)
class StatusSnapshot:
    """What the status document shows, taken from the daemon in one go."""

    at: float  # wall clock when taken
    started: float  # wall clock when the daemon started
    config_path: str
    interfaces: tuple[str, ...]
    config: Config  # as read from the file
    effective: Config  # with the runtime admin states and weights
    desired: DesiredState | None
    applied: DesiredState | None
    now: float  # the reconciler's clock, which drain deadlines are on
    applies: int
    apply_failures: int
    last_apply: ApplyRecord | None
    health: Mapping[tuple[str, str], HealthRecord]
    rates: Mapping[tuple[str, str], Rates]
    reloads: int
    reload_failures: int
    last_reload: Mapping[str, Any]
    last_event: int
    # (service, backend key) -> the last health transitions, newest first
    health_history: Mapping[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    # Services whose active flows come from the background count (blocking
    # drivers: counting walks the kernel's flow tables), and that count.
    counted_services: frozenset[str] = frozenset()
    flow_count: FlowCount | None = None
    counting_flows: bool = False
    resync_repairs: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # backends gone from the config whose flows still drain
    removed: Mapping[tuple[str, str], RemovedBackend] = field(default_factory=dict)
    bgp: Mapping[str, Any] | None = None  # the BGP agent's section; None: no [bgp]


def status_document(
    snap: StatusSnapshot, counters: dict[str, ServiceCounters], errors: list[str]
) -> dict[str, Any]:
    """Everything `passlb status` shows, as JSON-ready data (counters from read_counters)."""
    desired = snap.desired
    services = []
    for svc in snap.effective.services:
        sd = desired.service(svc.name) if desired else None
        from_file = snap.config.service(svc.name)
        svc_counters = counters.get(svc.name, ServiceCounters())
        slots = _ring_slots(sd)
        # By key once: a lookup per backend would be quadratic in a big pool.
        desired_backends = {bd.key: bd for bd in sd.backends} if sd else {}
        file_weights = {fb.key: fb.weight for fb in from_file.backends} if from_file else {}
        backends = []
        # Removed backends stay listed, as drained, until their drain ends in a cut.
        gone = [
            dataclasses.replace(r.backend, admin=AdminState.DRAIN)
            for (name, _), r in snap.removed.items()
            if name == svc.name
        ]
        removed = {b.key for b in gone}
        counted = svc.name in snap.counted_services
        flows_known = not counted or snap.flow_count is not None
        service_flows: int | None = 0 if flows_known else None
        for b in (*svc.backends, *gone):
            bd = desired_backends.get(b.key)
            c = svc_counters.backends.get(b.key, BackendCounters())
            active: int | None = c.active_flows
            if counted:
                count = snap.flow_count
                active = count.active.get((svc.name, b.key), 0) if count is not None else None
            if service_flows is not None and active is not None:
                service_flows += active
            record = snap.health.get((svc.name, b.key))
            rates = snap.rates.get((svc.name, b.key), Rates())
            deadline = bd.drain_deadline if bd else None
            # A drain whose deadline passed is over: its flows were cut.
            drained = deadline is not None and snap.now >= deadline
            backends.append(
                {
                    "key": b.key,
                    "address": str(b.address),
                    "port": b.port,
                    "backup": b.backup,
                    "admin": b.admin.value,
                    "removed": b.key in removed,
                    "health": record.state.value if record else "unknown",
                    "health_reason": record.reason if record else "",
                    "check_latency": record.latency if record else None,
                    "health_history": snap.health_history.get((svc.name, b.key), []),
                    "role": "drained" if drained else bd.role.value if bd else "unknown",
                    "weight": b.weight,
                    "config_weight": file_weights.get(b.key, b.weight),
                    "reported_weight": record.weight if record else None,
                    "ring_weight": bd.weight if bd else 0,
                    "ring_slots": slots.get(b.key, 0),
                    "ring_share": 100.0 * slots.get(b.key, 0) / svc.ring_size,
                    "drain_deadline_in": None
                    if deadline is None or drained
                    else deadline - snap.now,
                    "packets": c.packets,
                    "bytes": c.bytes,
                    "new_flows": c.new_flows,
                    "active_flows": active,  # None: not counted yet
                    "rates": {
                        "packets": rates.packets,
                        "bytes": rates.bytes,
                        "new_flows": rates.new_flows,
                    },
                }
            )
        services.append(
            {
                "name": svc.name,
                "vip": str(svc.vip),
                "protocol": svc.protocol.value,
                "ports": ports_document(svc.ports),
                "mode": svc.mode.value,
                "dropping": sd is not None and sd.ring is None,
                **_reported_weights(sd, snap.health, svc.name),
                "ring_fingerprint": ring_fingerprint(sd) if sd else None,
                "dropped": svc_counters.dropped,
                "drops": dict(sorted(svc_counters.drops.items())),
                "protection": _protection(svc),
                "active_flows": service_flows,
                "backends": backends,
            }
        )
    last = snap.last_apply
    return {
        "version": __version__,
        "uptime": snap.at - snap.started,
        "config": snap.config_path,
        "interfaces": list(snap.interfaces),
        "services": services,
        "applies": snap.applies,
        "apply_failures": snap.apply_failures,
        "last_apply": None
        if last is None
        else {
            "at": last.at,
            "duration": last.duration,
            "full": last.full,
            "changes": last.changes,
            "error": last.error,
        },
        "state": _sync_state(snap.applied, snap.desired),
        "reloads": snap.reloads,
        "reload_failures": snap.reload_failures,
        "last_reload": dict(snap.last_reload),
        "last_event": snap.last_event,
        "flow_count": _flow_count(snap),
        "resync_repairs": [
            {"service": service, "kind": kind, "total": total}
            for (service, kind), total in sorted(snap.resync_repairs.items())
        ],
        "errors": errors,
        "bgp": None if snap.bgp is None else dict(snap.bgp),
    }


def _ring_slots(sd: ServiceDesired | None) -> dict[str, int]:
    """Slots of the service's ring held by each backend key."""
    if sd is None or sd.ring is None:
        return {}
    return {b.key: n for b, n in zip(sd.backends, sd.ring.counts(), strict=True)}


def _reported_weights(
    sd: ServiceDesired | None, health: Mapping[tuple[str, str], HealthRecord], service: str
) -> dict[str, str]:
    """Whether the backends' reported weights build the ring, and why not.

    The pool rule (control/desired.py, rule 6): reports replace the static
    weights only when every serving backend reports one and not all report 0.
    Serving: healthy and in the ring, or out of it by a reported 0.
    """
    if sd is None:
        return {"reported_weights": "none", "reported_weights_note": ""}
    reported = {}
    for b in sd.backends:
        record = health.get((service, b.key))
        reported[b.key] = record.weight if record else None
    serving = [
        b.key
        for b in sd.backends
        if b.healthy
        and (
            b.role is BackendRole.ACTIVE or (b.role is BackendRole.STANDBY and reported[b.key] == 0)
        )
    ]
    reports = [reported[key] for key in serving if reported[key] is not None]
    if not reports:
        return {"reported_weights": "none", "reported_weights_note": ""}
    if len(reports) < len(serving):
        note = (
            f"only {len(reports)} of {len(serving)} serving backends report a weight;"
            " the static weights apply (every one must report)"
        )
        return {"reported_weights": "ignored", "reported_weights_note": note}
    if not any(reports):
        note = "every serving backend reports 0; the static weights apply"
        return {"reported_weights": "ignored", "reported_weights_note": note}
    return {
        "reported_weights": "used",
        "reported_weights_note": "the ring is built with the weights the backends report",
    }


def ports_document(ports: PortSet) -> list[int | str]:
    """The ports as the config writes them: [443, "8000-8100"]; every port is
    ["1-65535"], so scripts always get a list."""
    if ports.all_ports:
        return ["1-65535"]
    return [r.first if r.first == r.last else f"{r.first}-{r.last}" for r in ports.ranges]


def ports_text(ports: list[int | str]) -> str:
    return "all" if ports == ["1-65535"] else ",".join(str(p) for p in ports)


def _flow_count(snap: StatusSnapshot) -> dict[str, Any] | None:
    """How old the kernel drivers' active-flow figures are (None: no kernel driver)."""
    if not snap.counted_services:
        return None
    count = snap.flow_count
    return {
        "age": None if count is None else max(0.0, snap.at - count.at),
        "took": None if count is None else count.took,
        "counting": snap.counting_flows,
    }


def _protection(svc: Service) -> dict[str, Any]:
    """The service's edge protection as configured (docs/protecting.md)."""
    limits = svc.limits
    fields: dict[str, Any] = {
        "allow_clients": [str(n) for n in svc.clients.allow],
        "deny_clients": [str(n) for n in svc.clients.deny],
        "refuse": svc.clients.refuse.value,
        "client_new_flow_rate": limits.client_new_flow_rate,
        "new_flow_rate": limits.new_flow_rate,
        "client_max_flows": limits.client_max_flows,
        "max_flows": limits.max_flows,
        "syn_proxy": svc.syn_proxy,
        "syn_timeout": svc.conntrack.syn_timeout if svc.mode is Mode.DSR else None,
    }
    return {**fields, "summary": _protection_line(fields)}


async def read_counters(
    drivers: Mapping[Mode, Driver], *, active_flows: bool
) -> tuple[dict[str, ServiceCounters], list[str]]:
    """Every driver's counters, a blocking driver's (Driver.blocking: kernel
    reads) in a worker thread, and the drivers that could not be read.
    `active_flows` asks the blocking drivers to count their flows too (a walk
    over every flow-table or conntrack entry); the others always count theirs."""
    counters: dict[str, ServiceCounters] = {}
    errors: list[str] = []
    for mode, driver in list(drivers.items()):
        try:
            if driver.blocking:
                read = functools.partial(driver.counters, active_flows=active_flows)
                counters.update(await asyncio.to_thread(read))
            else:
                counters.update(driver.counters())
        except PasslbError as err:
            errors.append(f"{mode}: {err}")
    return counters, errors


def _sync_state(applied: DesiredState | None, desired: DesiredState | None) -> dict[str, Any]:
    """Desired vs applied: whether the data plane holds what passlb wants."""
    if desired is None:
        return {"in_sync": False, "pending": "nothing computed yet"}
    if applied is desired:
        return {"in_sync": True, "pending": ""}
    diff = diff_desired(applied, desired)
    return {"in_sync": diff.empty, "pending": "" if diff.empty else str(diff)}


def flow_document(flow: Flow, mode: str | None) -> dict[str, Any]:
    """One flow as JSON. A dsr IPv6 flow-table entry holds a hash of the client
    address, not the address: then ``src`` is null and ``src_hash`` holds it."""
    return {
        "service": flow.service,
        "mode": mode,
        "backend": flow.backend,
        "protocol": flow.protocol,
        "src": None if flow.src_hash is not None else str(flow.src),
        "src_port": flow.src_port,
        "dst": str(flow.dst),
        "dst_port": flow.dst_port,
        "expires_in": flow.expires_in,
        "src_hash": flow.src_hash,
    }


def human_rate(value: float) -> str:
    """1234567 -> '1.2M' (decimal units, as for packets and bytes per second)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


def format_status(doc: dict[str, Any]) -> str:
    """A table in the spirit of `ipvsadm -Ln --stats --rate`."""
    state = doc.get("state", {})
    lines = [
        f"passlb {doc.get('version', '')}: {len(doc['services'])} service(s), "
        f"{doc['applies']} applies, {doc['apply_failures']} failed, up {doc['uptime']:.0f}s"
        + ("" if state.get("in_sync", True) else f", NOT IN SYNC: {state.get('pending')}")
    ]
    last = doc.get("last_apply")
    if last and last.get("error"):
        lines.append(f"last apply FAILED: {last['error']}")
    reload = doc.get("last_reload") or {}
    if not reload.get("ok", True):
        lines.append("last reload REJECTED: " + "; ".join(reload.get("issues", [])))
    if reload.get("restart_needed"):
        changed = ", ".join(reload["restart_needed"])
        lines.append(f"last reload left {changed} as they were: read at start only, restart")
    for err in doc.get("errors", []):
        lines.append(f"counter read failed: {err}")
    counted = doc.get("flow_count")
    if counted:
        lines.append(_flow_count_line(counted))
    if doc.get("bgp"):
        lines.extend(format_bgp(doc["bgp"]))
    header = (
        f"  {'backend':<24} {'health':<7} {'role':<8} {'admin':<8} {'weight':>6} "
        f"{'reported':>8} {'ring':>6} {'share':>6} {'flows':>6} {'new':>8} {'packets':>10} "
        f"{'bytes':>12} {'flows/s':>7} {'pkt/s':>7} {'B/s':>7}"
    )
    for svc in doc["services"]:
        drop = "  (no backend serving: dropping new flows)" if svc["dropping"] else ""
        lines.append("")
        ring = f"  ring {svc['ring_fingerprint']}" if svc.get("ring_fingerprint") else ""
        lines.append(
            f"{svc['name']}  {svc['protocol']} {svc['vip']} ports {ports_text(svc['ports'])}  "
            f"mode {svc['mode']}{ring}{drop}"
        )
        if svc.get("reported_weights", "none") != "none":
            lines.append(
                f"  reported weights {svc['reported_weights']}: {svc['reported_weights_note']}"
            )
        lines.append(header)
        for b in svc["backends"]:
            name = b["key"] + (" (backup)" if b["backup"] else "")
            admin = "removed" if b.get("removed") else b["admin"]
            rates = b.get("rates", {})
            extra = ""
            if b.get("drain_deadline_in") is not None:
                extra = f"  drain ends in {max(0.0, b['drain_deadline_in']):.0f}s"
            if b["health"] == "down" and b.get("health_reason"):
                extra += f"  ({b['health_reason']})"
            lines.append(
                f"  {name:<24} {b['health']:<7} {b['role']:<8} {admin:<8} "
                f"{b['weight']:>6} {_or_dash(b.get('reported_weight')):>8} {b['ring_weight']:>6} "
                f"{b.get('ring_share', 0.0):>5.1f}% {_or_dash(b['active_flows']):>6} "
                f"{b['new_flows']:>8} {b['packets']:>10} {b['bytes']:>12} "
                f"{human_rate(rates.get('new_flows', 0.0)):>7} "
                f"{human_rate(rates.get('packets', 0.0)):>7} "
                f"{human_rate(rates.get('bytes', 0.0)):>7}{extra}"
            )
        guard = svc.get("protection", {}).get("summary")
        if guard:
            lines.append(f"  protection: {guard}")
        drops = {reason: n for reason, n in svc.get("drops", {}).items() if n}
        if drops:
            lines.append("  dropped: " + ", ".join(f"{r} {n}" for r, n in drops.items()))
    if any(svc["mode"] == "dsr" for svc in doc["services"]):
        lines += ["", DSR_STATUS_NOTE]
    return "\n".join(lines)


def _flow_count_line(counted: dict[str, Any]) -> str:
    """When the kernel's flow tables were last counted (a background walk)."""
    running = ", counting now" if counted.get("counting") else ""
    if counted.get("age") is None:
        return f"flows: not counted yet{running}"
    return f"flows counted {counted['age']:.0f}s ago (took {counted['took']:.1f}s){running}"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _protection_line(p: dict[str, Any]) -> str:
    parts = []
    if p.get("allow_clients"):
        parts.append(f"allow {len(p['allow_clients'])} CIDRs")
    if p.get("deny_clients"):
        parts.append(f"deny {len(p['deny_clients'])} CIDRs")
    if parts:
        parts.append(f"refuse {p['refuse']}")
    if p.get("client_new_flow_rate"):
        parts.append(f"{p['client_new_flow_rate']} new flows/s per client")
    if p.get("new_flow_rate"):
        parts.append(f"{p['new_flow_rate']} new flows/s")
    if p.get("client_max_flows"):
        parts.append(f"{p['client_max_flows']} flows per client")
    if p.get("max_flows"):
        parts.append(f"{p['max_flows']} flows")
    if p.get("syn_proxy"):
        parts.append("SYN proxy")
    return ", ".join(parts)


def format_bgp(bgp: dict[str, Any]) -> list[str]:
    """The BGP lines of `passlb status`: the node, each peer, each VIP."""
    node = bgp["node"]
    if not node["drained"]:
        state = "serving"
    elif node.get("traffic_moved"):
        state = "DRAINED (withdrawn; the routers moved the traffic away)"
    elif node.get("withdrawn"):
        state = "DRAINED (withdrawn; traffic still arriving)"
    else:
        state = "DRAINED (withdrawing)"
    restarts = f", {bgp['restarts']} speaker restart(s)" if bgp.get("restarts") else ""
    lines = [
        f"bgp: AS{bgp['asn']} router id {bgp['router_id']} via {bgp['speaker']}, node {state}"
        + restarts
    ]
    if bgp.get("peer_error"):
        lines.append(f"  speaker unreadable: {bgp['peer_error']}")
    for peer in bgp["peers"]:
        error = f"  ({peer['last_error']})" if peer.get("last_error") else ""
        lines.append(
            f"  peer {peer['address']:<24} AS{peer['asn']:<10} {peer['state']:<12}"
            f" {peer['routes_exported']} route(s) announced{error}"
        )
    for vip in bgp["vips"]:
        verb = "announced" if vip["announced"] else "WITHDRAWN"
        lines.append(f"  vip  {vip['prefix']:<24} {verb:<10} {vip['reason']}")
    return lines


EVENT_TIME_FORMAT = "%H:%M:%S"  # local time, 24-hour; the status page shows the same


def format_events(events: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"  {time.strftime(EVENT_TIME_FORMAT, time.localtime(e['at']))} {e['kind']:<7} "
        f"{e['message']}"
        for e in events
    )


def flow_client(flow: Mapping[str, Any]) -> str:
    """The client of a flow: address:port, or for a hashed dsr IPv6 entry
    "hash:xxxxxxxx" and the port, so it never reads as an address."""
    if flow["src_hash"] is not None:
        return f"hash:{flow['src_hash']:08x} port {flow['src_port']}"
    src = flow["src"]
    return f"[{src}]:{flow['src_port']}" if ":" in src else f"{src}:{flow['src_port']}"


DSR_STATUS_NOTE = (
    "dsr flows are flow-table entries: a finished TCP connection counts until it has been"
    " idle for tcp_timeout (the load balancer never sees the backend's FIN)."
)
DSR_FLOW_NOTE = (
    "dsr: these are flow-table entries, refreshed by each packet from the client. The load"
    " balancer never sees the backend's packets (its FIN included), so a finished TCP"
    " connection stays listed until it has been idle for tcp_timeout."
)
HASH_NOTE = (
    "hash:…: dsr IPv6 flow tables keep a 32-bit hash of the client address, not the address."
)


def format_flows(flows: list[dict[str, Any]], total: int) -> str:
    lines = [
        f"{'service':<12} {'backend':<24} {'proto':<5} {'client':<42} {'vip':<42} {'expires':>8}"
    ]
    for f in flows:
        expires = "-" if f["expires_in"] is None else f"{f['expires_in']:.0f}s"
        vip = f"[{f['dst']}]:{f['dst_port']}" if ":" in f["dst"] else f"{f['dst']}:{f['dst_port']}"
        lines.append(
            f"{f['service']:<12} {f['backend']:<24} {f['protocol']:<5} {flow_client(f):<42} "
            f"{vip:<42} {expires:>8}"
        )
    shown = len(flows)
    lines.append(f"{total} flow(s)" + ("" if shown == total else f", {shown} shown"))
    if any(f["src_hash"] is not None for f in flows):
        lines.append(HASH_NOTE)
    if any(f.get("mode") == "dsr" for f in flows):
        lines.append(DSR_FLOW_NOTE)
    return "\n".join(lines)
