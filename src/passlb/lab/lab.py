"""A lab: a throwaway topology of network namespaces for tests, demo and benchmarks.

    with Lab(LabSpec(backends=3)) as lab:
        lab.start_servers(lab.backends[0], tcp=[80])
        replies = lab.call(lab.clients[0].ns, tcp_requests, lab.backends[0].ipv4, 80, 3)

Every namespace name starts with the lab's unique prefix. The owning process
records itself in /run/passlb-lab/<prefix>.pid before it creates anything, so
a later lab can tell a dead run's leftovers from a live run and remove only
the former. Teardown kills what the lab started, then everything still
running inside its namespaces, then deletes the namespaces.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar

import trustme

from passlb.lab import netns
from passlb.lab.topology import (
    NAMESPACE_PREFIX,
    LabError,
    LabSpec,
    Node,
    RouterNode,
    node_commands,
    plan,
    prefix_of,
    switch_commands,
    switch_sysctls_if_present,
    sysctls,
)

STATE_DIR = Path("/run/passlb-lab")
SERVER_READY_TIMEOUT = 10.0
KILL_GRACE = 1.0  # seconds between SIGTERM and SIGKILL at teardown

T = TypeVar("T")
log = logging.getLogger(__name__)


class LabCommandError(subprocess.CalledProcessError):
    """A command in the lab failed; unlike its base class it shows stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr or ''}".rstrip()


