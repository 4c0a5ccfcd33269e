"""The portable userspace data plane: TCP/UDP relay, PROXY protocol, SNI routing.

See README.md beside this file for the design, the limits and the routing
that `transparent` needs.
"""

from __future__ import annotations

import asyncio
import importlib

from passlb.dataplane.proxy.driver import ListenerKey, ProxyDriver

__all__ = ["ListenerKey", "ProxyDriver", "new_event_loop"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop the proxy runs best on: uvloop when installed, else asyncio's."""
    try:
        uvloop = importlib.import_module("uvloop")  # optional: not a dependency
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
