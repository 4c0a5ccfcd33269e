"""Failover to backups and back; every backend unhealthy with fail-open and with drop."""

from __future__ import annotations

from collections import Counter

from .daemon_harness import PORT, EchoBackend, MakeDaemon, open_flows, proxy_service

TIMING = "interval = 0.2\ntimeout = 0.15\nrise = 2\nfall = 2"
HEALTH_PORT = 8081


async def test_backups_take_over_below_the_failover_ratio_and_hand_back(
    make_daemon: MakeDaemon, net: str
) -> None:
    p1, p2, k1 = (EchoBackend(n, f"{net}.{h}") for n, h in (("p1", 11), ("p2", 12), ("k1", 13)))
    for backend in (p1, p2, k1):
        await backend.start()
    daemon = make_daemon(
        proxy_service(
            "web",
            f"{net}.10",
            [
                f'address = "{p1.address}"\nport = {PORT}',
                f'address = "{p2.address}"\nport = {PORT}',
                f'address = "{k1.address}"\nport = {PORT}\nbackup = true',
            ],
            settings="failover_ratio = 0.6",
            health=f'type = "tcp"\n{TIMING}',
        )
    )
    try:
        await daemon.wait_ready()
        served = Counter(r.backend for r in await open_flows(f"{net}.10", 60))
        assert set(served) == {"p1", "p2"}

        # One of two primaries healthy: 0.5 < 0.6, the backup serves alone.
        await p1.kill()
        doc = await daemon.wait_for(
            lambda d: daemon.backend(d, "web", k1.key)["role"] == "active", 3.0, "failover"
        )
        assert daemon.backend(doc, "web", p2.key)["role"] == "standby"
        served = Counter(r.backend for r in await open_flows(f"{net}.10", 60))
        assert served == {"k1": 60}

        await p1.start()
        doc = await daemon.wait_for(
            lambda d: daemon.backend(d, "web", k1.key)["role"] == "standby", 3.0, "fail back"
        )
        served = Counter(r.backend for r in await open_flows(f"{net}.10", 60))
        assert set(served) == {"p1", "p2"}
    finally:
        for backend in (p1, p2, k1):
            await backend.kill()


async def test_all_unhealthy_fail_open_serves_and_drop_refuses(
    make_daemon: MakeDaemon, net: str
) -> None:
    # Checks go to a port of their own, so the data servers keep answering
    # while every check fails: what happens then is the policy's choice alone.
    data = [EchoBackend(f"b{h}", f"{net}.{h}") for h in (11, 12, 21, 22)]
    checks = [EchoBackend("check", f"{net}.{h}", HEALTH_PORT) for h in (11, 12, 21, 22)]
    for server in (*data, *checks):
        await server.start()
    health = f'type = "tcp"\nport = {HEALTH_PORT}\n{TIMING}'
    daemon = make_daemon(
        proxy_service(
            "open",
            f"{net}.10",
            [f'address = "{net}.{h}"\nport = {PORT}' for h in (11, 12)],
            settings='all_unhealthy = "fail-open"',
            health=health,
        )
        + proxy_service(
            "drop",
            f"{net}.20",
            [f'address = "{net}.{h}"\nport = {PORT}' for h in (21, 22)],
            settings='all_unhealthy = "drop"',
            health=health,
        )
    )
    try:
        await daemon.wait_ready()
        for vip in (f"{net}.10", f"{net}.20"):
            assert not [r for r in await open_flows(vip, 20) if r.error]

        for check in checks:
            await check.kill()

        def all_down(doc: dict[str, object]) -> bool:
            services = doc["services"]
            assert isinstance(services, list)
            # Health comes from the checker at once, roles from the next apply: wait for both.
            return all(
                b["health"] == "down" and b["role"] == ("down" if s["name"] == "drop" else "active")
                for s in services
                for b in s["backends"]
            )

        doc = await daemon.wait_for(all_down, 3.0, "every check failing")
        by_name = {s["name"]: s for s in doc["services"]}
        assert by_name["drop"]["dropping"] is True
        assert by_name["open"]["dropping"] is False
        assert {b["role"] for b in by_name["open"]["backends"]} == {"active"}

        opened = await open_flows(f"{net}.10", 40)
        assert not [r for r in opened if r.error]
        assert {r.backend for r in opened} == {"b11", "b12"}

        dropped = await open_flows(f"{net}.20", 20)
        assert all(r.backend is None and r.error for r in dropped)
    finally:
        for server in (*data, *checks):
            await server.kill()