class Lab:
    """A lab of `spec`: `clients`, `router`, `lb` and `backends` are its nodes
    (namespace, interface, addresses), known before it is built. Build with
    `build()` or `with Lab(spec) as lab:`; teardown always follows the block."""

    def __init__(self, spec: LabSpec | None = None) -> None:
        self.spec = spec or LabSpec()
        self.prefix = f"{NAMESPACE_PREFIX}{secrets.token_hex(3)}"
        self.topology = plan(self.spec, self.prefix)
        self.clients: tuple[Node, ...] = self.topology.clients
        self.router: RouterNode = self.topology.router
        self.lb: Node = self.topology.lb
        self.lbs: tuple[Node, ...] = self.topology.lbs
        self.backends: tuple[Node, ...] = self.topology.backends
        self.vip4: str = self.topology.vip4
        self.state_dir = STATE_DIR / self.prefix
        self._pid_file = STATE_DIR / f"{self.prefix}.pid"
        self._owner_pid = os.getpid()
        self._spawned: list[subprocess.Popen[Any]] = []
        self._ca: trustme.CA | None = None
        self._built = False

    @property
    def vip6(self) -> str:
        if self.topology.vip6_or_none is None:
            raise LabError("the lab was built with ipv6=False: it has no IPv6 VIP")
        return self.topology.vip6_or_none

    @property
    def namespaces(self) -> tuple[str, ...]:
        return self.topology.namespaces

    def backend(self, name: str) -> Node:
        for node in self.backends:
            if node.name == name:
                return node
        raise LabError(f"no backend named {name!r}; the lab has {[b.name for b in self.backends]}")

    # -- life cycle -------------------------------------------------------

    def build(self) -> Lab:
        if self._built:
            raise LabError(f"lab {self.prefix} is already built")
        remove_stale_labs()
        self._owner_pid = os.getpid()
        self._built = True
        _live_labs[self.prefix] = self
        _install_exit_handlers()
        try:
            # The pid file comes first: a lab without one is taken for stale.
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            _write_atomically(
                self._pid_file, f"{os.getpid()} {netns.process_start_time(os.getpid())}\n"
            )
            self.state_dir.mkdir()
            _ip_batch(None, [f"netns add {ns}" for ns in self.namespaces])
            for ns, values in sysctls(self.topology).items():
                netns.write_sysctls(ns, values)
            netns.write_sysctls(
                self.topology.switch_ns, switch_sysctls_if_present(), if_present=True
            )
            _ip_batch(self.topology.switch_ns, switch_commands(self.topology))
            _ip_batches(node_commands(self.topology))
        except BaseException as exc:
            try:
                self.teardown()
            except LabError as cleanup:
                exc.add_note(str(cleanup))
            raise
        return self

    def teardown(self) -> None:
        """Remove everything the lab made. Goes on past individual failures and
        raises one LabError naming them at the end."""
        if not self._built or os.getpid() != self._owner_pid:
            return
        self._built = False
        _live_labs.pop(self.prefix, None)
        errors: list[str] = []
        for step in (self._stop_spawned, self._remove_namespaces, self._remove_state):
            try:
                step()
            except Exception as exc:
                errors.append(f"{step.__name__}: {exc}")
        if errors:
            raise LabError(f"teardown of lab {self.prefix} was incomplete: " + "; ".join(errors))

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def _stop_spawned(self) -> None:
        running = [p for p in self._spawned if p.poll() is None]
        for proc in running:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # What escaped the process groups still lives in the lab's namespaces
        # and dies in _remove_namespaces.
        self._spawned.clear()

    def _remove_namespaces(self) -> None:
        _kill_processes_in(self.namespaces)
        existing = [ns for ns in self.namespaces if os.path.exists(netns.netns_path(ns))]
        if existing:
            _ip_batch(None, [f"netns del {ns}" for ns in existing], force=True)

    def _remove_state(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self._pid_file.unlink(missing_ok=True)

    # -- running things inside the lab ------------------------------------

    def run(
        self, ns: str, argv: Sequence[str], check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside `ns` and wait for it; stdout and stderr are captured."""
        done = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise LabCommandError(done.returncode, done.args, done.stdout, done.stderr)
        return done

    def spawn(self, ns: str, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start a command inside `ns` in its own process group; teardown kills it."""
        popen_kw["start_new_session"] = True
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], **popen_kw
        )
        self._spawned.append(proc)
        return proc

    def call(self, ns: str, fn: Callable[..., T], *args: Any, timeout: float = 60) -> T:
        """Run `fn(*args)` in a forked child inside `ns`; returns its (picklable) result."""
        return netns.call_in_netns(ns, fn, args, timeout)

    def start_servers(
        self,
        backend: Node | str,
        tcp: Iterable[int] = (),
        udp: Iterable[int] = (),
        tls: Iterable[int] = (),
        http: Iterable[int] = (),
        weight_file: str | os.PathLike[str] | None = None,
    ) -> subprocess.Popen[str]:
        """Start `passlb.lab.servers` in a backend and wait until it listens.

        TLS ports serve a certificate for "<name>.lab.test" and "vip.lab.test"
        signed by the lab's CA (`ca_file`).
        """
        node = self.backend(backend) if isinstance(backend, str) else backend
        argv = [sys.executable, "-m", "passlb.lab.servers", "--name", node.name]
        for option, ports in (("--tcp", tcp), ("--udp", udp), ("--tls", tls), ("--http", http)):
            listed = ",".join(str(p) for p in ports)
            if listed:
                argv += [option, listed]
        if "--tls" in argv:
            cert, key = self._issue_cert(node.name)
            argv += ["--cert", cert, "--key", key]
        if weight_file is not None:
            argv += ["--weight-file", os.fspath(weight_file)]
        if not self.spec.ipv6:
            argv.append("--ipv4-only")
        log_path = self.state_dir / f"servers-{node.name}-{len(self._spawned)}.log"
        with open(log_path, "w") as log_file:
            proc = self.spawn(node.ns, argv, stdout=subprocess.PIPE, stderr=log_file, text=True)
        self._wait_ready(proc, node.name, log_path)
        return proc

    def _wait_ready(self, proc: subprocess.Popen[str], name: str, log_path: Path) -> None:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if selector.select(SERVER_READY_TIMEOUT):
                line = proc.stdout.readline()
                if line.strip() == "ready":
                    return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        raise LabError(
            f"echo servers in {name} did not get ready (exit status {proc.returncode}):\n"
            + log_path.read_text(errors="replace")[-2000:]
        )

    # -- TLS ----------------------------------------------------------------

    @property
    def ca_file(self) -> str:
        """Path of the PEM certificate of the lab's CA."""
        path = self.state_dir / "ca.pem"
        if not path.exists():
            self._ca_().cert_pem.write_to_path(str(path))
        return str(path)

    def _ca_(self) -> trustme.CA:
        if self._ca is None:
            self._ca = trustme.CA(organization_name="passlb lab")
        return self._ca

    def _issue_cert(self, name: str) -> tuple[str, str]:
        cert_path = self.state_dir / f"{name}.crt"
        key_path = self.state_dir / f"{name}.key"
        if not cert_path.exists():
            leaf = self._ca_().issue_cert(f"{name}.lab.test", "vip.lab.test")
            leaf.private_key_pem.write_to_path(str(key_path))
            cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return str(cert_path), str(key_path)


