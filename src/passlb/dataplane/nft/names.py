"""Names of passlb's nft objects, shared by the kernel drivers."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from passlb.errors import DataplaneError
from passlb.state import DesiredState

_SIMPLE_NAME = re.compile(r"[A-Za-z0-9_]{1,40}")


def ident(name: str) -> str:
    """An nft-safe, collision-free identifier for a service or interface name."""
    if _SIMPLE_NAME.fullmatch(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", name)[:32]
    return f"{cleaned}_{hashlib.sha256(name.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class ServiceNames:
    """The nft object names of one service."""

    ident: str

    @staticmethod
    def of(service: str) -> ServiceNames:
        return ServiceNames(ident(service))

    @property
    def chain(self) -> str:
        return f"svc_{self.ident}"

    @property
    def ring(self) -> str:
        return f"ring_{self.ident}"

    @property
    def drop_counter(self) -> str:
        return f"drop_{self.ident}"

    def flows(self, transport: str) -> str:
        return f"flows_{self.ident}_{transport}"


def check_services(desired: DesiredState) -> None:
    """Refuse a state whose services would collide in nft names or whose rings
    do not have their configured size: nothing is written then."""
    seen: dict[str, str] = {}
    for sd in desired.services:
        i = ident(sd.service.name)
        if i in seen and seen[i] != sd.service.name:
            raise DataplaneError(f"services {seen[i]!r} and {sd.service.name!r} share nft names")
        seen[i] = sd.service.name
        if sd.ring is not None and len(sd.ring) != sd.service.ring_size:
            raise DataplaneError(
                f"service {sd.service.name!r}: ring has {len(sd.ring)} slots, "
                f"ring_size is {sd.service.ring_size}"
            )
