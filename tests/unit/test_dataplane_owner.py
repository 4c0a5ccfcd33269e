"""One daemon per data plane: the namespace's lock file (dataplane/owner.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from passlb.dataplane.owner import DataplaneBusy, hold_dataplane, lock_path


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path: Path) -> None:
    first = hold_dataplane("127.0.0.1:9180", "/etc/passlb/a.toml", tmp_path)
    with pytest.raises(DataplaneBusy) as refused:
        hold_dataplane("127.0.0.1:9181", "/etc/passlb/b.toml", tmp_path)
    message = str(refused.value)
    assert f"pid {os.getpid()}, admin API 127.0.0.1:9180, config /etc/passlb/a.toml" in message
    assert str(lock_path(tmp_path)) in message
    first.close()
    hold_dataplane("127.0.0.1:9181", "/etc/passlb/b.toml", tmp_path).close()


def test_a_killed_holder_does_not_block_its_restart(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from passlb.dataplane.owner import *; "
            f"h = hold_dataplane('127.0.0.1:9180', 'a.toml', Path({str(tmp_path)!r})); "
            "print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(DataplaneBusy, match=f"pid {holder.pid},"):
            hold_dataplane("127.0.0.1:9180", "a.toml", tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    hold_dataplane("127.0.0.1:9180", "a.toml", tmp_path).close()