# -- helpers ------------------------------------------------------------------


def _ip_command(ns: str | None, force: bool = False) -> list[str]:
    argv = ["ip"]
    if ns is not None:
        argv += ["-n", ns]
    if force:
        argv.append("-force")
    return [*argv, "-batch", "-"]


def _ip_batch(ns: str | None, lines: list[str], force: bool = False) -> None:
    done = subprocess.run(
        _ip_command(ns, force), input="\n".join(lines) + "\n", capture_output=True, text=True
    )
    if done.returncode != 0:
        raise LabError(f"ip -batch in {ns or 'the root namespace'} failed: {done.stderr.strip()}")


def _ip_batches(per_ns: dict[str, list[str]]) -> None:
    """One `ip -batch` per namespace, all running at once."""
    procs = {
        ns: subprocess.Popen(
            _ip_command(ns),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ns in per_ns
    }
    failures = []
    for ns, proc in procs.items():
        _, stderr = proc.communicate("\n".join(per_ns[ns]) + "\n")
        if proc.returncode != 0:
            failures.append(f"{ns}: {stderr.strip()}")
    if failures:
        raise LabError("ip -batch failed: " + "; ".join(failures))


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_processes_in(namespaces: Iterable[str]) -> None:
    me = os.getpid()
    for pid in netns.pids_in_netns(namespaces):
        if pid != me:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _owner_alive(prefix: str) -> bool:
    try:
        pid_text, start_text = (STATE_DIR / f"{prefix}.pid").read_text().split()
    except (OSError, ValueError):
        return False  # the pid file is written before any namespace exists
    return str(netns.process_start_time(int(pid_text))) == start_text


def remove_stale_labs() -> list[str]:
    """Remove the labs whose owning process is gone; returns their prefixes."""
    try:
        names = os.listdir(netns.NETNS_DIR)
    except FileNotFoundError:
        names = []
    by_prefix: dict[str, list[str]] = {}
    for name in names:
        prefix = prefix_of(name)
        if prefix is not None:
            by_prefix.setdefault(prefix, []).append(name)
    if STATE_DIR.exists():
        for entry in STATE_DIR.iterdir():
            by_prefix.setdefault(entry.name.removesuffix(".pid"), [])
    stale = [p for p in by_prefix if p.startswith(NAMESPACE_PREFIX) and not _owner_alive(p)]
    doomed = [ns for p in stale for ns in by_prefix[p]]
    if doomed:
        _kill_processes_in(doomed)
        _ip_batch(None, [f"netns del {ns}" for ns in doomed], force=True)
    for prefix in stale:
        shutil.rmtree(STATE_DIR / prefix, ignore_errors=True)
        (STATE_DIR / f"{prefix}.pid").unlink(missing_ok=True)
    if stale:
        log.info("removed stale labs %s", ", ".join(stale))
    return stale


# Labs built and not yet torn down, so a SIGTERM or interpreter exit can still
# remove them (best effort; the context manager is the normal way).
_live_labs: dict[str, Lab] = {}
_handlers_installed = False


def _teardown_live_labs() -> None:
    for lab in list(_live_labs.values()):
        try:
            lab.teardown()
        except Exception as exc:
            log.warning("%s", exc)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _teardown_live_labs()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_exit_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_teardown_live_labs)
    # Only where nobody else handles SIGTERM already (the daemon may).
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _on_sigterm)
