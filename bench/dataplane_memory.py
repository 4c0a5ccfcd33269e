"""Memory of a load balancer's processes, and what idle connections cost it (issue 7).

`idle_connection_memory` runs in the lab's client namespace (`Lab.call`): it
opens `count` TCP connections to the proxy, sends nothing, and reads the
load balancer's resident memory through /proc (one PID namespace for all the
lab) before, while they are open and after they are closed. Everything is
bounded: a deadline for the whole run, and the sockets close when it ends
(or with the forked child, whatever happens).
"""

from __future__ import annotations

import os
import re
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path

BATCH = 250  # connections opened before waiting for the proxy to take them all
CONNECT_TIMEOUT = 10.0  # a SYN lost to a full accept queue is retried after 1 s, then 3 s
SETTLE = 1.0  # seconds the proxy's descriptor count must hold still to count as settled
POLL = 0.05
FD_MARGIN = 500  # descriptors kept free beyond the connections, client and load balancer


@dataclass(frozen=True)
class IdleMemory:
    asked: int
    connections: int  # open at once: `asked`, or what the load balancer's limit fits
    lb_sockets_added: int  # descriptors the load balancer gained for them
    nofile_soft: int  # the load balancer's RLIMIT_NOFILE while measured
    nofile_hard: int
    rss_before_kib: int
    rss_open_kib: int  # with all the connections open and idle
    rss_closed_kib: int  # once the proxy closed them again

    @property
    def per_connection_kib(self) -> float:
        return (self.rss_open_kib - self.rss_before_kib) / max(1, self.connections)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (NGINX and HAProxy workers are children
    of the main process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended while we looked
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue  # the process ended while we looked
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) if match else 0
    return total


def tree_descriptors(pid: int) -> int:
    """Open file descriptors of a process and all its descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{member}/fd"))
        except OSError:
            continue
    return total


def open_files_limit(pid: int) -> tuple[int, int]:
    """RLIMIT_NOFILE (soft, hard) of a process, from /proc/<pid>/limits."""
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\S+)\s+(\S+)", limits, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no 'Max open files' line in /proc/{pid}/limits")
    soft, hard = (resource.RLIM_INFINITY if v == "unlimited" else int(v) for v in match.groups())
    return soft, hard


def _raise_own_open_files_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to `needed`, up to the hard limit (raising
    that takes CAP_SYS_RESOURCE, which containers often withhold even from root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(f"the client needs {needed} descriptors; its hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _settled_descriptors(lb_pid: int, target: int, deadline: float) -> int:
    """Wait until the load balancer holds `target` descriptors, or its count
    stops moving for SETTLE seconds, or the deadline; return the last count."""
    last, since = tree_descriptors(lb_pid), time.monotonic()
    while last < target and time.monotonic() < deadline:
        time.sleep(POLL)
        now = tree_descriptors(lb_pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLE:
            break
    return last


def idle_connection_memory(
    host: str, port: int, asked: int, lb_pid: int, budget: float
) -> IdleMemory:
    """Hold `asked` idle TCP connections to host:port, or as many as the load
    balancer's RLIMIT_NOFILE fits (a proxy needs two sockets per connection:
    client side and backend side), and measure its RSS around them. Raises
    RuntimeError when they do not all open and reach the proxy within `budget` seconds.
    """
    deadline = time.monotonic() + budget
    nofile_soft, nofile_hard = open_files_limit(lb_pid)
    base_fds = tree_descriptors(lb_pid)
    count = min(asked, (nofile_soft - base_fds - FD_MARGIN) // 2)
    if count <= 0:
        raise RuntimeError(f"the load balancer's RLIMIT_NOFILE ({nofile_soft}) fits no connection")
    _raise_own_open_files_limit(count + FD_MARGIN)
    rss_before = tree_rss_kib(lb_pid)
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(sockets)} of {count} connections within {budget} s")
            for _ in range(min(BATCH, count - len(sockets))):
                sockets.append(socket.create_connection((host, port), timeout=CONNECT_TIMEOUT))
            # Pace by the proxy's accept loop: a full accept queue drops SYNs.
            _settled_descriptors(lb_pid, base_fds + 2 * len(sockets), deadline)
        lb_fds = _settled_descriptors(lb_pid, base_fds + 2 * count, deadline)
        if lb_fds < base_fds + 2 * count:
            raise RuntimeError(
                f"the load balancer holds {lb_fds - base_fds} new descriptors, not "
                f"{2 * count}, for {count} connections (its RLIMIT_NOFILE: {nofile_soft})"
            )
        rss_open = tree_rss_kib(lb_pid)
    finally:
        for sock in sockets:
            sock.close()
    _settled_descriptors_down(lb_pid, base_fds, deadline)
    return IdleMemory(
        asked=asked,
        connections=count,
        lb_sockets_added=lb_fds - base_fds,
        nofile_soft=nofile_soft,
        nofile_hard=nofile_hard,
        rss_before_kib=rss_before,
        rss_open_kib=rss_open,
        rss_closed_kib=tree_rss_kib(lb_pid),
    )


def _settled_descriptors_down(lb_pid: int, target: int, deadline: float) -> None:
    """Wait until the load balancer is back to `target` descriptors (or the deadline)."""
    while tree_descriptors(lb_pid) > target and time.monotonic() < deadline:
        time.sleep(POLL)
