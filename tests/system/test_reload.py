"""Live reconfiguration: bad files change nothing, a good one is applied as a diff."""

from __future__ import annotations

import asyncio
import signal

from .daemon_harness import (
    PORT,
    Connection,
    EchoBackend,
    MakeDaemon,
    Stream,
    open_flows,
    proxy_service,
)

TIMING = 'type = "tcp"\ninterval = 0.2\ntimeout = 0.15\nrise = 1\nfall = 2'


def _services(net: str, *, web: str = "", extra: str = "", keep_old: bool = True) -> str:
    """web (two backends) + old, or web + new; `web` and `extra` mutate the file."""
    text = proxy_service(
        "web",
        f"{net}.10",
        [f'address = "{net}.{h}"\nport = {PORT}' for h in (11, 12)],
        settings=web,
        health=TIMING,
    )
    if keep_old:
        text += proxy_service("old", f"{net}.20", [f'address = "{net}.21"\nport = {PORT}'])
    else:
        text += proxy_service(
            "new", f"{net}.30", [f'address = "{net}.31"\nport = {PORT}'], health=TIMING
        )
    return text + extra


def _bad_configs(net: str) -> list[tuple[str, str]]:
    """(services text, the field its error must name): ten different mistakes."""
    return [
        (_services(net, web="weight = 3"), "services[web].weight"),
        (_services(net, web='affinity = "7-tuple"'), "services[web].affinity"),
        (_services(net, web="ring_size = 1000"), "services[web].ring_size"),
        (_services(net, web="failover_ratio = 2"), "services[web].failover_ratio"),
        (_services(net, web='drain_timeout = "5 minutes"'), "services[web].drain_timeout"),
        (_services(net, web='all_unhealthy = "maybe"'), "services[web].all_unhealthy"),
        (
            _services(
                net,
                extra=f'\n[[services]]\nname = "web"\nvip = "{net}.40"\nports = 1\n'
                f'mode = "proxy"\n[[services.backends]]\naddress = "{net}.41"\n',
            ),
            "services[2].name",
        ),
        (
            _services(net).replace(f'address = "{net}.21"', f'address = "{net}.20"'),
            "services[old].backends[0].address",
        ),
        (_services(net).replace("timeout = 0.15", "timeout = 0.5"), "services[web].health.timeout"),
        (_services(net) + "\n[[services]\n", "column"),
    ]


async def test_bad_reloads_change_nothing_and_a_good_one_is_a_diff(
    make_daemon: MakeDaemon, net: str
) -> None:
    servers = [EchoBackend(f"b{h}", f"{net}.{h}") for h in (11, 12, 21, 31)]
    for server in servers:
        await server.start()
    daemon = make_daemon(_services(net))
    try:
        await daemon.wait_ready()
        kept = await Connection.open(f"{net}.10")
        async with Stream(f"{net}.10", gap=0.02) as stream:
            for n, (text, field) in enumerate(_bad_configs(net), start=1):
                daemon.write_config(text)
                cli = await daemon.cli("reload")
                assert cli.returncode == 4, (field, cli.stdout, cli.stderr)
                assert field in cli.stderr, (field, cli.stderr)

                daemon.signal(signal.SIGHUP)
                rejected = await daemon.wait_log("reload rejected", 2 * n, 5.0)
                doc = await daemon.status()
                assert doc["last_reload"]["ok"] is False
                assert any(field in issue for issue in doc["last_reload"]["issues"]), field
                assert field in rejected[-1]
            assert {s["name"] for s in doc["services"]} == {"web", "old"}
            assert await kept.ask() == kept.backend

            # Good: "old" goes, "new" comes, "web" is untouched.
            daemon.write_config(_services(net, keep_old=False))
            cli = await daemon.cli("reload")
            assert cli.returncode == 0, cli.stderr
            await daemon.wait_for(
                lambda d: (
                    d["last_reload"]["ok"]
                    and daemon.backend(d, "new", f"{net}.31:{PORT}")["role"] == "active"
                ),
                5.0,
                "new service serving",
            )
            await asyncio.sleep(0.2)

        assert stream.results and not stream.errors()
        assert await kept.ask() == kept.backend  # the established flow survived
        kept.close()
        assert {r.backend for r in await open_flows(f"{net}.30", 10)} == {"b31"}
        assert all(r.error for r in await open_flows(f"{net}.20", 3))  # nobody listens
    finally:
        for server in servers:
            await server.kill()
