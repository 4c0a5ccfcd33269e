"""The `passlb` command line.

Exit codes (also in the README and `passlb --help`):
  0  success
  1  runtime failure (the data plane refused a change, a lab could not be built, ...)
  2  usage error (bad arguments)
  3  invalid configuration (every problem is printed; nothing was applied)
  4  the daemon's admin API could not be reached, or refused the request
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from passlb import __version__
from passlb.errors import ConfigError, PasslbError
from passlb.model import MAX_WEIGHT, MIN_WEIGHT

if TYPE_CHECKING:
    from passlb.api.client import ApiClient
    from passlb.model import Config

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_API = 4

DEFAULT_API = "127.0.0.1:9180"
CLI_API_TIMEOUT = 30.0  # seconds

EPILOG = """\
examples:
  passlb check examples/quickstart.toml        validate a config, print a summary
  passlb run /etc/passlb/passlb.toml           run the daemon in the foreground
  passlb status                                services, backends, health, counters
  passlb top                                   the same, live, with recent events
  passlb flows --service web                   current flows from the data plane
  passlb drain web 198.18.2.11                 stop new flows to a backend
  passlb node drain                            withdraw this node's VIPs from the routers
  passlb explain --config lb.toml 198.18.1.10 40000 198.18.0.10 443 tcp
  passlb demo                                  build a lab and show passthrough

exit codes: 0 ok, 1 runtime failure, 2 usage error, 3 invalid config,
            4 admin API unreachable or request refused
