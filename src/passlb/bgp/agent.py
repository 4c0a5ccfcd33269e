"""The daemon's BGP side: keeps the speaker announcing what `announce` decides.

    agent = BgpAgent(settings, speaker, on_event)
    agent.state_changed(applied_state)   # after every apply to the data plane
    agent.set_drained(True)              # passlb node drain
    await agent.run()                    # pushes changes, watches the peers

The VIPs follow the data plane: they are computed from the state last applied
to it, so a VIP is announced only once this node forwards it. The peers are
read from the speaker every second (BIRD has no change notifications); their
changes and every announce or withdraw become events.

Drain is remembered in ``run_dir/drained``, so a daemon restarted during a
drain stays drained. "The routers moved the traffic away" is read from the
data plane: the speaker reports no VIP exported to any peer, and this node's
packet counters have not grown for ``QUIET_PERIOD`` since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passlb.bgp.announce import VipAnnouncement, announcements
from passlb.bgp.bird import EventSink, Speaker, SpeakerError, describe_peers
from passlb.bgp.bird_config import PeerState
from passlb.dataplane.base import ServiceCounters
from passlb.model import BgpSettings, IPAddress
from passlb.state import DesiredState

log = logging.getLogger("passlb.bgp")

PEER_REFRESH = 1.0  # seconds between reads of the speaker's sessions
QUIET_PERIOD = 2.0  # seconds without a packet after the withdrawal: the traffic has moved


@dataclass
class DrainProgress:
    since: float  # wall-clock time of `passlb node drain`
    withdrawn_at: float | None = None  # the speaker exported no VIP to any peer
    last_packet_at: float | None = None  # last counter read that saw packets grow
    packets_after_withdrawal: int = 0


class BgpAgent:
    def __init__(self, settings: BgpSettings, speaker: Speaker, on_event: EventSink) -> None:
        self.settings = settings
        self.speaker = speaker
        self.on_event = on_event
        self.vips: tuple[VipAnnouncement, ...] = ()
        self.peers: list[PeerState] = []
        self.peers_read_at: float | None = None
        self.peer_error = ""
        self.drain: DrainProgress | None = None
        self._state: DesiredState | None = None
        self._dirty = asyncio.Event()
        self._packets: int | None = None
        if self._drained_file.exists():
            self.drain = DrainProgress(since=self._drained_file.stat().st_mtime)

    @property
    def _drained_file(self) -> Path:
        return Path(self.settings.run_dir) / "drained"

    @property
    def drained(self) -> bool:
        return self.drain is not None

    def announced(self) -> tuple[IPAddress, ...]:
        return tuple(a.vip for a in self.vips if a.announced)

    # -- inputs ---------------------------------------------------------------

    def state_changed(self, applied: DesiredState | None) -> None:
        self._state = applied
        self._decide()

    def set_settings(self, settings: BgpSettings) -> None:
        self.settings = settings
        self._dirty.set()

    def set_drained(self, drained: bool) -> str:
        """Drain or undrain this node; the message says what happens next."""
        if drained == self.drained:
            return "node already drained" if drained else "node not drained"
        if drained:
            self.drain = DrainProgress(since=time.time())
            self._drained_file.parent.mkdir(parents=True, exist_ok=True)
            self._drained_file.touch()
        else:
            self.drain = None
            self._drained_file.unlink(missing_ok=True)
        self.on_event("node", "node drained" if drained else "node undrained", drained=drained)
        self._decide()
        self._dirty.set()
        vips = len(self.vips)
        return (
            f"node drained: withdrawing {vips} VIP(s); forwarding continues"
            if drained
            else f"node undrained: announcing again ({vips} VIP(s) considered)"
        )

    def observe_counters(self, now: float, counters: Mapping[str, ServiceCounters]) -> None:
        """Counter reads (the daemon's sampler) tell when traffic stopped arriving."""
        total = sum(c.total.packets for c in counters.values())
        grew = self._packets is not None and total > self._packets
        if self.drain is not None and grew:
            self.drain.last_packet_at = now
            if self.drain.withdrawn_at is not None:
                self.drain.packets_after_withdrawal += total - (self._packets or 0)
        self._packets = total

    def _decide(self) -> None:
        if self._state is None:
            return
        before = {a.vip: a for a in self.vips}
        self.vips = announcements(self._state, drained=self.drained)
        for vip in self.vips:
            old = before.get(vip.vip)
            if old is None or old.announced != vip.announced or old.reason != vip.reason:
                verb = "announced" if vip.announced else "withdrawn"
                self.on_event(
                    "bgp",
                    f"{vip.prefix} {verb}: {vip.reason} ({', '.join(vip.because_of)})",
                    vip=str(vip.vip),
                    announced=vip.announced,
                    reason=str(vip.reason),
                )
        if {a.vip for a in self.vips if a.announced} != {
            a.vip for a in before.values() if a.announced
        }:
            self._dirty.set()

    # -- running --------------------------------------------------------------

    async def run(self) -> None:
        """Push every change to the speaker, and read its sessions every second."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), PEER_REFRESH)
            if self._dirty.is_set():
                self._dirty.clear()
                try:
                    await self.speaker.announce(self.settings, self.announced())
                except SpeakerError as err:
                    self.on_event("bgp", f"announce failed: {err}", ok=False, error=str(err))
                    self._dirty.set()  # retried on the next round
            await self._read_peers()

    async def _read_peers(self) -> None:
        try:
            peers = await self.speaker.peers()
        except SpeakerError as err:
            self.peer_error = str(err)
            return
        self.peer_error = ""
        before = {p.address: p.state for p in self.peers}
        for peer in peers:
            if before.get(peer.address, "") != peer.state:
                detail = f" ({peer.last_error})" if peer.last_error else ""
                self.on_event(
                    "bgp",
                    f"peer {peer.address} {peer.state}{detail}",
                    peer=peer.address,
                    state=peer.state,
                    ok=peer.established or before.get(peer.address) != "Established",
                )
        self.peers, self.peers_read_at = peers, time.time()
        drain = self.drain
        if drain is not None and drain.withdrawn_at is None and all(p.exported == 0 for p in peers):
            drain.withdrawn_at = self.peers_read_at
            self.on_event("node", "every VIP withdrawn from every peer", drained=True)

    # -- status ---------------------------------------------------------------

    def document(self, now: float) -> dict[str, Any]:
        """The status document's "bgp" section."""
        drain = self.drain
        node: dict[str, Any] = {"drained": drain is not None}
        if drain is not None:
            quiet_since = max(drain.withdrawn_at or now, drain.last_packet_at or 0.0)
            node |= {
                "drained_since": drain.since,
                "withdrawn": drain.withdrawn_at is not None,
                "withdrawn_at": drain.withdrawn_at,
                "last_packet_at": drain.last_packet_at,
                "packets_after_withdrawal": drain.packets_after_withdrawal,
                "traffic_moved": drain.withdrawn_at is not None
                and now - quiet_since >= QUIET_PERIOD,
            }
        return {
            "speaker": str(self.settings.speaker),
            "asn": self.settings.asn,
            "router_id": str(self.settings.router_id),
            "restarts": getattr(self.speaker, "restarts", 0),
            "node": node,
            "peers": describe_peers(self.peers, self.settings),
            "peers_read_at": self.peers_read_at,
            "peer_error": self.peer_error,
            "vips": [
                {
                    "vip": str(a.vip),
                    "prefix": a.prefix,
                    "announced": a.announced,
                    "reason": str(a.reason),
                    "services": list(a.services),
                    "because_of": list(a.because_of),
                }
                for a in self.vips
            ],
        }
