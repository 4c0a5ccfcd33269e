"""What a dsr backend needs, as commands: the VIP on lo, and no ARP for it.

In dsr the load balancer forwards the client's packet unchanged at L3 to the
backend's MAC: the destination is still the VIP. The backend accepts it only
when the VIP is one of its own addresses, so the VIP goes on `lo` (/32, /128).
It must not answer ARP for that address on the shared segment, or it would
steal the VIP from the load balancer's router: `arp_ignore=1` answers only for
addresses of the interface the request came in on, `arp_announce=2` never
uses the VIP as the source of its own ARP requests (the LVS-DR recipe).
IPv6 needs no sysctl: Linux answers neighbour solicitations only for addresses
of the receiving interface; `nodad` skips duplicate detection, which would
otherwise probe the segment for a VIP every backend holds.
"""

from __future__ import annotations

import subprocess
from ipaddress import ip_address

from passlb.errors import DataplaneError

_ARP_SYSCTLS = (("net.ipv4.conf.all.arp_ignore", "1"), ("net.ipv4.conf.all.arp_announce", "2"))

# Messages of an `ip addr add` that finds the address already there, or an
# `ip addr del` that finds it gone: the wanted state holds, so they succeed.
_ALREADY_DONE = (
    "File exists",
    "Address already assigned",
    "Address not found",
    "Cannot assign requested address",
    "No such",
)


def backend_setup_commands(vip: str, undo: bool = False) -> list[list[str]]:
    """The commands that prepare (or, with undo, unprepare) a backend for `vip`.

    Undo leaves the ARP sysctls at the kernel defaults (0), which is right for
    a host that had them at their defaults before.
    """
    address = ip_address(vip)
    verb = "del" if undo else "add"
    if address.version == 6:
        addr = ["ip", "-6", "addr", verb, f"{address}/128", "dev", "lo"]
        return [addr + ([] if undo else ["nodad"])]
    commands = [["ip", "addr", verb, f"{address}/32", "dev", "lo"]]
    for name, value in _ARP_SYSCTLS:
        commands.append(["sysctl", "-q", "-w", f"{name}={'0' if undo else value}"])
    return commands


def apply_backend_setup(vip: str, undo: bool = False, *, netns: str | None = None) -> None:
    """Run backend_setup_commands here (or in the named network namespace)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    for argv in backend_setup_commands(vip, undo):
        done = subprocess.run(prefix + argv, capture_output=True, text=True, check=False)
        if done.returncode != 0 and not any(m in done.stderr for m in _ALREADY_DONE):
            raise DataplaneError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
