"""The status document (served by the API) and its terminal rendering."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from passlb.dataplane.base import BackendCounters, ServiceCounters
from passlb.errors import PasslbError

if TYPE_CHECKING:
    from passlb.daemon import Daemon


def status_document(daemon: Daemon) -> dict[str, Any]:
    """Everything `passlb status` shows, as JSON-ready data."""
    rec = daemon.reconciler
    now = rec.clock()
    counters: dict[str, ServiceCounters] = {}
    errors: list[str] = []
    for mode, driver in daemon.drivers.items():
        try:
            counters.update(driver.counters())
        except PasslbError as err:
            errors.append(f"{mode}: {err}")
    desired = rec.desired
    services = []
    for svc in rec.effective_config().services:
        sd = desired.service(svc.name) if desired else None
        svc_counters = counters.get(svc.name, ServiceCounters())
        backends = []
        for b in svc.backends:
            bd = sd.backend(b.key) if sd else None
            c = svc_counters.backends.get(b.key, BackendCounters())
            health = daemon.checker.state(svc.name, b.key)
            deadline = bd.drain_deadline if bd else None
            backends.append(
                {
                    "key": b.key,
                    "address": str(b.address),
                    "port": b.port,
                    "backup": b.backup,
                    "admin": b.admin.value,
                    "health": health.value if health else "unknown",
                    "role": bd.role.value if bd else "unknown",
                    "weight": b.weight,
                    "ring_weight": bd.weight if bd else 0,
                    "drain_remaining": None if deadline is None else max(0.0, deadline - now),
                    "packets": c.packets,
                    "bytes": c.bytes,
                    "new_flows": c.new_flows,
                    "active_flows": c.active_flows,
                }
            )
        services.append(
            {
                "name": svc.name,
                "vip": str(svc.vip),
                "protocol": svc.protocol.value,
                "ports": str(svc.ports),
                "mode": svc.mode.value,
                "dropping": sd is not None and sd.ring is None,
                "backends": backends,
            }
        )
    last = rec.stats.last_apply
    return {
        "uptime": time.time() - daemon.started,
        "config": str(daemon.config_path),
        "interfaces": list(daemon.interfaces),
        "services": services,
        "applies": rec.stats.applies,
        "apply_failures": rec.stats.apply_failures,
        "last_apply": None
        if last is None
        else {
            "at": last.at,
            "duration": last.duration,
            "full": last.full,
            "changes": last.changes,
            "error": last.error,
        },
        "last_reload": daemon.last_reload,
        "errors": errors,
    }


def format_status(doc: dict[str, Any]) -> str:
    """A table in the spirit of `ipvsadm -Ln --stats`."""
    lines = [
        f"passlb: {len(doc['services'])} service(s), {doc['applies']} applies, "
        f"{doc['apply_failures']} failed, up {doc['uptime']:.0f}s"
    ]
    last = doc.get("last_apply")
    if last and last.get("error"):
        lines.append(f"last apply FAILED: {last['error']}")
    for err in doc.get("errors", []):
        lines.append(f"counter read failed: {err}")
    header = (
        f"  {'backend':<24} {'health':<8} {'role':<9} {'admin':<9} {'weight':>6} "
        f"{'flows':>7} {'new':>8} {'packets':>10} {'bytes':>12}"
    )
    for svc in doc["services"]:
        drop = "  (no backend serving: dropping new flows)" if svc["dropping"] else ""
        lines.append("")
        lines.append(
            f"{svc['name']}  {svc['protocol']} {svc['vip']} ports {svc['ports']}  "
            f"mode {svc['mode']}{drop}"
        )
        lines.append(header)
        for b in svc["backends"]:
            name = b["key"] + (" (backup)" if b["backup"] else "")
            extra = ""
            if b["drain_remaining"] is not None:
                extra = f"  drain ends in {b['drain_remaining']:.0f}s"
            lines.append(
                f"  {name:<24} {b['health']:<8} {b['role']:<9} {b['admin']:<9} "
                f"{b['ring_weight']:>6} {b['active_flows']:>7} {b['new_flows']:>8} "
                f"{b['packets']:>10} {b['bytes']:>12}{extra}"
            )
    return "\n".join(lines)
