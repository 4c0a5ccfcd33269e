"""The BIRD 2 driver: runs one `bird` for this node and talks to it with `birdc`.

    speaker = BirdSpeaker(settings, on_event)
    await speaker.start(announced)       # write the config, start (or adopt) bird
    await speaker.announce(settings, announced)   # rewrite, validate, `birdc configure`
    peers = await speaker.peers()        # `birdc show protocols all`
    await speaker.stop()                 # withdraw every VIP, then stop bird

Files live in ``[bgp] run_dir``: bird.conf, bird.ctl (the control socket),
bird.pid. Every config is checked with ``bird -p`` before it replaces the
running one, so a config BIRD refuses changes nothing.

Supervision: ``supervise()`` waits for bird's exit (a pidfd, no polling) and
starts it again after ``restart_delay`` (doubling up to 30 s while it keeps
dying). A bird left running by a passlb that was killed (SIGKILL) is adopted:
it kept announcing, and the kernel kept forwarding, so a restart of the
daemon never withdraws anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from passlb.bgp.bird_config import PeerState, parse_protocols, render_config
from passlb.errors import PasslbError
from passlb.model import BgpSettings, IPAddress

log = logging.getLogger("passlb.bgp")

BINARIES = ("bird", "birdc")
INSTALL_HINT = "install it: apt-get install bird2"
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")  # where Debian puts bird (not on users' PATH)
BIRDC_TIMEOUT = 5.0  # seconds
STOP_TIMEOUT = 5.0
MAX_RESTART_DELAY = 30.0

EventSink = Callable[..., None]  # (kind, message, **fields)


class SpeakerError(PasslbError):
    """The BGP speaker is missing, refused a config, or did not answer."""


class Speaker(Protocol):
    """What the daemon needs of a BGP speaker: the seam a second one would fill."""

    async def start(self, announced: Sequence[IPAddress]) -> None: ...

    async def announce(self, settings: BgpSettings, announced: Sequence[IPAddress]) -> None:
        """Announce exactly `announced` under `settings`; SpeakerError changes nothing."""

    async def check(self, settings: BgpSettings) -> None:
        """Raise SpeakerError when the speaker would refuse `settings`."""

    async def peers(self) -> list[PeerState]: ...

    async def supervise(self) -> None:
        """Run until cancelled, restarting the speaker whenever it dies."""

    async def stop(self) -> None:
        """Withdraw every VIP, then stop the speaker (an adopted one too)."""


def find_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def speaker_problems() -> list[str]:
    """Why BIRD cannot run here ("" when it can): `passlb check` and start say it."""
    missing = [name for name in BINARIES if find_binary(name) is None]
    if not missing:
        return []
    return [
        f"bgp.speaker: BIRD 2 is not installed ({' and '.join(missing)} not found on PATH"
        f" or in {', '.join(SBIN)}); {INSTALL_HINT}"
    ]


class BirdSpeaker:
    def __init__(
        self, settings: BgpSettings, on_event: EventSink, *, restart_delay: float = 1.0
    ) -> None:
        problems = speaker_problems()
        if problems:
            raise SpeakerError(problems[0])
        self.settings = settings
        self.run_dir = Path(settings.run_dir)  # kept: a reload does not move bird
        self.on_event = on_event
        self.restart_delay = restart_delay
        self.bird = find_binary("bird") or "bird"
        self.birdc = find_binary("birdc") or "birdc"
        self.announced: tuple[IPAddress, ...] = ()
        self.restarts = 0
        self._pid: int | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._configure_pending = False

    @property
    def config_file(self) -> Path:
        return self.run_dir / "bird.conf"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "bird.ctl"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "bird.pid"

    @property
    def pid(self) -> int | None:
        return self._pid

    # -- config ---------------------------------------------------------------

    async def check(self, settings: BgpSettings) -> None:
        await self._validated(settings, self.announced)

    async def _validated(self, settings: BgpSettings, announced: Sequence[IPAddress]) -> Path:
        """The rendered config in a scratch file that `bird -p` accepted."""
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        scratch = self.run_dir / f".bird.conf.{os.getpid()}"
        scratch.write_text(render_config(settings, announced))
        proc = await asyncio.create_subprocess_exec(
            self.bird, "-p", "-c", str(scratch), stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
        if proc.returncode != 0:
            scratch.unlink(missing_ok=True)
            raise SpeakerError(f"bgp: BIRD refused the config: {err.decode().strip()}")
        return scratch

    async def announce(self, settings: BgpSettings, announced: Sequence[IPAddress]) -> None:
        scratch = await self._validated(settings, announced)
        os.replace(scratch, self.config_file)
        self.settings, self.announced = settings, tuple(announced)
        if self._pid is None:
            return  # the config file is read when bird starts
        try:
            await self._configure()
        except SpeakerError as err:
            # bird is starting or restarting: supervise() reconfigures it.
            self._configure_pending = True
            log.info("bgp: configure deferred: %s", err)

    async def _configure(self) -> None:
        out = await self.birdc_command("configure")
        if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
            raise SpeakerError(f"bgp: birdc configure: {out.strip()}")
        self._configure_pending = False

    async def birdc_command(self, *words: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            self.birdc,
            "-s",
            str(self.control_socket),
            *words,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), BIRDC_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            message = f"bgp: birdc {' '.join(words)}: no answer in {BIRDC_TIMEOUT} s"
            raise SpeakerError(message) from None
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise SpeakerError(f"bgp: birdc {' '.join(words)}: {text.strip()}")
        return text

    async def peers(self) -> list[PeerState]:
        return parse_protocols(await self.birdc_command("show", "protocols", "all"))

    # -- the process ----------------------------------------------------------

    async def start(self, announced: Sequence[IPAddress]) -> None:
        await self.announce(self.settings, announced)
        adopted = self._adoptable()
        if adopted is not None:
            self._pid = adopted
            self.on_event("bgp", f"adopted the running BIRD (pid {adopted})", pid=adopted)
            await self._configure()
            return
        self._spawn()

    def _adoptable(self) -> int | None:
        """The pid of a bird on our config file left by an earlier daemon, if alive."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        if Path(cmdline[0].decode()).name == "bird" and str(self.config_file).encode() in cmdline:
            return pid
        return None

    def _spawn(self) -> None:
        argv = [self.bird, "-f", "-c", str(self.config_file)]
        argv += ["-s", str(self.control_socket), "-P", str(self.pid_file)]
        # Its own session: a Ctrl-C meant for passlb must not stop bird before
        # passlb withdraws the VIPs.
        self._child = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
        self._pid = self._child.pid
        self._configure_pending = False
        log.info("bgp: started BIRD (pid %d)", self._pid)

    async def _exited(self) -> int | None:
        """Wait for the running bird to exit; its exit status when it was our child."""
        assert self._pid is not None
        try:
            fd = os.pidfd_open(self._pid)
        except ProcessLookupError:
            return self._reap()
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()

        def exited() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(fd, exited)
        try:
            await gone
        finally:
            loop.remove_reader(fd)
            os.close(fd)
        return self._reap()

    def _reap(self) -> int | None:
        child, self._child, self._pid = self._child, None, None
        return None if child is None else child.wait()

    async def supervise(self) -> None:
        delay = self.restart_delay
        while True:
            if self._pid is None:
                self._spawn()
            waiter = asyncio.ensure_future(self._exited())
            while not waiter.done():
                # A configure that found bird not yet listening is retried here.
                await asyncio.wait([waiter], timeout=1.0)
                if self._configure_pending and not waiter.done():
                    with contextlib.suppress(SpeakerError):
                        await self._configure()
            status = waiter.result()
            if self._stopping:
                return
            self.restarts += 1
            how = "" if status is None else f" (exit status {status})"
            self.on_event(
                "bgp",
                f"BIRD died{how}; restarting in {delay:g} s",
                ok=False,
                exit_status=status,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RESTART_DELAY)

    async def withdraw_all(self) -> None:
        await self.announce(self.settings, ())

    async def stop(self) -> None:
        """Withdraw, then SIGTERM bird (it closes its sessions with a Cease)."""
        self._stopping = True
        if self._pid is None:
            return
        with contextlib.suppress(SpeakerError):
            await self.withdraw_all()
            exported = ", ".join(f"{p.address}={p.exported}" for p in await self.peers())
            log.info("bgp: every VIP withdrawn before BIRD stops (routes exported: %s)", exported)
        pid = self._pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self._exited(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._reap()
        log.info("bgp: BIRD stopped")


def describe_peers(peers: Sequence[PeerState], settings: BgpSettings) -> list[dict[str, Any]]:
    """The status document's "peers": every configured peer, as BIRD sees it."""
    seen = {p.address: p for p in peers}
    result = []
    for peer in settings.peers:
        state = seen.get(str(peer.address))
        result.append(
            {
                "address": str(peer.address),
                "asn": peer.asn,
                "state": state.state if state else "unknown",
                "established": bool(state and state.established),
                "info": state.info if state else "",
                "last_error": state.last_error if state else "",
                "routes_exported": state.exported if state else 0,
                "hold_time": peer.hold_time,
                "bfd": peer.bfd,
            }
        )
    return result
