"""Prometheus text exposition (format 0.0.4) of the status document.

Pure: rendered from the same document `passlb status` shows (whose counters
the data plane itself reported) and the daemon's timing histograms. Written by
hand: the format is a few lines of text and passlb needs no registry.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from passlb.api.telemetry import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


@dataclass(frozen=True)
class MetricInfo:
    name: str
    type: str  # counter | gauge | histogram
    help: str


# Every metric passlb exports; docs/operations-api.md lists the same (a test checks).
BACKEND_METRICS = (
    MetricInfo(
        "passlb_backend_packets_total",
        "counter",
        "Packets forwarded from clients to the backend (dsr: the only direction seen).",
    ),
    MetricInfo(
        "passlb_backend_bytes_total", "counter", "Bytes forwarded from clients to the backend."
    ),
    MetricInfo("passlb_backend_new_flows_total", "counter", "New flows sent to the backend."),
    MetricInfo(
        "passlb_backend_active_flows",
        "gauge",
        "Flows to the backend in the data plane's flow table (dsr/nat: as of the last"
        " background count, see passlb_flow_count_age_seconds).",
    ),
    MetricInfo("passlb_backend_up", "gauge", "1 when the backend's health check says up, else 0."),
    MetricInfo(
        "passlb_backend_health_check_duration_seconds",
        "gauge",
        "How long the backend's last health check took.",
    ),
    MetricInfo(
        "passlb_backend_weight",
        "gauge",
        "The backend's configured weight (runtime overrides included).",
    ),
    MetricInfo(
        "passlb_backend_reported_weight",
        "gauge",
        "The weight the backend's health check reports (absent when it reports none).",
    ),
    MetricInfo(
        "passlb_backend_ring_weight",
        "gauge",
        "The weight the backend's Maglev ring was built with (0: takes no new flows).",
    ),
    MetricInfo(
        "passlb_backend_ring_slots",
        "gauge",
        "Slots of the service's Maglev ring the backend holds (its share of new flows).",
    ),
    MetricInfo(
        "passlb_backend_role",
        "gauge",
        "1 for the backend's role (active, standby, draining, drained, down, disabled),"
        " 0 for the others.",
    ),
    MetricInfo(
        "passlb_backend_admin_state",
        "gauge",
        "1 for the backend's admin state (enabled, drain or disabled), 0 for the others.",
    ),
)
SERVICE_METRICS = (
    MetricInfo(
        "passlb_service_dropped_packets_total",
        "counter",
        "Packets of new flows dropped because no backend could take them.",
    ),
    MetricInfo(
        "passlb_service_drops_total",
        "counter",
        "Refused or dropped traffic by reason (not_allowed, client_rate_limited, rate_limited,"
        " no_backend; proxy: also max_connections, sni_no_route, udp_sessions_full,"
        " udp_send_failed, udp_reply_failed, backend_unreachable, accept_failed): packets in"
        " dsr and nat, flows or datagrams in proxy.",
    ),
    MetricInfo(
        "passlb_service_serving", "gauge", "1 when the service has a ring (takes new flows)."
    ),
    MetricInfo(
        "passlb_service_reported_weights",
        "gauge",
        "1 for whether the backends' reported weights build the ring (used), are ignored"
        " (not every serving backend reports one, or all report 0) or absent (none), 0 for"
        " the others.",
    ),
    MetricInfo(
        "passlb_service_ring_info",
        "gauge",
        "Always 1; the fingerprint label is equal on nodes that send new flows alike.",
    ),
)
BGP_METRICS = (
    MetricInfo("passlb_bgp_peer_up", "gauge", "1 when the BGP session is Established."),
    MetricInfo("passlb_bgp_peer_routes_exported", "gauge", "VIP routes announced to the peer now."),
    MetricInfo(
        "passlb_bgp_vip_announced",
        "gauge",
        "1 when the VIP is announced, 0 when withdrawn; the reason label says why.",
    ),
    MetricInfo("passlb_node_drained", "gauge", "1 while the node is drained (passlb node drain)."),
    MetricInfo(
        "passlb_bgp_speaker_restarts_total", "counter", "Times the BGP speaker died and restarted."
    ),
)
DAEMON_METRICS = (
    MetricInfo(
        "passlb_apply_duration_seconds",
        "histogram",
        "Time to compute and apply a desired state to the data plane.",
    ),
    MetricInfo(
        "passlb_ring_build_seconds",
        "histogram",
        "Time to compute the desired state, dominated by Maglev ring builds (cached rings"
        " cost nothing).",
    ),
    MetricInfo("passlb_applies_total", "counter", "Applies attempted."),
    MetricInfo("passlb_apply_failures_total", "counter", "Applies the data plane refused."),
    MetricInfo("passlb_reloads_total", "counter", "Config reloads attempted."),
    MetricInfo(
        "passlb_resync_repairs_total",
        "counter",
        "Objects a full resync found changed behind passlb's back and put back, by service"
        " (empty: shared objects) and kind (table, chains, sets, counters, elements, ring_slots).",
    ),
    MetricInfo(
        "passlb_reload_failures_total", "counter", "Config reloads rejected (the old one stays)."
    ),
    MetricInfo("passlb_in_sync", "gauge", "1 when the data plane holds the desired state."),
    MetricInfo("passlb_uptime_seconds", "gauge", "Seconds since the daemon started."),
    MetricInfo(
        "passlb_flow_count_age_seconds",
        "gauge",
        "Age of the dsr/nat active-flow figures: their flow tables are counted in the"
        " background (absent before the first count).",
    ),
    MetricInfo("passlb_build_info", "gauge", "Always 1; the version is in the label."),
)
ALL_METRICS = BACKEND_METRICS + SERVICE_METRICS + BGP_METRICS + DAEMON_METRICS

ADMIN_STATES = ("enabled", "drain", "disabled")
REPORTED_WEIGHTS = ("used", "ignored", "none")
ROLES = ("active", "standby", "draining", "drained", "down", "disabled")


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def sample(name: str, labels: Labels, value: float) -> str:
    if not labels:
        return f"{name} {format_number(value)}"
    inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
    return f"{name}{{{inner}}} {format_number(value)}"


def histogram_samples(name: str, hist: Histogram) -> Iterable[str]:
    for bound, count in hist.cumulative():
        yield sample(f"{name}_bucket", {"le": format_number(bound)}, count)
    yield sample(f"{name}_sum", {}, hist.sum)
    yield sample(f"{name}_count", {}, hist.count)


def render_metrics(doc: Mapping[str, Any], apply_duration: Histogram, ring_build: Histogram) -> str:
    """The exposition text for one status document."""
    samples: dict[str, list[str]] = {m.name: [] for m in ALL_METRICS}

    def add(name: str, labels: Labels, value: float) -> None:
        samples[name].append(sample(name, labels, value))

    for svc in doc["services"]:
        service_labels = {"service": svc["name"]}
        add("passlb_service_dropped_packets_total", service_labels, svc["dropped"])
        add("passlb_service_serving", service_labels, 0 if svc["dropping"] else 1)
        for use in REPORTED_WEIGHTS:
            add(
                "passlb_service_reported_weights",
                {**service_labels, "state": use},
                1 if svc["reported_weights"] == use else 0,
            )
        for reason, count in svc["drops"].items():
            add("passlb_service_drops_total", {**service_labels, "reason": reason}, count)
        fingerprint = svc.get("ring_fingerprint")
        if fingerprint is not None:
            add("passlb_service_ring_info", {**service_labels, "fingerprint": fingerprint}, 1)
        for b in svc["backends"]:
            labels = {"service": svc["name"], "backend": b["key"]}
            add("passlb_backend_packets_total", labels, b["packets"])
            add("passlb_backend_bytes_total", labels, b["bytes"])
            add("passlb_backend_new_flows_total", labels, b["new_flows"])
            if b["active_flows"] is not None:  # None until the first background count
                add("passlb_backend_active_flows", labels, b["active_flows"])
            add("passlb_backend_up", labels, 1 if b["health"] == "up" else 0)
            if b["check_latency"] is not None:
                add("passlb_backend_health_check_duration_seconds", labels, b["check_latency"])
            add("passlb_backend_weight", labels, b["weight"])
            if b["reported_weight"] is not None:
                add("passlb_backend_reported_weight", labels, b["reported_weight"])
            add("passlb_backend_ring_weight", labels, b["ring_weight"])
            add("passlb_backend_ring_slots", labels, b["ring_slots"])
            for role in ROLES:
                add("passlb_backend_role", {**labels, "role": role}, 1 if b["role"] == role else 0)
            for state in ADMIN_STATES:
                add(
                    "passlb_backend_admin_state",
                    {**labels, "state": state},
                    1 if b["admin"] == state else 0,
                )
    bgp = doc.get("bgp")
    if bgp is not None:
        for peer in bgp["peers"]:
            add("passlb_bgp_peer_up", {"peer": peer["address"]}, 1 if peer["established"] else 0)
            add(
                "passlb_bgp_peer_routes_exported",
                {"peer": peer["address"]},
                peer["routes_exported"],
            )
        for vip in bgp["vips"]:
            labels = {"vip": vip["vip"], "reason": vip["reason"]}
            add("passlb_bgp_vip_announced", labels, 1 if vip["announced"] else 0)
        add("passlb_node_drained", {}, 1 if bgp["node"]["drained"] else 0)
        add("passlb_bgp_speaker_restarts_total", {}, bgp["restarts"])
    samples["passlb_apply_duration_seconds"].extend(
        histogram_samples("passlb_apply_duration_seconds", apply_duration)
    )
    samples["passlb_ring_build_seconds"].extend(
        histogram_samples("passlb_ring_build_seconds", ring_build)
    )
    add("passlb_applies_total", {}, doc["applies"])
    add("passlb_apply_failures_total", {}, doc["apply_failures"])
    add("passlb_reloads_total", {}, doc["reloads"])
    for repair in doc.get("resync_repairs", []):
        labels = {"service": repair["service"], "kind": repair["kind"]}
        add("passlb_resync_repairs_total", labels, repair["total"])
    add("passlb_reload_failures_total", {}, doc["reload_failures"])
    add("passlb_in_sync", {}, 1 if doc["state"]["in_sync"] else 0)
    add("passlb_uptime_seconds", {}, doc["uptime"])
    counted = doc.get("flow_count")
    if counted and counted["age"] is not None:
        add("passlb_flow_count_age_seconds", {}, counted["age"])
    add("passlb_build_info", {"version": doc["version"]}, 1)

    lines: list[str] = []
    for metric in ALL_METRICS:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        lines.extend(samples[metric.name])
    return "\n".join(lines) + "\n"