"""


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"passlb {__version__}")
    return EXIT_OK


def _cmd_check(args: argparse.Namespace) -> int:
    from passlb.config import load_config, summarize
    from passlb.model import Mode

    status = EXIT_OK
    for path in args.files:
        try:
            config = load_config(path)
        except ConfigError as err:
            print(f"{path}: invalid ({len(err.issues)} problem(s))", file=sys.stderr)
            for issue in err.issues:
                print(f"  {issue}", file=sys.stderr)
            status = EXIT_CONFIG
            continue
        problems = _environment_problems(config)
        if problems:
            print(f"{path}: cannot run here ({len(problems)} problem(s))", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            status = EXIT_CONFIG
            continue
        print(f"{path}: ok")
        print(summarize(config))
        if any(s.mode in (Mode.DSR, Mode.NAT) for s in config.services):
            from passlb.dataplane.nft.library import libnftables_missing

            missing = libnftables_missing()
            if missing is not None:  # the file is fine; this machine cannot run it yet
                print(f"{path}: warning: {missing}", file=sys.stderr)
    return status


def _environment_problems(config: Config) -> list[str]:
    """What this machine lacks to run `config` (the file itself is valid)."""
    if config.bgp is None:
        return []
    from passlb.bgp.bird import speaker_problems

    return speaker_problems()


def _cmd_schema(args: argparse.Namespace) -> int:
    from passlb.config.schema import config_schema

    print(json.dumps(config_schema(), indent=2))
    return EXIT_OK


def _cmd_explain(args: argparse.Namespace) -> int:
    from passlb.config import load_config
    from passlb.control.desired import compute_desired
    from passlb.control.explain import explain_flow
    from passlb.control.reconciler import assume_all_healthy

    config = load_config(args.config)
    # Where a new flow would go with every backend healthy; the running
    # daemon's health view is not consulted.
    state = compute_desired(config, assume_all_healthy(config), drains={}, now=0.0)
    explanation = explain_flow(
        state, args.src_ip, args.src_port, args.dst_ip, args.dst_port, args.proto
    )
    print(explanation)
    desired = state.service(explanation.service) if explanation.service else None
    if desired is not None:
        from passlb.control.fingerprint import ring_fingerprint

        # Nodes whose `passlb status` shows this fingerprint send the flow alike.
        print(f"ring     fingerprint {ring_fingerprint(desired)} (every backend healthy)")
    return EXIT_OK


def _cmd_backend_setup(args: argparse.Namespace) -> int:
    from passlb.dataplane.backend_setup import apply_backend_setup, backend_setup_commands

    if args.print:
        for argv in backend_setup_commands(args.vip, undo=args.undo):
            print(" ".join(argv))
        return EXIT_OK
    apply_backend_setup(args.vip, undo=args.undo)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from passlb.daemon import run_daemon

    return run_daemon(args.config, cleanup=args.cleanup)


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from passlb.daemon import cleanup_dataplane

    removed = cleanup_dataplane()
    for table in removed:
        print(f"removed table {table}")
    if not removed:
        print("no passlb tables to remove")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.cluster:
        from passlb.demo_cluster import run_cluster_demo

        return run_cluster_demo(args.flows)
    from passlb.demo import run_demo

    return run_demo(mode=args.mode, flows=args.flows)


def _api_client(args: argparse.Namespace) -> ApiClient:
    from passlb.api.client import ApiClient

    # Status counts the kernel's flow tables when asked: over 1 s per 100,000
    # dsr flow entries in a running daemon, far more than the client's
    # default 5 s for a full million-entry table.
    return ApiClient(args.api, token=args.token, timeout=CLI_API_TIMEOUT)


def _cmd_status(args: argparse.Namespace) -> int:
    from passlb.api.views import format_status

    status = _api_client(args).get("/api/v1/status")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return EXIT_OK


def _cmd_top(args: argparse.Namespace) -> int:
    import time

    from passlb.api.views import format_events, format_status

    client = _api_client(args)
    last_event = 0
    recent: list[dict[str, object]] = []
    while True:
        doc = client.get("/api/v1/status")
        events = client.get(f"/api/v1/events?since={last_event}")["events"]
        recent = (recent + events)[-args.events :]
        if events:
            last_event = events[-1]["seq"]
        screen = format_status(doc)
        if recent:
            screen += "\n\nrecent events:\n" + format_events(recent)
        if args.once:
            print(screen)
            return EXIT_OK
        # ANSI: cursor home + clear screen, then redraw (no curses needed).
        sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ") + screen + "\n")
        sys.stdout.flush()
        time.sleep(args.interval)


def _cmd_flows(args: argparse.Namespace) -> int:
    import urllib.parse

    from passlb.api.views import format_flows

    query = {"limit": str(args.limit)}
    if args.service:
        query["service"] = args.service
    if args.backend:
        query["backend"] = args.backend
    result = _api_client(args).get("/api/v1/flows?" + urllib.parse.urlencode(query))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_flows(result["flows"], result["total"]))
    return EXIT_OK


def _cmd_weight(args: argparse.Namespace) -> int:
    path = f"/api/v1/services/{args.service}/backends/{args.backend}"
    result = _api_client(args).post(path, {"weight": args.weight})
    print(result.get("message", "ok"))
    return EXIT_OK


def _cmd_completion(args: argparse.Namespace) -> int:
    from passlb.completion import bash_completion, zsh_completion

    script = bash_completion if args.shell == "bash" else zsh_completion
    print(script(build_parser()))
    return EXIT_OK


def _cmd_admin_state(args: argparse.Namespace) -> int:
    state = {"drain": "drain", "enable": "enabled", "disable": "disabled"}[args.command]
    body = {"state": state}
    path = f"/api/v1/services/{args.service}/backends/{args.backend}"
    result = _api_client(args).post(path, body)
    print(result.get("message", "ok"))
    return EXIT_OK


def _cmd_resync(args: argparse.Namespace) -> int:
    result = _api_client(args).post("/api/v1/resync", {})
    print(result.get("message", "full resync requested"))
    return EXIT_OK


def _cmd_node(args: argparse.Namespace) -> int:
    import time

    from passlb.bgp.agent import QUIET_PERIOD

    client = _api_client(args)
    result = client.post(f"/api/v1/node/{args.verb}", {})
    print(result.get("message", "ok"))
    if args.verb != "drain" or not args.wait:
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        node = (client.get("/api/v1/status").get("bgp") or {}).get("node", {})
        if node.get("traffic_moved"):
            withdrawn = time.strftime("%H:%M:%S", time.localtime(node["withdrawn_at"]))
            print(
                f"withdrawn from every peer at {withdrawn}; no packets for"
                f" {QUIET_PERIOD:g} s since: the routers moved the traffic away"
                f" ({node['packets_after_withdrawal']} packets arrived after the withdrawal)"
            )
            return EXIT_OK
        time.sleep(0.5)
    print(
        f"passlb: traffic still arrives {args.timeout:g} s after the drain"
        " (see passlb status: bgp peers and routes)",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def _cmd_reload(args: argparse.Namespace) -> int:
    result = _api_client(args).post("/api/v1/reload", {})
    print(result.get("message", "reloaded"))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="passlb",
        description="Passthrough Layer-4 load balancer (TCP/UDP; TLS stays end to end).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help_: str, example: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    def api_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--api", default=DEFAULT_API, help="admin API address (host:port or unix:/path)"
        )
        p.add_argument("--token", default=None, help="bearer token for a non-loopback API")

    p = add("run", _cmd_run, "run the daemon in the foreground", "passlb run lb.toml")
    p.add_argument("config", help="TOML config file")
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="remove passlb's kernel tables on exit (default: they keep forwarding)",
    )

    p = add("check", _cmd_check, "validate config files", "passlb check examples/*.toml")
    p.add_argument("files", nargs="+", help="TOML config files")

    add("schema", _cmd_schema, "print the config's JSON Schema", "passlb schema > passlb.json")
    add("version", _cmd_version, "print the version", "passlb version")

    p = add(
        "explain",
        _cmd_explain,
        "say which backend a new flow would go to",
        "passlb explain --config lb.toml 198.18.1.10 40000 198.18.0.10 443 tcp",
    )
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("src_ip")
    p.add_argument("src_port", type=int)
    p.add_argument("dst_ip")
    p.add_argument("dst_port", type=int)
    p.add_argument("proto", choices=["tcp", "udp"])

    p = add(
        "backend-setup",
        _cmd_backend_setup,
        "prepare a backend host for DSR: VIP on lo, no ARP for it",
        "passlb backend-setup --vip 198.18.0.10",
    )
    p.add_argument("--vip", required=True, help="the service VIP this backend serves")
    p.add_argument("--undo", action="store_true", help="remove what backend-setup added")
    p.add_argument("--print", action="store_true", help="print the commands, change nothing")

    add(
        "cleanup",
        _cmd_cleanup,
        "remove every kernel table passlb installed (stops forwarding)",
        "passlb cleanup",
    )

    p = add(
        "demo",
        _cmd_demo,
        "build a throwaway lab and show passthrough load balancing",
        "sudo passlb demo",
    )
    p.add_argument(
        "--mode",
        choices=["auto", "dsr", "nat", "proxy"],
        default="auto",
        help="auto: dsr as root on Linux, else proxy on loopback",
    )
    p.add_argument("--flows", type=int, default=300, help="TCP flows to send (default 300)")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="three nodes behind a BGP router; one is killed mid-transfer (root)",
    )

    p = add("status", _cmd_status, "show services, backends and counters", "passlb status")
    api_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    for verb, what in (
        ("drain", "stop new flows to a backend; existing ones finish (until drain_timeout)"),
        ("enable", "return a backend to service"),
        ("disable", "stop new flows to a backend and cut its existing ones"),
    ):
        p = add(verb, _cmd_admin_state, what, f"passlb {verb} web 198.18.2.11")
        p.add_argument("service", help="service name")
        p.add_argument("backend", help="backend key: address, or address:port")
        api_options(p)

    p = add(
        "weight",
        _cmd_weight,
        "change a backend's weight at runtime (until a reload drops the backend)",
        "passlb weight web 198.18.2.11 5",
    )
    p.add_argument("service", help="service name")
    p.add_argument("backend", help="backend key: address, or address:port")
    p.add_argument("weight", type=int, help=f"{MIN_WEIGHT}..{MAX_WEIGHT}")
    api_options(p)

    p = add("top", _cmd_top, "live view of services, backends, rates and events", "passlb top")
    api_options(p)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--events", type=int, default=8, help="recent events to show")

    p = add(
        "flows",
        _cmd_flows,
        "list current flows from the data plane's flow table",
        "passlb flows --service web --backend 198.18.2.11",
    )
    api_options(p)
    p.add_argument("--service", help="only this service")
    p.add_argument("--backend", help="only this backend key (with --service)")
    p.add_argument("--limit", type=int, default=1000, help="show at most this many")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add(
        "completion",
        _cmd_completion,
        "print a shell completion script",
        "passlb completion bash > /etc/bash_completion.d/passlb",
    )
    p.add_argument("shell", choices=["bash", "zsh"])

    p = add(
        "node",
        _cmd_node,
        "drain this node from the routers (withdraw every VIP; forwarding goes on), or undrain",
        "passlb node drain",
    )
    p.add_argument("verb", choices=["drain", "undrain"])
    p.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="drain: return at once instead of waiting until the traffic has moved away",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="drain: seconds to wait")
    api_options(p)

    p = add("reload", _cmd_reload, "re-read the daemon's config file", "passlb reload")
    api_options(p)

    p = add(
        "resync",
        _cmd_resync,
        "re-read the data plane now and repair what changed behind passlb",
        "passlb resync",
    )
    api_options(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"passlb: invalid configuration ({len(err.issues)} problem(s)):", file=sys.stderr)
        for issue in err.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    except PasslbError as err:
        print(f"passlb: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_FAILURE)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
