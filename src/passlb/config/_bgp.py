"""The [bgp] table: announcing VIPs to routers through a BGP speaker."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from passlb.config import _values as values
from passlb.config._reader import Invalid, Table, boolean, choice, describe, duration, text
from passlb.model import (
    DEFAULT_HOLD_TIME,
    Announce,
    BgpPeer,
    BgpSettings,
    Community,
    IPAddress,
    Service,
    Speaker,
)

BGP_KEYS = ("asn", "router_id", "speaker", "next_hop", "communities", "run_dir", "peers")
PEER_KEYS = ("address", "asn", "hold_time", "bfd", "password")

MAX_ASN = 2**32 - 1
AS_TRANS = 23456  # RFC 6793: the 2-octet stand-in for a 4-octet AS, never a real one
MIN_HOLD_TIME, MAX_HOLD_TIME = 3, 65535  # RFC 4271, section 4.2: 0 or at least 3 s
_COMMUNITY = re.compile(r"(\d{1,5}):(\d{1,5})")
# The value lands inside a quoted string of the speaker's config file.
_UNQUOTABLE = re.compile(r'["\\\n\r\x00]')


def asn(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(f"expected an AS number (integer), got {describe(value)}")
    if not 1 <= value <= MAX_ASN - 1:
        raise Invalid(f"must be an AS number between 1 and {MAX_ASN - 1}, got {value}")
    if value == AS_TRANS:
        raise Invalid(f"{AS_TRANS} is AS_TRANS (RFC 6793), a placeholder, not a real AS")
    return value


def router_id(value: object) -> ipaddress.IPv4Address:
    raw = text(value)
    try:
        address = ipaddress.IPv4Address(raw)
    except ValueError:
        raise Invalid(
            f"expected an IPv4 address (a BGP identifier is 32 bits, RFC 6286), got {raw!r}"
        ) from None
    if address.is_unspecified:
        raise Invalid(f"must not be {raw} (RFC 6286: non-zero)")
    return address


def hold_time(value: object) -> float:
    seconds = duration(allow_zero=True)(value)
    if seconds != 0 and not (seconds.is_integer() and MIN_HOLD_TIME <= seconds <= MAX_HOLD_TIME):
        raise Invalid(
            f"must be 0 or whole seconds from {MIN_HOLD_TIME}s to {MAX_HOLD_TIME}s"
            f" (RFC 4271), got {value!r}"
        )
    return seconds


def community(value: object) -> Community:
    raw = text(value)
    match = _COMMUNITY.fullmatch(raw)
    if match is None or int(match[1]) > 65535 or int(match[2]) > 65535:
        raise Invalid(f"expected 'asn:value' with both 0-65535 (RFC 1997), got {raw!r}")
    return Community(int(match[1]), int(match[2]))


def password(value: object) -> str:
    raw = text(value)
    if _UNQUOTABLE.search(raw) or len(raw) > 80:  # TCP MD5 keys are at most 80 bytes
        raise Invalid("must be 1-80 characters without quotes, backslashes or line breaks")
    return raw


def run_dir(value: object) -> str:
    raw = text(value)
    if not raw.startswith("/") or _UNQUOTABLE.search(raw):
        raise Invalid(f"expected an absolute directory path, got {raw!r}")
    return raw


def build_bgp(table: Table | None, services: Sequence[tuple[int, Service]]) -> BgpSettings | None:
    if table is None:
        return None
    table.check_keys(BGP_KEYS)
    local_asn = table.required("asn", asn)
    rid = table.required("router_id", router_id)
    speaker = table.get("speaker", choice(Speaker), Speaker.BIRD)
    directory = table.get("run_dir", run_dir, BgpSettings.run_dir)
    communities = tuple(c for _, c in table.each("communities", community, non_empty=False) or [])
    next_hops = _next_hops(table)
    peers = _peers(table)
    families: set[int] = {p.address.version for p in peers}
    for address in next_hops:
        if peers and address.version not in families:
            table.problem(
                "next_hop", f"{address} is IPv{address.version} but no peer is: nobody uses it"
            )
    _check_families(table, families, services)
    if local_asn is None or rid is None:
        return None
    return BgpSettings(
        asn=local_asn,
        router_id=rid,
        peers=peers,
        speaker=speaker,
        next_hops=next_hops,
        communities=communities,
        run_dir=directory,
    )


def _next_hops(table: Table) -> tuple[IPAddress, ...]:
    found: dict[int, IPAddress] = {}
    for position, address in table.each("next_hop", values.ip_address) or []:
        if address.version in found:
            table.issues.add(
                (*table.at("next_hop"), position),
                f"a second IPv{address.version} next hop ({found[address.version]} is the"
                " first); at most one per address family",
            )
        found.setdefault(address.version, address)
    return tuple(found.values())


def _peers(table: Table) -> tuple[BgpPeer, ...]:
    peer_tables = table.tables("peers", "bgp.peers")
    if not peer_tables:
        if peer_tables is None:
            table.problem("peers", "required: at least one router to announce to ([[bgp.peers]])")
        else:
            table.problem("peers", "must not be empty")
        return ()
    peers: list[BgpPeer] = []
    seen: dict[IPAddress, int] = {}
    for position, peer in peer_tables:
        peer.check_keys(PEER_KEYS)
        address = peer.required("address", values.ip_address)
        peer_asn = peer.required("asn", asn)
        hold = peer.get("hold_time", hold_time, DEFAULT_HOLD_TIME)
        bfd = peer.get("bfd", boolean, False)
        secret = peer.optional("password", password)
        if address is not None and address.is_link_local:
            peer.problem("address", f"{address} is link-local; give the router's global address")
        elif address is not None and address in seen:
            peer.problem("address", f"{address} is already bgp.peers[{seen[address]}]")
        if address is None or peer_asn is None:
            continue
        seen[address] = position
        peers.append(BgpPeer(address, peer_asn, hold, bfd, secret))
    return tuple(peers)


def _check_families(
    table: Table, families: set[int], services: Sequence[tuple[int, Service]]
) -> None:
    """A VIP reaches routers only over a session of its own family."""
    if not families:
        return
    for index, service in services:
        version = service.vip.version
        if service.announce is not Announce.NEVER and version not in families:
            table.issues.add(
                ("services", index, "vip"),
                f"IPv{version} VIP to announce but every bgp.peers entry is"
                f" IPv{4 if version == 6 else 6}: add an IPv{version} peer, or set"
                ' announce = "never"',
            )
