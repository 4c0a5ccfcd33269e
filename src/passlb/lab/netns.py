"""Network-namespace primitives: enter a namespace, run a function inside one,
find and kill the processes living in one.

Python 3.11 has no os.setns (3.12 adds it), so setns(2) is called through libc.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from passlb.lab.topology import LabError

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class LabCallError(LabError):
    """A function run by `call_in_netns` raised an exception that could not be
    sent back as itself; carries the child's traceback text."""


def netns_path(ns: str) -> str:
    return os.path.join(NETNS_DIR, ns)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns into {what}: {os.strerror(errno)}")


def enter_netns(ns: str) -> None:
    """Move the calling thread into network namespace `ns` for good."""
    fd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, ns)
    finally:
        os.close(fd)


@contextlib.contextmanager
def inside_netns(ns: str) -> Iterator[None]:
    """Run the body with the calling thread inside `ns`, then return to where it was.

    setns(CLONE_NEWNET) changes only the calling thread, so other threads of
    the process are not affected.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter_netns(ns)
        try:
            yield
        finally:
            _setns(home, "the original network namespace")
    finally:
        os.close(home)


def write_sysctls(ns: str, values: dict[str, str], *, if_present: bool = False) -> None:
    """Write /proc/sys values as seen from inside `ns` (net sysctls are per
    namespace); with `if_present`, values the kernel does not offer are skipped."""
    with inside_netns(ns):
        for path, value in values.items():
            full = os.path.join("/proc/sys", path)
            if if_present and not os.path.exists(full):
                continue
            with open(full, "w") as f:
                f.write(value)


def call_in_netns(
    ns: str, fn: Callable[..., T], args: Iterable[Any] = (), timeout: float = 60
) -> T:
    """Run `fn(*args)` in a forked child inside `ns` and return its result.

    The result travels back pickled. An exception is re-raised here as itself
    (when it pickles) with the child's traceback added as a note; the child is
    killed after `timeout` seconds and TimeoutError raised.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns to the caller
        os.close(read_end)
        _child(ns, fn, tuple(args), write_end)
    os.close(write_end)
    try:
        data = _read_all(read_end, timeout)
    except TimeoutError:
        _kill_and_reap(pid)
        raise TimeoutError(
            f"{getattr(fn, '__name__', fn)!s} in {ns} did not finish in {timeout} s"
        ) from None
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not data:
        raise LabError(
            f"{getattr(fn, '__name__', fn)!s} in {ns}: the child died without an answer "
            f"(wait status {status})"
        )
    ok, payload = pickle.loads(data)
    if ok:
        return payload  # type: ignore[no-any-return]
    exc_bytes, description, trace = payload
    exc = _unpickle_exception(exc_bytes)
    if exc is None:
        raise LabCallError(f"{description} (raised in {ns})\n{trace}")
    exc.add_note(f"raised in network namespace {ns}; child traceback:\n{trace}")
    raise exc


def _child(ns: str, fn: Callable[..., object], args: tuple[Any, ...], write_end: int) -> None:
    status = 0
    try:
        # The parent's handlers (e.g. lab teardown on SIGTERM) must not run here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            enter_netns(ns)
            answer: tuple[bool, object] = (True, fn(*args))
        except BaseException as exc:
            answer = (False, _describe(exc))
        try:
            data = pickle.dumps(answer)
        except Exception as exc:  # the result itself would not pickle
            data = pickle.dumps((False, _describe(exc)))
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(data)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        status = 1
    finally:
        os._exit(status)


def _describe(exc: BaseException) -> tuple[bytes | None, str, str]:
    try:
        exc_bytes: bytes | None = pickle.dumps(exc)
    except Exception:
        exc_bytes = None
    trace = "".join(traceback.format_exception(exc))
    return exc_bytes, f"{type(exc).__name__}: {exc}", trace


def _unpickle_exception(exc_bytes: bytes | None) -> BaseException | None:
    if exc_bytes is None:
        return None
    try:
        exc = pickle.loads(exc_bytes)
    except Exception:  # e.g. an exception class whose __init__ takes other args
        return None
    return exc if isinstance(exc, BaseException) else None


def _read_all(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            raise TimeoutError
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def pids_in_netns(namespaces: Iterable[str]) -> list[int]:
    """Pids of the processes whose network namespace is one of `namespaces`."""
    wanted = set()
    for ns in namespaces:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(netns_path(ns))
            wanted.add((st.st_dev, st.st_ino))
    if not wanted:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if (st.st_dev, st.st_ino) in wanted:
            found.append(int(entry))
    return found


def process_start_time(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot, None if it does not exist.

    With the pid it names one process for good, even after the pid is reused.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Field 22 (starttime); the command name in field 2 may contain spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])
