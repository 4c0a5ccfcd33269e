"""One daemon per kernel data plane: a lock file per network namespace.

The nftables tables passlb writes (netdev passlb, inet passlb_nat) have fixed
names, one of each per network namespace, so two daemons in one namespace
would overwrite each other's rings. The daemon takes an exclusive flock(2) on
/run/passlb/netns-<inode>.lock before it touches the kernel, and keeps it
open for its whole life. The kernel releases the lock when the process ends,
however it ends (SIGKILL and crashes included), so a dead daemon never blocks
its restart, and no pid has to be checked for staleness. The file says who
holds it (pid, admin API, config), for the refusal message.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO

from passlb.errors import DataplaneError

LOCK_DIR = Path("/run/passlb")


def netns_id() -> int:
    """This process's network namespace (the inode that `ip netns identify` and
    `lsns -t net` show); unique among the namespaces alive."""
    return os.stat("/proc/self/ns/net").st_ino


def lock_path(lock_dir: Path = LOCK_DIR) -> Path:
    return lock_dir / f"netns-{netns_id()}.lock"


class DataplaneBusy(DataplaneError):
    """Another daemon holds this namespace's data plane."""


def hold_dataplane(api: str, config: str, lock_dir: Path = LOCK_DIR) -> IO[str]:
    """Take this namespace's data-plane lock; the open file holds it until it
    is closed or the process ends. DataplaneBusy names the holder."""
    path = lock_path(lock_dir)
    try:
        lock_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the process's life)
    except OSError as err:
        raise DataplaneError(f"cannot create the data-plane lock {path}: {err.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        holder = handle.read()
        handle.close()
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise DataplaneError(f"cannot lock {path}: {err.strerror}") from None
        raise DataplaneBusy(_busy_message(holder, path)) from None
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "api": api, "config": config, "started": time.time()}, handle)
    handle.write("\n")
    handle.flush()
    return handle


def _busy_message(holder: str, path: Path) -> str:
    try:
        who = json.loads(holder)
        named = f"pid {who['pid']}, admin API {who['api']}, config {who['config']}"
    except (ValueError, TypeError, KeyError):
        named = "it has not written its name yet"
    return (
        f"another passlb daemon runs the data plane of this network namespace ({named});"
        f" stop it first, or run this one in another namespace (lock {path})"
    )
