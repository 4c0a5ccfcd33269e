"""libnftables, the C library the dsr and nat drivers write the kernel through.

pip's `pip-nftables` is only a ctypes binding: the library itself comes from
the distribution (Debian's libnftables1). When it is missing, say so and how
to install it, before the binding fails half-constructed (its __del__ then
prints a traceback of its own).
"""

from __future__ import annotations

import ctypes

LIBNFTABLES = "libnftables.so.1"  # the file name pip-nftables' binding loads
INSTALL = (
    "install it with `apt-get install nftables libnftables1` (Debian, Ubuntu; "
    '`./run` installs it when run as root), or use mode = "proxy", which needs no kernel tables'
)


def libnftables_missing() -> str | None:
    """Why libnftables cannot be loaded, with how to install it; None when it loads."""
    try:
        ctypes.CDLL(LIBNFTABLES)
    except OSError as err:
        return f"the dsr and nat modes need libnftables, which is not installed ({err}); {INSTALL}"
    return None
