"""The BIRD config passlb renders, and its reading of `birdc show protocols all`."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from passlb.bgp.bird_config import parse_protocols, peer_name, render_config
from passlb.model import BgpPeer, BgpSettings, Community

SETTINGS = BgpSettings(
    asn=64512,
    router_id=IPv4Address("198.18.2.2"),
    peers=(
        BgpPeer(IPv4Address("198.18.2.254"), 64513, hold_time=3.0, bfd=True, password="s3cret"),
        BgpPeer(IPv6Address("2001:2:0:2::fe"), 64513),
    ),
    next_hops=(IPv6Address("2001:2:0:2::2"),),
    communities=(Community(64512, 100),),
)


def test_announced_vips_become_host_routes_of_their_family() -> None:
    text = render_config(SETTINGS, [IPv4Address("198.18.0.10"), IPv6Address("2001:2:0:ff00::10")])
    assert "router id 198.18.2.2;" in text
    assert "protocol static passlb_vips4 {\n  ipv4;\n  route 198.18.0.10/32 unreachable;\n}" in text
    assert "route 2001:2:0:ff00::10/128 unreachable;" in text
    assert "bgp_community.add((64512, 100));" in text


def test_each_peer_gets_its_session_options() -> None:
    text = render_config(SETTINGS, [])
    v4 = text[text.index("protocol bgp peer_198_18_2_254") :]
    v4 = v4[: v4.index("\n}")]
    assert "neighbor 198.18.2.254 as 64513;" in v4 and "local as 64512;" in v4
    assert "hold time 3;" in v4 and "bfd on;" in v4 and 'password "s3cret";' in v4
    assert "ipv4 { import none; export filter passlb_export4; next hop self; };" in v4
    assert "protocol bfd passlb_bfd {}" in text
    v6 = text[text.index("protocol bgp peer_2001_2_0_2__fe") :]
    assert "next hop address 2001:2:0:2::2;" in v6 and "bfd on" not in v6.split("}")[0]


def test_nothing_announced_leaves_empty_static_protocols() -> None:
    text = render_config(SETTINGS, [])
    assert "route " not in text
    assert peer_name(SETTINGS.peers[1]) == "peer_2001_2_0_2__fe"


# Captured from BIRD 2.0.12 (two sessions, one up with a route out, one down).
SHOW_PROTOCOLS_ALL = """\
BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     16:52:17.430
passlb_vips4 Static     master4    up     16:52:17.430
  Channel ipv4
    State:          UP
    Routes:         1 imported, 0 exported, 1 preferred

peer_198_18_2_254 BGP        ---        up     16:52:21.336  Established
  BGP state:          Established
    Neighbor address: 198.18.2.254
    Neighbor AS:      64513
    Local AS:         64512
    Hold timer:       2.439/3
  Channel ipv4
    State:          UP
    Routes:         0 imported, 1 exported, 0 preferred

peer_2001_2_0_2__fe BGP ---  start  16:52:17.430  Active        Socket: Connection refused
  BGP state:          Active
    Neighbor address: 2001:2:0:2::fe
    Neighbor AS:      64513
    Local AS:         64512
    Last error:       Socket: Connection refused
  Channel ipv6
    State:          DOWN
"""


def test_bgp_sessions_are_read_from_show_protocols_all() -> None:
    up, down = parse_protocols(SHOW_PROTOCOLS_ALL)
    assert (up.name, up.address, up.asn, up.state, up.exported) == (
        "peer_198_18_2_254",
        "198.18.2.254",
        64513,
        "Established",
        1,
    )
    assert up.established and not down.established
    assert (down.state, down.last_error, down.exported) == (
        "Active",
        "Socket: Connection refused",
        0,
    )
