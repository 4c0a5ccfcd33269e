"""The data-plane benchmark's results as Markdown, and their place in docs/benchmarks.md.

Pure: values in, text out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dataplane_workloads import Measurement

if TYPE_CHECKING:
    from dataplane_memory import IdleMemory


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    higher_is_better: bool
    ratio: bool = True  # shown as a ratio to direct


ROWS: tuple[Row, ...] = (
    Row("bulk1", "TCP bulk, 1 stream (iperf3)", higher_is_better=True),
    Row("bulk4", "TCP bulk, 4 streams (iperf3 -P 4)", higher_is_better=True),
    Row("cps", "New TCP connections/s (wrk, `Connection: close`)", higher_is_better=True),
    Row("udp", "UDP 64-byte datagrams received/s (iperf3 -u -b 0)", higher_is_better=True),
    Row("lat_new_p50", "Latency p50, new connection + GET", higher_is_better=False),
    Row("lat_new_p99", "Latency p99, new connection + GET", higher_is_better=False),
    Row("lat_open_p50", "Latency p50, GET on an open connection", higher_is_better=False),
    Row("lat_open_p99", "Latency p99, GET on an open connection", higher_is_better=False),
    Row("rss", "Load balancer memory (RSS, all its processes)", False, ratio=False),
)

# Per target: row key -> a measurement, or the reason there is none.
Cell = Measurement | str
Results = Mapping[str, Mapping[str, Cell]]


def format_value(m: Measurement) -> str:
    if m.value >= 100:
        number = f"{m.value:,.0f}"
    elif m.value >= 10:
        number = f"{m.value:.1f}"
    else:
        number = f"{m.value:.2f}"
    return f"{number} {m.unit}"


def format_cell(cell: Cell | None, baseline: Cell | None, row: Row) -> str:
    if cell is None:
        return "—"
    if isinstance(cell, str):
        return cell
    text = format_value(cell)
    if row.ratio and isinstance(baseline, Measurement) and baseline.value > 0:
        text += f" ({cell.value / baseline.value:.2f}x)"
    return text


def results_table(results: Results, baseline: str = "direct") -> str:
    """Rows = workloads, columns = targets in the order given; every value
    with its unit and, in parentheses, its ratio to `baseline`."""
    targets = list(results)
    lines = [
        "| workload | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    reference = results.get(baseline, {})
    for row in ROWS:
        cells = [format_cell(results[t].get(row.key), reference.get(row.key), row) for t in targets]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Goal:
    """A speed target from the issues: `target`'s `row` >= factor x `reference`'s."""

    target: str
    row: str
    factor: float
    reference: str


# Issue 4 (dsr), 5 (nat) and 7 (proxy), "Speed" sections. "Ahead of HAProxy
# and NGINX on every workload" is checked by `ahead_of`.
GOALS: tuple[Goal, ...] = (
    *(Goal("passlb-dsr", row, 0.95, "direct") for row in ("bulk1", "bulk4", "cps")),
    *(Goal("passlb-nat", row, 0.9, "direct") for row in ("bulk1", "bulk4")),
    Goal("passlb-nat", "cps", 0.8, "direct"),
    *(Goal("passlb-proxy", row, 1.0, "nginx") for row in ("bulk1", "bulk4")),
    Goal("passlb-proxy", "cps", 0.5, "nginx"),
)
AHEAD_TARGETS = ("passlb-dsr", "passlb-nat")
RIVALS = ("haproxy", "nginx")
_ROW_BY_KEY = {row.key: row for row in ROWS}


def _value(results: Results, target: str, row: str) -> float | None:
    cell = results.get(target, {}).get(row)
    return cell.value if isinstance(cell, Measurement) else None


def goal_lines(results: Results) -> list[str]:
    """One line per speed target of the issues whose numbers were all measured."""
    lines = []
    for goal in GOALS:
        mine = _value(results, goal.target, goal.row)
        theirs = _value(results, goal.reference, goal.row)
        if mine is None or theirs is None or theirs <= 0:
            continue
        ratio = mine / theirs
        verdict = "met" if ratio >= goal.factor else "NOT met"
        lines.append(
            f"- `{goal.target}` {_ROW_BY_KEY[goal.row].label}: {ratio:.2f} x "
            f"`{goal.reference}` (goal >= {goal.factor:g}): {verdict}"
        )
    for target in AHEAD_TARGETS:
        behind = ahead_of(results, target)
        if behind is not None:
            verdict = "met" if not behind else "NOT met, behind on " + "; ".join(behind)
            lines.append(f"- `{target}` ahead of HAProxy and NGINX on every workload: {verdict}")
    return lines


def ahead_of(results: Results, target: str) -> list[str] | None:
    """The workloads where a measured rival beats `target` (None: nothing to compare)."""
    compared, behind = False, []
    for row in ROWS:
        if not row.ratio:
            continue  # memory is reported, not raced
        mine = _value(results, target, row.key)
        for rival in RIVALS:
            theirs = _value(results, rival, row.key)
            if mine is None or theirs is None:
                continue
            compared = True
            if (mine < theirs) if row.higher_is_better else (mine > theirs):
                behind.append(f"{row.label} vs {rival}")
    return behind if compared else None


# (numerator, denominator) target pairs of the hop table: what the namespace
# hop costs by itself (one way, DSR's path; both ways, NAT's path), then what
# passlb adds on top of exactly that path.
HOP_RATIOS: tuple[tuple[str, str], ...] = (
    ("hop", "direct"),
    ("passlb-dsr", "hop"),
    ("routed", "direct"),
    ("passlb-nat", "routed"),
)


def hop_table(results: Results) -> str | None:
    """Per workload, the HOP_RATIOS (None: hop not measured)."""
    if not any(_value(results, "hop", row.key) is not None for row in ROWS):
        return None
    lines = [
        "| workload | " + " | ".join(f"{a} / {b}" for a, b in HOP_RATIOS) + " |",
        "|---|" + "---:|" * len(HOP_RATIOS),
    ]
    for row in ROWS:
        if not row.ratio:
            continue
        cells = []
        for numerator, denominator in HOP_RATIOS:
            mine = _value(results, numerator, row.key)
            theirs = _value(results, denominator, row.key)
            if mine is None or theirs is None or theirs <= 0:
                cells.append("—")
            else:
                cells.append(f"{mine / theirs:.2f}x")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def idle_lines(idle: IdleMemory | str, target: str) -> str:
    """The idle-connection memory of issue 7 as a paragraph (or why it failed)."""
    if isinstance(idle, str):
        return f"Not measured: {idle}"
    mib = 1024
    capped = (
        f" ({idle.asked:,} asked: with two sockets each, no more fit the daemon's "
        f"RLIMIT_NOFILE of {idle.nofile_soft:,}, hard {idle.nofile_hard:,})"
        if idle.connections < idle.asked
        else ""
    )
    return (
        f"{idle.connections:,} idle TCP connections{capped} held open at once from the client "
        f"namespace to `{target}`'s `web` port (nothing sent; the proxy took "
        f"{idle.lb_sockets_added:,} more descriptors, client and backend side of each). "
        f"Load balancer RSS: {idle.rss_before_kib / mib:,.1f} MiB before, "
        f"{idle.rss_open_kib / mib:,.1f} MiB with them open: "
        f"**{idle.per_connection_kib:.1f} KiB per connection** "
        f"({idle.per_connection_kib * 10_000 / mib:,.0f} MiB per 10,000); "
        f"{idle.rss_closed_kib / mib:,.1f} MiB after they closed. "
        f"The daemon's RLIMIT_NOFILE was {idle.nofile_soft:,} (hard {idle.nofile_hard:,}), "
        "as the benchmark started it; packaging/passlb.service sets `LimitNOFILE=1048576`."
    )


def control_table(rows: Sequence[Sequence[str]]) -> str:
    """Control-plane cost, one line per service count."""
    lines = [
        "| services | ring slots | first sync (full) | ring change in every service "
        "| ring change in one service | peak RSS |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
