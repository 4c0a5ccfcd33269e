"""BIRD 2 as text: the config passlb writes and the `birdc` answers it reads.

Pure: no I/O. `passlb.bgp.bird` runs BIRD with what this module renders.

The config announces each VIP as a static host route (``unreachable``: it
lives only in BIRD's own table, as BIRD has no kernel protocol here, so the
node's forwarding is untouched) and exports exactly those routes to every
peer of the VIP's family, with ``next hop self`` or the configured next hop,
and the configured communities. Nothing is imported: a passlb node routes by
its own kernel table, not by what the routers announce.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from passlb.model import BgpPeer, BgpSettings, IPAddress

STATIC4, STATIC6 = "passlb_vips4", "passlb_vips6"
# Fast (re)connects: BIRD's defaults wait 5 s before the first connect, 120 s
# between tries and 60-300 s after an error, which would keep a restarted
# node out of the fleet for minutes.
SESSION_TIMERS = "connect delay time 1;\n  connect retry time 5;\n  error wait time 1, 30;"


def peer_name(peer: BgpPeer) -> str:
    """The BIRD protocol name of a peer: "peer_198_18_2_254", "peer_2001_2__fe"."""
    return "peer_" + re.sub(r"[.:]", "_", str(peer.address))


def render_config(settings: BgpSettings, announced: Sequence[IPAddress]) -> str:
    """A whole BIRD config: the VIPs in `announced` go to every peer of their family."""
    lines = [
        "# Written by passlb; every change rewrites it (then `birdc configure`).",
        f"router id {settings.router_id};",
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        "protocol device {}",
    ]
    if any(peer.bfd for peer in settings.peers):
        lines.append("protocol bfd passlb_bfd {}")
    for static, version in ((STATIC4, 4), (STATIC6, 6)):
        routes = "".join(
            f"\n  route {vip}/{vip.max_prefixlen} unreachable;"
            for vip in announced
            if vip.version == version
        )
        lines.append(f"protocol static {static} {{\n  ipv{version};{routes}\n}}")
    communities = "".join(
        f" bgp_community.add(({c.asn}, {c.value}));" for c in settings.communities
    )
    for static, version in ((STATIC4, 4), (STATIC6, 6)):
        lines.append(
            f"filter passlb_export{version} {{\n"
            f'  if proto != "{static}" then reject;{communities} accept;\n}}'
        )
    lines.extend(_peer(settings, peer) for peer in settings.peers)
    return "\n".join(lines) + "\n"


def _peer(settings: BgpSettings, peer: BgpPeer) -> str:
    version = peer.address.version
    next_hop = settings.next_hop(version)
    hop = "next hop self" if next_hop is None else f"next hop address {next_hop}"
    options = [
        f"local as {settings.asn};",
        f"neighbor {peer.address} as {peer.asn};",
        f"hold time {int(peer.hold_time)};",
        SESSION_TIMERS,
    ]
    if peer.bfd:
        options.append("bfd on;")
    if peer.password is not None:
        options.append(f'password "{peer.password}";')
    options.append(f"ipv{version} {{ import none; export filter passlb_export{version}; {hop}; }};")
    body = "\n  ".join(options)
    return f"protocol bgp {peer_name(peer)} {{\n  {body}\n}}"


@dataclass(frozen=True)
class PeerState:
    """One BGP session as BIRD reports it (`birdc show protocols all`)."""

    name: str  # the BIRD protocol name
    address: str  # the neighbour address
    asn: int | None
    state: str  # the BGP state: Idle, Connect, Active, OpenSent, OpenConfirm, Established
    info: str  # BIRD's one-line info (the state, or why it is down)
    last_error: str  # "" when none
    exported: int  # routes exported to the peer now

    @property
    def established(self) -> bool:
        return self.state == "Established"


_HEADER = re.compile(r"^(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*(.*)$")
_FIELD = re.compile(r"^\s+([A-Za-z][A-Za-z0-9 ]*?):\s*(.*?)\s*$")
_EXPORTED = re.compile(r"(\d+) exported")


def parse_protocols(text: str) -> list[PeerState]:
    """The BGP sessions in the output of `birdc show protocols all`."""
    peers: list[PeerState] = []
    block: dict[str, str] = {}
    head: tuple[str, str, str] | None = None  # name, proto, info

    def finish() -> None:
        if head is None or head[1] != "BGP":
            return
        name, _, info = head
        exported = _EXPORTED.search(block.get("Routes", ""))
        asn = block.get("Neighbor AS", "")
        peers.append(
            PeerState(
                name=name,
                address=block.get("Neighbor address", ""),
                asn=int(asn) if asn.isdigit() else None,
                state=block.get("BGP state", "Down"),
                info=info,
                last_error=block.get("Last error", ""),
                exported=int(exported[1]) if exported else 0,
            )
        )

    for line in text.splitlines():
        if not line.strip() or line.startswith(("BIRD ", "Name ")):
            continue
        if not line[0].isspace():
            finish()
            block = {}
            match = _HEADER.match(line)
            head = (match[1], match[2], match[6].strip()) if match else None
            continue
        field = _FIELD.match(line)
        if field and field[1] not in block:  # the first Routes line is the session's channel
            block[field[1]] = field[2]
    finish()
    return peers
