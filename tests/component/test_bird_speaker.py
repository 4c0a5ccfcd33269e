"""The BIRD driver against a real BIRD 2 (Debian's bird2), without sessions:
its one peer is a loopback address (BIRD refuses to open a session to it), so
nothing leaves the machine. Sessions, routes on a router and failover are in the kernel
lab (tests/kernel/test_cluster_lab.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from passlb.bgp.bird import BirdSpeaker, SpeakerError
from passlb.model import BgpPeer, BgpSettings

VIP = IPv4Address("198.18.0.10")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="BIRD needs root")


def settings(run_dir: Path) -> BgpSettings:
    return BgpSettings(
        asn=64512,
        router_id=IPv4Address("198.18.2.2"),
        peers=(BgpPeer(IPv4Address("127.0.0.2"), 64513, hold_time=3.0),),
        run_dir=str(run_dir),
    )


@pytest.fixture
async def speaker(tmp_path: Path) -> AsyncIterator[tuple[BirdSpeaker, list[dict[str, Any]]]]:
    events: list[dict[str, Any]] = []

    def on_event(kind: str, message: str, **fields: Any) -> None:
        events.append({"kind": kind, "message": message, **fields})

    bird = BirdSpeaker(settings(tmp_path / "bgp"), on_event, restart_delay=0.05)
    await bird.start([VIP])
    try:
        yield bird, events
    finally:
        await bird.stop()


async def routes(bird: BirdSpeaker) -> str:
    return await bird.birdc_command("show", "route", "protocol", "passlb_vips4")


async def answered(bird: BirdSpeaker) -> str:
    """birdc's answer once the freshly started bird listens."""
    for _ in range(100):
        try:
            return await routes(bird)
        except SpeakerError:
            await asyncio.sleep(0.05)
    raise AssertionError("bird never answered on its control socket")


async def test_announce_and_withdraw_reach_birds_table(
    speaker: tuple[BirdSpeaker, list[dict[str, Any]]],
) -> None:
    bird, _ = speaker
    assert "198.18.0.10/32" in await answered(bird)
    await bird.announce(bird.settings, [])
    assert "198.18.0.10/32" not in await routes(bird)
    (peer,) = await bird.peers()
    assert (peer.address, peer.asn, peer.established) == ("127.0.0.2", 64513, False)


async def test_a_config_bird_refuses_changes_nothing(
    speaker: tuple[BirdSpeaker, list[dict[str, Any]]],
) -> None:
    bird, _ = speaker
    await answered(bird)
    before = bird.config_file.read_text()
    bad = dataclasses.replace(bird.settings, asn=0)  # the loader refuses it; bird must too
    with pytest.raises(SpeakerError, match="BIRD refused the config"):
        await bird.announce(bad, [])
    assert bird.config_file.read_text() == before
    assert "198.18.0.10/32" in await routes(bird)


async def test_a_killed_bird_is_restarted_with_the_same_routes(
    speaker: tuple[BirdSpeaker, list[dict[str, Any]]],
) -> None:
    bird, events = speaker
    await answered(bird)
    supervisor = asyncio.create_task(bird.supervise())
    first = bird.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    while bird.restarts == 0 or bird.pid in (None, first):
        await asyncio.sleep(0.02)
    assert "198.18.0.10/32" in await answered(bird)
    assert any("BIRD died" in e["message"] for e in events)
    supervisor.cancel()
    await asyncio.gather(supervisor, return_exceptions=True)


async def test_a_bird_left_running_is_adopted_not_doubled(tmp_path: Path) -> None:
    first = BirdSpeaker(settings(tmp_path / "bgp"), lambda *a, **k: None)
    await first.start([VIP])
    await answered(first)
    adopted: list[str] = []
    second = BirdSpeaker(
        settings(tmp_path / "bgp"), lambda kind, message, **_: adopted.append(message)
    )
    await second.start([])
    try:
        assert second.pid == first.pid
        assert adopted == [f"adopted the running BIRD (pid {first.pid})"]
        assert "198.18.0.10/32" not in await routes(second)
    finally:
        await second.stop()
    # The second stopped the first's process (still its child: reaped here).
    assert first._child is not None
    first._child.wait(timeout=5)
